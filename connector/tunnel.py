"""The connector's side of the tunnel: register, hold the poll, answer each request.

Like cloudflared: long-lived outbound connections — one carries the poll, one the uplink
with every reply — and any failure means reconnect with exponential backoff and jitter,
forever; a drain lets the replies in flight finish first.
"""

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

import httpx

from connector import __version__
from connector.links import make_client, speaks_h2c
from connector.llm import Forbidden, LLMClient
from connector.settings import Settings
from connector.uplink import Uplink, UplinkError
from wire import (
    DEAD_AFTER_PINGS,
    FRAMES_CONTENT_TYPE,
    INITIAL_CREDIT,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    SHORT_POLL_QUERY,
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
)

log = logging.getLogger("remotellm.connector")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0  # a session that lasted this long resets the backoff
UPLOAD_GRACE = 10.0  # how long a finished reply may take to leave
DRAIN_TIMEOUT = 30.0  # how long replies in flight may run on when a session ends gracefully
POLLS_PER_LINK = 50  # a poll connection is replaced long before any server's request limit
FIRST_FRAME_TIMEOUT = 5.0  # the broker writes a poll's first frame at once
REGISTER_TIMEOUT = 10.0  # a path that accepts connections but never answers is retried soon
# Heartbeats unechoed this many ping intervals: uploads are held (the broker itself gives
# up on a silent connector after 3).
UNECHOED_PINGS = 1.5


class Refused(Exception):
    """The broker answered, and said no."""


class Buffered(Exception):
    """The path to the broker buffers responses: start over with short polls."""


@dataclass
class Status:
    """What the health endpoint reports."""

    connected: bool = False
    models: list[str] = field(default_factory=list)
    last_error: str = ""
    protocol: str = ""  # how the tunnel runs: "HTTP/2", "HTTP/1.1", "... with short polls"


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
        # How the path to the broker behaves; each flag only ever moves to the safe side.
        self.http2 = not settings.broker_url.startswith("http://") or speaks_h2c(settings)
        self.short_polls = False
        self.late_first_frames = 0
        self.stopping = False

    async def run(self) -> None:
        attempt = 0
        while not self.stopping:
            started = time.monotonic()
            session = None
            winding_down = False
            try:
                welcome, http2 = await self._register()
                session = self._current = _Session(self, welcome, http2)
                await session.serve()
                # The broker is draining: its replies finish in the background, we move on.
                task = asyncio.create_task(session.finish(DRAIN_TIMEOUT))
                winding_down = True
                self._winding_down.add(task)
                task.add_done_callback(self._winding_down.discard)
            except Refused as exc:
                self.status.last_error = str(exc)
                log.error("broker refused this connector: %s", exc)
            except Buffered:
                attempt = -1  # not a failure of the broker: come back at once
            except (httpx.HTTPError, FrameError, UplinkError, OSError) as exc:
                if self.stopping:  # the uplink was closed on purpose
                    return
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("tunnel down: %s", self.status.last_error)
            except Exception as exc:  # a bug must not end the connector: log it and reconnect
                self.status.last_error = f"internal error: {type(exc).__name__}"
                log.exception("tunnel failed unexpectedly")
            finally:
                self.status.connected = False
                self._current = None
                if session is not None and not winding_down and not self.stopping:
                    await session.abort()
            if self.stopping:
                return
            if time.monotonic() - started > STABLE_AFTER:
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def drain(self) -> None:
        """Graceful stop: the broker stops routing here, replies in flight finish (bounded)."""
        self.stopping = True
        session = self._current
        if session is not None:
            session.uplink.send(encode(Drain("connector shutting down")))
            await session.finish(DRAIN_TIMEOUT)
        if self._winding_down:
            await asyncio.wait(self._winding_down, timeout=DRAIN_TIMEOUT)

    async def _register(self) -> tuple[Welcome, bool]:
        """The session, and whether HTTP/2 carries it."""
        hello = Hello(self.connector_id, __version__, list(self.settings.models))
        try:
            async with make_client(self.settings, http2=self.http2, read_timeout=REGISTER_TIMEOUT) as client:
                response = await client.post(
                    self.settings.broker_url + REGISTER_PATH,
                    content=encode(hello),
                    headers={**self.auth, "content-type": FRAMES_CONTENT_TYPE},
                )
        except httpx.RemoteProtocolError:
            if self.http2 and self.settings.broker_url.startswith("http://"):
                log.warning("cleartext HTTP/2 refused on the way to the broker: falling back to HTTP/1.1")
                self.http2 = False
            raise
        if response.status_code != 200:
            raise Refused(f"register answered {response.status_code}: {_error_message(response)}")
        frames = decode_all(response.content)
        if len(frames) != 1 or not isinstance(frames[0], Welcome):
            raise FrameError("register did not answer with a Welcome frame")
        return frames[0], response.http_version == "HTTP/2"


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
    """One registration at the broker: its poll, its uplink, its requests in flight."""

    def __init__(self, tunnel: Tunnel, welcome: Welcome, http2: bool) -> None:
        self.tunnel = tunnel
        self.settings = tunnel.settings
        self.welcome = welcome
        self.http2 = http2
        self.headers = {**tunnel.auth, SESSION_HEADER: welcome.session}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.windows: dict[int, _Window] = {}
        self.drained = False
        self.last_ping = 0.0
        self.last_ping_at = time.monotonic()
        self.unechoed_since: float | None = None  # when the oldest Pong not yet echoed left
        self.unechoed_ping = 0.0
        self._uplink_client = make_client(self.settings, http2=http2, read_timeout=None)
        url = self.settings.broker_url + REPLY_PATH
        self.uplink = Uplink(self._uplink_client, url, self.headers, batching=tunnel.short_polls)
        self._uplink_task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        """Poll until the broker drains this session; raises when the tunnel breaks."""
        uplink = self._uplink_task = asyncio.create_task(self.uplink.run())
        polling = asyncio.create_task(self._poll_forever())
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await asyncio.wait((uplink, polling, heartbeat), return_when=asyncio.FIRST_COMPLETED)
            if not polling.done():
                polling.cancel()
                for failed in (heartbeat, uplink):
                    if failed.done():
                        failed.result()  # raises what broke it
                raise UplinkError("the uplink ended")
            polling.result()  # raises what broke it; returns once drained
        finally:
            polling.cancel()
            heartbeat.cancel()

    async def finish(self, timeout: float) -> None:
        """Let the replies in flight end (within ``timeout``), then close the connections."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout)
        self.uplink.close()
        if self._uplink_task is not None:
            await asyncio.wait([self._uplink_task], timeout=UPLOAD_GRACE)
        await self.abort()

    async def abort(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._uplink_task is not None:
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)
        await self._uplink_client.aclose()

    async def _poll_forever(self) -> None:
        timeout = DEAD_AFTER_PINGS * self.welcome.ping_interval
        while not self.drained:
            async with make_client(self.settings, http2=self.http2, read_timeout=timeout) as client:
                for _ in range(POLLS_PER_LINK):
                    if self.tunnel.short_polls:
                        await self._short_poll(client)
                    else:
                        await self._poll(client)
                    if self.drained:
                        return

    async def _heartbeat(self) -> None:
        """The broker's only sign of life from us on an idle tunnel (and it detects a freeze).

        The broker echoes each one at once; if none comes back for a while although the
        poll works, something holds our uploads until they end (a proxy buffering request
        bodies), and only short POSTs get through.
        """
        interval = self.welcome.ping_interval
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            waiting = self.unechoed_since
            # Held, not dead: the poll still brings pings (a dead path brings nothing).
            poll_alive = now - self.last_ping_at < UNECHOED_PINGS * interval
            held = waiting is not None and now - waiting > UNECHOED_PINGS * interval and poll_alive
            if held and not self.tunnel.short_polls:
                self.tunnel.short_polls = True
                log.warning("uploads to the broker arrive only when they end (a buffering proxy?): "
                            "switching to short polls and batched replies")  # fmt: skip
                raise Buffered
            if waiting is None:
                self.unechoed_since = time.monotonic()
                self.unechoed_ping = self.last_ping
            self.uplink.send(encode(Pong(self.last_ping)))

    async def _poll(self, client: httpx.AsyncClient) -> None:
        """One streaming poll, read to its end; raises if it breaks.

        The broker writes a first frame at once; if none arrives in time, something on the
        way holds responses until they end (a buffering proxy), and only short polls work.
        """
        url = self.settings.broker_url + POLL_PATH
        # Sooner than the poll's read timeout and the broker's heartbeat deadline (3 pings).
        first_frame_timeout = max(1.0, min(FIRST_FRAME_TIMEOUT, self.welcome.ping_interval))
        try:
            async with asyncio.timeout(first_frame_timeout) as first_frame:
                async with client.stream("GET", url, headers=self.headers) as response:
                    if response.status_code != 200:
                        await response.aread()  # the error message is in the body
                    self._check(response)
                    decoder = FrameDecoder()
                    async for data in response.aiter_raw():
                        frames = decoder.feed(data)
                        if frames and first_frame.when() is not None:
                            first_frame.reschedule(None)
                            self.tunnel.late_first_frames = 0
                        for frame in frames:
                            self._dispatch(frame)
                    decoder.finish()
        except TimeoutError:
            if not first_frame.expired():
                raise
            # Twice in a row, not once: a slow connect or TLS handshake looks the same.
            self.tunnel.late_first_frames += 1
            if self.tunnel.late_first_frames < 2:
                raise httpx.ReadTimeout("no frame from the broker in time") from None
            self.tunnel.short_polls = True
            log.warning("responses from the broker arrive only when they end (a buffering proxy?): "
                        "switching to short polls")  # fmt: skip
            raise Buffered from None

    async def _short_poll(self, client: httpx.AsyncClient) -> None:
        """One poll that the broker ends as soon as it has frames to deliver."""
        url = f"{self.settings.broker_url}{POLL_PATH}?{SHORT_POLL_QUERY}"
        response = await client.get(url, headers=self.headers)
        self._check(response)
        for frame in decode_all(response.content):
            self._dispatch(frame)

    def _check(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise Refused(f"poll answered {response.status_code}: {_error_message(response)}")
        status = self.tunnel.status
        if not status.connected:
            mode = " with short polls" if self.tunnel.short_polls else ""
            status.protocol = response.http_version + mode
            log.info("tunnel up (%s) to %s", status.protocol, self.settings.public_broker_url)
        status.connected = True
        status.last_error = ""

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
            self.last_ping_at = time.monotonic()
            if self.unechoed_since is not None and frame.pong >= self.unechoed_ping:
                self.unechoed_since = None
        elif isinstance(frame, Models):
            self.tunnel.status.models = frame.models
            log.info("serving models: %s", ", ".join(frame.models) or "none")
        elif isinstance(frame, Drain):
            log.info("broker asks to drain: %s", frame.reason)
            self.drained = True

    async def _serve(self, request: Request) -> None:
        """Replay one request on the LLM; its reply frames leave on the uplink."""
        window = self.windows[request.id] = _Window()
        try:
            await self._call_llm(request, window)
        except asyncio.CancelledError:
            self.uplink.send(encode(End(request.id, "cancelled")))
        finally:
            del self.windows[request.id]

    async def _call_llm(self, request: Request, window: _Window) -> None:
        send = self.uplink.send
        error: ErrorKind | None = None
        detail = ""
        started = time.perf_counter()
        try:
            async with self.tunnel.llm.stream(request) as response:
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
                llm_ms = (time.perf_counter() - started) * 1000
                send(encode(Head(request.id, response.status_code, raw, llm_ms)))
                async for data in response.aiter_raw():
                    await window.spend(len(data))
                    send(encode(Chunk(request.id, data)))
        except Forbidden as exc:
            error, detail = "forbidden", str(exc)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error, detail = "llm_unreachable", type(exc).__name__
        except httpx.HTTPError as exc:
            error, detail = "llm_failed", type(exc).__name__
        except Exception as exc:  # a bug, or a request httpx cannot express: say so, never go silent
            log.exception("request %d failed", request.id)
            error, detail = "internal", type(exc).__name__
        send(encode(End(request.id, error, detail)))
        if error:
            log.warning("request %d: %s (%s)", request.id, error, detail)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase
