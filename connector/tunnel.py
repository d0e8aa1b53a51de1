"""The connector's side of the tunnel: register, hold the poll, answer each request.

Like cloudflared: one long-lived outbound connection carries the poll, replies are
streams multiplexed on a few more, and any failure means reconnect with exponential
backoff and jitter, forever.
"""

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from connector import __version__
from connector.links import LinkPool, make_client
from connector.llm import LLMClient
from connector.settings import Settings
from wire import (
    FRAMES_CONTENT_TYPE,
    INITIAL_CREDIT,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    Cancel,
    Chunk,
    Credit,
    Drain,
    End,
    ErrorKind,
    Frame,
    FrameDecoder,
    FrameError,
    Head,
    Hello,
    Models,
    Ping,
    Pong,
    Request,
    Welcome,
    decode_all,
    encode,
    encode_many,
)

log = logging.getLogger("remotellm.connector")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0  # a session that lasted this long resets the backoff
MISSED_PINGS = 3  # a poll silent for this many ping intervals is dead
UPLOAD_GRACE = 10.0  # how long a finished reply may take to leave
DRAIN_TIMEOUT = 30.0  # how long replies in flight may run on when a session ends gracefully
POLLS_PER_LINK = 50  # a poll connection is replaced long before any server's request limit


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
    """Registers, serves a session until it ends, and starts over — until stopped."""

    def __init__(self, settings: Settings, llm: LLMClient, status: Status) -> None:
        self.settings = settings
        self.llm = llm
        self.status = status
        self.connector_id = uuid.uuid4().hex
        self.auth = {"authorization": f"Bearer {settings.token}"}
        self._current: _Session | None = None
        self._winding_down: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            session = None
            try:
                session = self._current = _Session(self, await self._register())
                await session.serve()
                # The broker is draining: its replies finish in the background, we move on.
                task = asyncio.create_task(session.finish(DRAIN_TIMEOUT))
                self._winding_down.add(task)
                task.add_done_callback(self._winding_down.discard)
            except Refused as exc:
                self.status.last_error = str(exc)
                log.error("broker refused this connector: %s", exc)
            except (httpx.HTTPError, FrameError, OSError) as exc:
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("tunnel down: %s", self.status.last_error)
            except Exception as exc:  # a bug must not end the connector: log it and reconnect
                self.status.last_error = f"internal error: {type(exc).__name__}"
                log.exception("tunnel failed unexpectedly")
            finally:
                self.status.connected = False
                self._current = None
                if session is not None and not session.drained:
                    await session.abort()
            if time.monotonic() - started > STABLE_AFTER:
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def drain(self) -> None:
        """Graceful stop: the broker stops routing here, replies in flight finish (bounded)."""
        session = self._current
        if session is not None:
            with contextlib.suppress(httpx.HTTPError, OSError):
                await session.send_frames(Drain("connector shutting down"))
            await session.finish(DRAIN_TIMEOUT)
        if self._winding_down:
            await asyncio.wait(self._winding_down, timeout=DRAIN_TIMEOUT)

    async def _register(self) -> Welcome:
        hello = Hello(self.connector_id, __version__, list(self.settings.models))
        async with make_client(self.settings, read_timeout=30.0) as client:
            response = await client.post(
                self.settings.broker_url + REGISTER_PATH,
                content=encode(hello),
                headers={**self.auth, "content-type": FRAMES_CONTENT_TYPE},
            )
        if response.status_code != 200:
            raise Refused(f"register answered {response.status_code}: {_error_message(response)}")
        frames = decode_all(response.content)
        if len(frames) != 1 or not isinstance(frames[0], Welcome):
            raise FrameError("register did not answer with a Welcome frame")
        return frames[0]


class _Window:
    """Per-request credit: how much more reply body the broker will take."""

    __slots__ = ("_more", "available")

    def __init__(self) -> None:
        self.available = INITIAL_CREDIT
        self._more = asyncio.Event()

    async def spend(self, size: int) -> None:
        while self.available <= 0:
            self._more.clear()
            await self._more.wait()
        self.available -= size

    def grant(self, size: int) -> None:
        self.available += size
        self._more.set()


class _Session:
    """One registration at the broker: its poll, its replies in flight, their connections."""

    def __init__(self, tunnel: Tunnel, welcome: Welcome) -> None:
        self.tunnel = tunnel
        self.settings = tunnel.settings
        self.welcome = welcome
        self.headers = {**tunnel.auth, SESSION_HEADER: welcome.session}
        self.links = LinkPool(tunnel.settings)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.windows: dict[int, _Window] = {}
        self.drained = False
        self.last_ping = 0.0

    async def serve(self) -> None:
        """Poll until the broker drains this session; raises when the tunnel breaks."""
        heartbeat = asyncio.create_task(self._heartbeat())
        timeout = MISSED_PINGS * self.welcome.ping_interval
        try:
            while not self.drained:
                async with make_client(self.settings, read_timeout=timeout) as client:
                    for _ in range(POLLS_PER_LINK):
                        await self._poll(client)
                        if self.drained:
                            break
        finally:
            heartbeat.cancel()

    async def finish(self, timeout: float) -> None:
        """Let the replies in flight end (within ``timeout``), then close the connections."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout)
        await self.abort()

    async def abort(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.links.aclose()

    async def send_frames(self, *frames: Frame) -> None:
        """A short reply body of its own: a heartbeat or a goodbye."""
        link = await self.links.acquire()
        try:
            await link.client.post(
                self.settings.broker_url + REPLY_PATH,
                content=encode_many(frames),
                headers={**self.headers, "content-type": FRAMES_CONTENT_TYPE},
            )
        finally:
            await self.links.release(link)

    async def _heartbeat(self) -> None:
        """The broker's only sign of life from us on an idle tunnel (and it detects a freeze)."""
        while True:
            await asyncio.sleep(self.welcome.ping_interval)
            with contextlib.suppress(httpx.HTTPError, OSError):
                await self.send_frames(Pong(self.last_ping))

    async def _poll(self, client: httpx.AsyncClient) -> None:
        """One poll response, read to its end; raises if it breaks."""
        status = self.tunnel.status
        url = self.settings.broker_url + POLL_PATH
        async with client.stream("GET", url, headers=self.headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise Refused(f"poll answered {response.status_code}: {_error_message(response)}")
            if not status.connected:
                log.info("tunnel up (%s) to %s", response.http_version, self.settings.broker_url)
            status.connected = True
            status.last_error = ""
            decoder = FrameDecoder()
            async for data in response.aiter_raw():
                for frame in decoder.feed(data):
                    self._dispatch(frame)
            decoder.finish()

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Request):
            task = asyncio.create_task(self._serve(frame))
            self.tasks[frame.id] = task
            task.add_done_callback(lambda _: self.tasks.pop(frame.id, None))
        elif isinstance(frame, Credit):
            window = self.windows.get(frame.id)
            if window is not None:
                window.grant(frame.bytes)
        elif isinstance(frame, Cancel):
            cancelled = self.tasks.get(frame.id)
            if cancelled is not None:
                cancelled.cancel()
        elif isinstance(frame, Ping):
            self.last_ping = frame.sent
        elif isinstance(frame, Models):
            self.tunnel.status.models = frame.models
            log.info("serving models: %s", ", ".join(frame.models) or "none")
        elif isinstance(frame, Drain):
            log.info("broker asks to drain: %s", frame.reason)
            self.drained = True

    async def _serve(self, request: Request) -> None:
        """Replay one request on the LLM; stream its answer back on a reply POST."""
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        window = self.windows[request.id] = _Window()
        upload = asyncio.create_task(self._upload(outbox))
        try:
            await self._call_llm(request, outbox, window)
        except asyncio.CancelledError:
            outbox.put_nowait(encode(End(request.id, "cancelled")))
        finally:
            del self.windows[request.id]
            outbox.put_nowait(None)
            try:
                await asyncio.wait_for(upload, UPLOAD_GRACE)
            except (TimeoutError, httpx.HTTPError, OSError) as exc:
                log.debug("reply %d was not delivered: %r", request.id, exc)

    async def _call_llm(self, request: Request, outbox: "asyncio.Queue[bytes | None]", window: _Window) -> None:
        error: ErrorKind | None = None
        detail = ""
        started = time.perf_counter()
        try:
            async with self.tunnel.llm.stream(request) as response:
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
                llm_ms = (time.perf_counter() - started) * 1000
                outbox.put_nowait(encode(Head(request.id, response.status_code, raw, llm_ms)))
                async for data in response.aiter_raw():
                    await window.spend(len(data))
                    outbox.put_nowait(encode(Chunk(request.id, data)))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error, detail = "llm_unreachable", type(exc).__name__
        except httpx.HTTPError as exc:
            error, detail = "llm_failed", type(exc).__name__
        outbox.put_nowait(encode(End(request.id, error, detail)))
        if error:
            log.warning("request %d: %s (%s)", request.id, error, detail)

    async def _upload(self, outbox: "asyncio.Queue[bytes | None]") -> None:
        async def body() -> AsyncIterator[bytes]:
            while True:
                parts = [await outbox.get()]
                while not outbox.empty():  # whatever is ready leaves in one write
                    parts.append(outbox.get_nowait())
                done = parts[-1] is None
                yield b"".join(part for part in parts if part is not None)
                if done:
                    return

        link = await self.links.acquire()
        try:
            response = await link.client.post(
                self.settings.broker_url + REPLY_PATH,
                content=body(),
                headers={**self.headers, "content-type": FRAMES_CONTENT_TYPE},
            )
        finally:
            await self.links.release(link)
        if response.status_code >= 300:
            log.warning("broker refused a reply: %s", response.status_code)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase
