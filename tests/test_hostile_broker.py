"""A broker that is not the one it should be, against a real connector: reused request ids
and forged requests are refused with an error reply, and the tunnel stays up."""

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.support import Stack, fake_state, free_port, wait_until
from wire import (
    FRAMES_CONTENT_TYPE,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    Batch,
    End,
    Frame,
    FrameDecoder,
    Request,
    Welcome,
    encode,
    encode_many,
)

HOSTILE_REQUESTS = [
    Request(1, "POST", "/v1/chat/completions", "", [], b'{"model": "m"}'),
    Request(1, "POST", "/v1/chat/completions", "", [], b'{"model": "m"}'),  # the same id again
    Request(2, "POST", "/v1/../api/create", "", [], b"{}"),  # outside the forwarded API
    Request(2, "POST", "/v1/chat/completions", "", [], b"{}"),  # an id already used (refused)
    Request(3, "POST", "/v1/chat/completions", "", [], b'{"model": "m"}'),
]


class HostileBroker:
    """Registers anyone, sends the frames above on the first poll, records every reply."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replies: list[Frame] = []
        self.polls = 0
        self.registrations = 0
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _register(self, request: HTTPRequest) -> Response:
        self.registrations += 1
        return Response(encode(Welcome("hostile-session", 1.0)), media_type=FRAMES_CONTENT_TYPE)

    async def _poll(self, request: HTTPRequest) -> Response:
        self.polls += 1
        first = self.polls == 1

        async def frames() -> AsyncIterator[bytes]:
            yield encode_many([Batch(0, 0), *HOSTILE_REQUESTS]) if first else b""
            await asyncio.sleep(3600)

        return StreamingResponse(frames(), media_type=FRAMES_CONTENT_TYPE)

    async def _reply(self, request: HTTPRequest) -> Response:
        decoder = FrameDecoder()
        with contextlib.suppress(Exception):
            async for data in request.stream():
                self.replies += decoder.feed(data)
        return Response(status_code=204)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = Starlette(
            routes=[
                Route(REGISTER_PATH, self._register, methods=["POST"]),
                Route(POLL_PATH, self._poll, methods=["GET"]),
                Route(REPLY_PATH, self._reply, methods=["POST"]),
            ]
        )
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        await serve(app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

    def start(self) -> "HostileBroker":
        self._thread.start()
        wait_until(lambda: httpx.get(self.url + "/").status_code == 404, timeout=10, what="the hostile broker")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def ends(self) -> dict[int, list[End]]:
        found: dict[int, list[End]] = {}
        for frame in self.replies:
            if isinstance(frame, End):
                found.setdefault(frame.id, []).append(frame)
        return found


@pytest.fixture
def hostile() -> Iterator[HostileBroker]:
    broker = HostileBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


def test_reused_ids_and_forged_requests_are_refused_and_the_tunnel_stays_up(
    stack: Stack, hostile: HostileBroker
) -> None:
    llm = stack.llm("m")
    connector = stack.connector(hostile.url, "tok-any", llm, "m")
    wait_until(lambda: {1, 2, 3} <= hostile.ends().keys(), timeout=15, what="an End for each request")
    ends = hostile.ends()
    assert sorted(str(end.error) for end in ends[1]) == ["None", "refused"]  # ran once; its second coming refused
    assert sorted(str(end.error) for end in ends[2]) == ["forbidden", "refused"]
    assert [str(end.error) for end in ends[3]] == ["None"]
    assert fake_state(llm)["requests"] == 2  # requests 1 and 3, once each
    assert hostile.registrations == 1 and connector.alive  # the tunnel stayed up
