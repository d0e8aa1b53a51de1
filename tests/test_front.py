"""The front door: which requests go straight to the relay or the tunnel, and which to Starlette."""

import asyncio
import json

import pytest

from broker.asgi import ASGIApp, Message, Receive, Scope, Send
from broker.front import FrontDoor


def named(name: str) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", name.encode())]})
        await send({"type": "http.response.body", "body": b""})

    return app


async def broken(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug")


def front(relay: ASGIApp | None = None) -> FrontDoor:
    tunnel = {"/tunnel/v1/poll": ("GET", named("poll")), "/tunnel/v1/reply": ("POST", named("reply"))}
    gets = ["/v1/models", "/v1/models/{model:path}", "/api/tags"]
    return FrontDoor(named("starlette"), relay or named("relay"), tunnel, local_gets=gets)


def call(app: ASGIApp, method: str, path: str) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": []}
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return sent


def handled_by(app: ASGIApp, method: str, path: str) -> str:
    return dict(call(app, method, path)[0]["headers"])[b"x-app"].decode()


@pytest.mark.parametrize(
    ("method", "path", "app"),
    [
        ("POST", "/v1/chat/completions", "relay"),
        ("GET", "/v1/responses/resp_1", "relay"),
        ("POST", "/v1/models", "relay"),  # only GET (and HEAD) is the broker's own
        ("GET", "/v1/models", "starlette"),
        ("HEAD", "/v1/models", "starlette"),
        ("GET", "/v1/models/some/model", "starlette"),
        ("GET", "/v1/models/", "starlette"),
        ("POST", "/api/chat", "relay"),
        ("GET", "/api/tags", "starlette"),
        ("GET", "/tunnel/v1/poll", "poll"),
        ("POST", "/tunnel/v1/reply", "reply"),
        ("GET", "/health", "starlette"),
        ("GET", "/admin", "starlette"),
        ("GET", "/v1", "starlette"),  # not below the prefix: Starlette's 404
    ],
)
def test_routing(method: str, path: str, app: str) -> None:
    assert handled_by(front(), method, path) == app


def test_a_tunnel_path_with_another_method_is_405_in_the_api_shape() -> None:
    start, body = call(front(), "POST", "/tunnel/v1/poll")
    assert start["status"] == 405
    assert json.loads(body["body"])["error"]["code"] == "method_not_allowed"


def test_a_bug_in_a_hot_handler_is_a_500_in_the_api_shape(caplog: pytest.LogCaptureFixture) -> None:
    start, body = call(front(relay=broken), "POST", "/v1/messages")
    assert start["status"] == 500
    error = json.loads(body["body"])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"  # Anthropic's shape, for its path
    assert "a bug" in caplog.text
