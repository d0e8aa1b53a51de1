"""The connector's side of the tunnel: register, hold the poll, answer each request.

Like cloudflared: one long-lived outbound connection carries the poll, replies are
streams multiplexed on a few more, and any failure means reconnect with exponential
backoff and jitter, forever.
"""

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from connector import __version__
from connector.links import Link, LinkPool, make_client
from connector.llm import LLMClient
from connector.settings import Settings
from wire import (
    FRAMES_CONTENT_TYPE,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    Cancel,
    Chunk,
    Drain,
    End,
    ErrorKind,
    Frame,
    FrameDecoder,
    FrameError,
    Head,
    Hello,
    Models,
    Request,
    Welcome,
    encode,
)

log = logging.getLogger("remotellm.connector")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0  # a session that lasted this long resets the backoff
MISSED_PINGS = 3  # a poll silent for this many ping intervals is dead
UPLOAD_GRACE = 10.0  # how long a finished reply may take to leave


class Refused(Exception):
    """The broker answered, and said no."""


@dataclass
class Status:
    """What the health endpoint reports."""

    connected: bool = False
    models: list[str] = field(default_factory=list)
    last_error: str = ""


def backoff_delay(attempt: int) -> float:
    """Full jitter: a crowd of connectors does not reconnect in step after a broker restart."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


class Tunnel:
    def __init__(self, settings: Settings, llm: LLMClient, status: Status) -> None:
        self.settings = settings
        self.llm = llm
        self.status = status
        self.connector_id = uuid.uuid4().hex
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._auth = {"authorization": f"Bearer {settings.token}"}

    async def run(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except Refused as exc:
                self.status.last_error = str(exc)
                log.error("broker refused this connector: %s", exc)
            except (httpx.HTTPError, FrameError, OSError) as exc:
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("tunnel down: %s", self.status.last_error)
            self.status.connected = False
            if time.monotonic() - started > STABLE_AFTER:
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        links = LinkPool(self.settings)
        try:
            welcome = await self._register()
            headers = {**self._auth, SESSION_HEADER: welcome.session}
            timeout = MISSED_PINGS * welcome.ping_interval
            while True:
                async with make_client(self.settings, read_timeout=timeout) as client:
                    for _ in range(50):  # polls per connection, far below any server limit
                        await self._poll(client, headers, links)
        finally:
            self.status.connected = False
            for task in list(self._tasks.values()):
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await links.aclose()

    async def _register(self) -> Welcome:
        hello = Hello(self.connector_id, __version__, list(self.settings.models))
        async with make_client(self.settings, read_timeout=30.0) as client:
            response = await client.post(
                self.settings.broker_url + REGISTER_PATH,
                content=encode(hello),
                headers={**self._auth, "content-type": FRAMES_CONTENT_TYPE},
            )
        if response.status_code != 200:
            raise Refused(f"register answered {response.status_code}: {_error_message(response)}")
        frames = FrameDecoder().feed(response.content)
        if len(frames) != 1 or not isinstance(frames[0], Welcome):
            raise FrameError("register did not answer with a Welcome frame")
        return frames[0]

    async def _poll(self, client: httpx.AsyncClient, headers: dict[str, str], links: LinkPool) -> None:
        """One poll response, read to its end; raises if it breaks."""
        async with client.stream("GET", self.settings.broker_url + POLL_PATH, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise Refused(f"poll answered {response.status_code}: {_error_message(response)}")
            if not self.status.connected:
                log.info("tunnel up (%s) to %s", response.http_version, self.settings.broker_url)
            self.status.connected = True
            self.status.last_error = ""
            decoder = FrameDecoder()
            async for data in response.aiter_raw():
                for frame in decoder.feed(data):
                    self._dispatch(frame, headers, links)
            if decoder.pending:
                raise FrameError("the poll ended inside a frame")

    def _dispatch(self, frame: Frame, headers: dict[str, str], links: LinkPool) -> None:
        if isinstance(frame, Request):
            task = asyncio.create_task(self._serve(frame, headers, links))
            self._tasks[frame.id] = task
            task.add_done_callback(lambda _: self._tasks.pop(frame.id, None))
        elif isinstance(frame, Cancel):
            cancelled = self._tasks.get(frame.id)
            if cancelled is not None:
                cancelled.cancel()
        elif isinstance(frame, Models):
            self.status.models = frame.models
            log.info("serving models: %s", ", ".join(frame.models) or "none")
        elif isinstance(frame, Drain):
            log.info("broker asks to drain: %s", frame.reason)
        # Ping: its arrival is all that matters (it keeps the read timeout from firing).

    async def _serve(self, request: Request, headers: dict[str, str], links: LinkPool) -> None:
        """Replay one request on the LLM; stream its answer back on a reply POST."""
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        link = links.acquire()
        upload = asyncio.create_task(self._upload(link, headers, outbox))
        try:
            await self._call_llm(request, outbox)
        except asyncio.CancelledError:
            outbox.put_nowait(encode(End(request.id, "cancelled")))
        finally:
            outbox.put_nowait(None)
            try:
                await asyncio.wait_for(upload, UPLOAD_GRACE)
            except (TimeoutError, httpx.HTTPError, OSError) as exc:
                log.debug("reply %d was not delivered: %r", request.id, exc)
            await links.release(link)

    async def _call_llm(self, request: Request, outbox: "asyncio.Queue[bytes | None]") -> None:
        error: ErrorKind | None = None
        detail = ""
        started = time.perf_counter()
        try:
            async with self.llm.stream(request) as response:
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
                llm_ms = (time.perf_counter() - started) * 1000
                outbox.put_nowait(encode(Head(request.id, response.status_code, raw, llm_ms)))
                async for data in response.aiter_raw():
                    outbox.put_nowait(encode(Chunk(request.id, data)))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error, detail = "llm_unreachable", type(exc).__name__
        except httpx.HTTPError as exc:
            error, detail = "llm_failed", type(exc).__name__
        outbox.put_nowait(encode(End(request.id, error, detail)))
        if error:
            log.warning("request %d: %s (%s)", request.id, error, detail)

    async def _upload(self, link: Link, headers: dict[str, str], outbox: "asyncio.Queue[bytes | None]") -> None:
        async def body() -> AsyncIterator[bytes]:
            while True:
                parts = [await outbox.get()]
                while not outbox.empty():  # whatever is ready leaves in one write
                    parts.append(outbox.get_nowait())
                done = parts[-1] is None
                yield b"".join(part for part in parts if part is not None)
                if done:
                    return

        response = await link.client.post(
            self.settings.broker_url + REPLY_PATH,
            content=body(),
            headers={**headers, "content-type": FRAMES_CONTENT_TYPE},
        )
        if response.status_code >= 300:
            log.warning("broker refused a reply: %s", response.status_code)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase
