"""A broker that is not what it should be, for the connector's tests: ``hypercorn tests.hostile_broker:app``.

It registers any connector, sends the request frames listed (as JSON) in the file named by
HOSTILE_FRAMES on its first poll — forged targets, odd methods, repeated ids — then only
pings, and writes every frame the connector sends back to HOSTILE_SEEN, one JSON line each.
"""

import asyncio
import json
import os
from typing import Any

from wire import (
    FRAMES_CONTENT_TYPE,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    FrameDecoder,
    Ping,
    Request,
    Welcome,
    encode,
    encode_many,
)

_state = {"registrations": 0, "polls": 0}
_HEADERS = [(b"content-type", FRAMES_CONTENT_TYPE.encode())]


def _record(entry: dict[str, Any]) -> None:
    with open(os.environ["HOSTILE_SEEN"], "a") as seen:
        seen.write(json.dumps(entry) + "\n")


def _request(item: dict[str, Any]) -> Request:
    """A request frame from its JSON description (body: text)."""
    headers = [(str(k), str(v)) for k, v in item.get("headers", [])]
    body = item.get("body", "{}").encode()
    return Request(item["id"], item["method"], item["path"], item.get("query", ""), headers, body, "sk-llm-hostile")


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == REGISTER_PATH:
        await _body(receive)
        _state["registrations"] += 1
        _record({"event": "register"})
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": encode(Welcome("hostile-session", 30.0))})
    elif path == POLL_PATH:
        _state["polls"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        frames: list[Request | Ping] = [Ping(1.0)]
        if _state["polls"] == 1:
            with open(os.environ["HOSTILE_FRAMES"]) as listed:
                frames += [_request(item) for item in json.load(listed)]
        await send({"type": "http.response.body", "body": encode_many(frames), "more_body": True})
        while True:
            await asyncio.sleep(1)
            await send({"type": "http.response.body", "body": encode(Ping(1.0)), "more_body": True})
    elif path == REPLY_PATH:
        decoder = FrameDecoder()
        while True:
            message = await receive()
            for frame in decoder.feed(message.get("body", b"")):
                _record(
                    {
                        "event": "frame",
                        "kind": type(frame).__name__,
                        "id": getattr(frame, "id", None),
                        "error": getattr(frame, "error", None),
                        "status": getattr(frame, "status", None),
                    }
                )
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
