"""One session at the broker, as the connector holds it: the I/O around its
ConnectorConnection state machine.

The poll brings the broker's frames, the uplink carries ours, and each request runs as
its own task against the LLM. A poll or an uplink that breaks is opened again on the same
session — the state machine sends again whatever the other side did not acknowledge — for
as long as the broker's resume grace allows; only then is the session lost.
"""

import asyncio
import logging
import time
from collections import ChainMap
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field

import httpx
import msgspec

from connector.links import make_client
from connector.llm import Forbidden, LLMClient, body_of
from connector.pacing import StartPacer
from connector.path import PathProfile
from connector.pinning import MISDIRECT_ATTEMPTS, Misdirected, check_pinned, probe_uplink
from connector.rotation import Rotation
from connector.settings import Settings
from connector.slots import SlotCounter
from connector.uplink import UplinkError, upload
from connector.usage_meter import UsageMeter, prepare
from wire import (
    ACK_DELAY,
    DEAD_AFTER_PINGS,
    MISDIRECTED,
    POLL_PATH,
    RECEIVED_HEADER,
    REPLY_PATH,
    SESSION_HEADER,
    SHORT_POLL_QUERY,
    Body,
    Brokers,
    Cancel,
    Capacity,
    Coalescer,
    ConnectorConnection,
    Credit,
    Drain,
    ErrorKind,
    Frame,
    Inbound,
    Limits,
    Models,
    Ping,
    ProtocolError,
    Request,
    Welcome,
)
from wire.endpoints import ROTATE_HEADER

log = logging.getLogger("remotellm.connector")

POLLS_PER_LINK = 50  # a poll connection is replaced long before any server's request limit
FIRST_FRAME_TIMEOUT = 5.0  # the broker writes a poll's first frame at once
RETRY_DELAY = 0.5  # between attempts to open a lost poll or uplink again
UPLOAD_GRACE = 10.0  # how long a finished reply may take to leave
# Heartbeats unechoed this many ping intervals: uploads are held (the broker itself gives
# up on a silent connector after 3).
UNECHOED_PINGS = 1.5


class Refused(Exception):
    """The broker answered, and said no."""


class SessionLost(Exception):
    """The broker no longer knows the session (or the grace ran out): register again."""


@dataclass
class Status:
    """What the health endpoint reports."""

    connected: bool = False
    models: list[str] = field(default_factory=list)
    last_error: str = ""
    protocol: str = ""  # how the tunnel runs: "HTTP/2", "HTTP/1.1", "... with short polls"


class Session:
    """One registration at the broker: its poll, its uplink, its requests in flight."""

    def __init__(
        self,
        settings: Settings,
        llm: LLMClient,
        status: Status,
        path: PathProfile,
        auth: MutableMapping[str, str],
        welcome: Welcome,
        slots: SlotCounter,
        on_brokers: Callable[[list[tuple[str, str]]], None] | None = None,
        rotation: Rotation | None = None,
    ) -> None:
        self.settings = settings
        self.on_brokers = on_brokers  # who hears the broker's lists of brokers
        self.llm = llm
        self.status = status
        self.path = path
        self.welcome = welcome
        self.rotation = rotation
        self.headers = ChainMap({SESSION_HEADER: welcome.session}, auth)  # (auth: live, see Rotation)
        self.conn = ConnectorConnection(Limits(max_streams=settings.max_requests))
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._pacer = StartPacer()  # a burst of requests starts a few per loop turn
        self._credit: dict[int, asyncio.Event] = {}  # requests waiting for the broker's Credit
        self._bodies: dict[int, asyncio.Queue[Body]] = {}  # streamed bodies (within our credit)
        self._wake = asyncio.Event()  # frames (or an acknowledgement) for the uplink
        self._restart_uplink = asyncio.Event()
        self._coalescer = Coalescer()
        self._ack_by: float | None = None  # when an acknowledgement owed must leave
        self.closing = False  # no more uplinks once what is queued has left
        self.drained = False
        self._lost_since: float | None = None
        self.last_heard = time.monotonic()  # the poll's last bytes
        self._unechoed_since: float | None = None  # when the oldest Pong not yet echoed left
        self._unechoed_ping = 0.0
        self._uplink_task: asyncio.Task[None] | None = None
        self.slots = slots  # shared by every session of this connector
        self._slots_told: int | None = None  # the free slots this broker last heard
        self._slots_pending = False  # a report of the free slots is scheduled
        self._holding: set[int] = set()  # requests holding a slot
        slots.watch(self, self._slots_changed)

    # --- running ------------------------------------------------------------

    async def serve(self) -> None:
        """Poll until the broker drains this session; raises SessionLost, Refused, or
        ProtocolError when it cannot go on."""
        uplink = self._uplink_task = asyncio.create_task(self._uplink_forever())
        polling = asyncio.create_task(self._poll_forever())
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await asyncio.wait((uplink, polling, heartbeat), return_when=asyncio.FIRST_COMPLETED)
            for task in (heartbeat, uplink, polling):
                if task.done():
                    task.result()  # raises what ended it
            if polling.done():
                polling.result()  # drained (else the uplink closed: finish() ended the session)
        finally:
            polling.cancel()
            heartbeat.cancel()

    def drain(self, reason: str) -> None:
        """This connector is leaving: the broker routes nothing new here."""
        self.conn.drain(reason)
        self._wake.set()

    async def finish(self, timeout: float) -> None:
        """Let the replies in flight end (within ``timeout``), then close the connections."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout)
        self.closing = True
        self._wake.set()
        if self._uplink_task is not None:
            await asyncio.wait([self._uplink_task], timeout=UPLOAD_GRACE)
        await self.abort()

    async def abort(self) -> None:
        self.slots.forget(self)
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._uplink_task is not None:
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)

    def _trouble(self, what: str, exc: BaseException) -> None:
        """A poll or an uplink broke: try again, unless the grace to resume has run out."""
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        elif now - self._lost_since > self.welcome.resume_grace:
            raise SessionLost(f"{what} lost for longer than the resume grace") from exc
        self.status.connected = False
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("tunnel down (%s lost: %s): resuming the session", what, self.status.last_error)

    # --- the poll --------------------------------------------------------------

    async def _poll_forever(self) -> None:
        timeout = DEAD_AFTER_PINGS * self.welcome.ping_interval
        misses = 0
        while not self.drained:
            try:
                async with make_client(self.settings, http2=self.path.http2, read_timeout=timeout) as client:
                    for _ in range(POLLS_PER_LINK):
                        if self.path.buffering:
                            await self._short_poll(client)
                        else:
                            await self._poll(client)
                        if self.drained:
                            return
            except Misdirected as exc:  # another broker: a new connection, at once a few times
                misses += 1
                if misses % MISDIRECT_ATTEMPTS == 0:
                    self._trouble("poll", exc)
                    await asyncio.sleep(RETRY_DELAY)
            except (httpx.HTTPError, OSError, TimeoutError) as exc:
                self._trouble("poll", exc)
                self._restart_uplink.set()  # what broke the poll most likely broke the uplink
                await asyncio.sleep(RETRY_DELAY)

    async def _poll(self, client: httpx.AsyncClient) -> None:
        """One streaming poll, read to its end; raises if it breaks.

        The broker writes a first frame at once; if none arrives in time, something on the
        way holds responses until they end (a buffering proxy), and only short polls work.
        """
        url = self.settings.broker_url + POLL_PATH
        # Sooner than the poll's read timeout and the broker's heartbeat deadline (3 pings).
        first_frame_timeout = max(1.0, min(FIRST_FRAME_TIMEOUT, self.welcome.ping_interval))
        headers = {**self.headers, RECEIVED_HEADER: str(self.conn.received)}
        try:
            async with asyncio.timeout(first_frame_timeout) as first_frame:
                async with client.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()  # the error message is in the body
                    self._check(response)
                    reader = self.conn.inbound()
                    async for data in response.aiter_raw():
                        if first_frame.when() is not None:
                            first_frame.reschedule(None)
                            self.path.observe_first_frame()
                        self._feed(reader, data)
                        if self.path.buffering:
                            return  # short polls from now on (what this one still had comes again)
                    reader.finish()
        except TimeoutError:
            if not first_frame.expired():
                raise
            if not self.path.observe_late_first_frame():
                raise httpx.ReadTimeout("no frame from the broker in time") from None
            self._restart_uplink.set()  # an upload through the same proxy is held too

    async def _short_poll(self, client: httpx.AsyncClient) -> None:
        """One poll that the broker ends as soon as it has frames to deliver."""
        url = f"{self.settings.broker_url}{POLL_PATH}?{SHORT_POLL_QUERY}"
        headers = {**self.headers, RECEIVED_HEADER: str(self.conn.received)}
        response = await client.get(url, headers=headers)
        self._check(response)
        reader = self.conn.inbound()
        self._feed(reader, response.content)
        reader.finish()

    def _check(self, response: httpx.Response) -> None:
        check_pinned(response)
        if response.status_code == 401:
            raise SessionLost(f"the broker answered a poll with 401: {error_message(response)}")
        if response.status_code != 200:
            raise Refused(f"poll answered {response.status_code}: {error_message(response)}")
        if response.headers.get(ROTATE_HEADER) and self.rotation is not None:
            self.rotation.requested()
        self._lost_since = None
        status = self.status
        protocol = self.path.describe(response.http_version)
        if not status.connected or protocol != status.protocol:
            status.protocol = protocol
            log.info("tunnel up (%s) to %s", status.protocol, self.settings.public_broker_url)
        status.connected = True
        status.last_error = ""

    def _feed(self, reader: Inbound, data: bytes) -> None:
        """The broker's frames, each to what handles it. A bad request fails alone; a
        ProtocolError of the whole session propagates."""
        self.last_heard = time.monotonic()
        owed = self.conn.ack_owed
        reader.feed_each(data, self._dispatch, self._violated)
        if self.conn.wants_write or (self.conn.ack_owed and not owed):
            self._wake.set()

    def _violated(self, exc: ProtocolError) -> None:
        assert exc.request_id is not None
        log.warning("the broker broke the protocol: %s", exc)
        self._cancel(exc.request_id)

    def _dispatch(self, frame: Frame) -> None:
        kind = type(frame)
        if kind is Request:
            self._start(frame)  # type: ignore[arg-type]
        elif kind is Credit:
            waiting = self._credit.get(frame.id)  # type: ignore[union-attr]
            if waiting is not None:
                waiting.set()
        elif kind is Body:
            body = self._bodies.get(frame.id)  # type: ignore[union-attr]
            if body is not None:
                body.put_nowait(frame)  # type: ignore[arg-type]
        elif kind is Cancel:
            self._cancel(frame.id)  # type: ignore[union-attr]
        elif kind is Ping:
            if self._unechoed_since is not None and frame.pong >= self._unechoed_ping:  # type: ignore[union-attr]
                self._unechoed_since = None
        elif kind is Models:
            self.status.models = frame.models  # type: ignore[union-attr]
            log.info("serving models: %s", ", ".join(frame.models) or "none")  # type: ignore[union-attr]
        elif kind is Drain:
            log.info("broker asks to drain: %s", frame.reason)  # type: ignore[union-attr]
            self.drained = True
        elif kind is Brokers and self.on_brokers is not None:
            self.on_brokers(frame.brokers)  # type: ignore[union-attr]
        elif kind is Capacity:
            self.slots.cap(self, frame.max_concurrent)  # type: ignore[union-attr]

    def _slots_changed(self) -> None:
        """The free slots changed: this broker hears the new number once this turn's changes are done."""
        if not self._slots_pending:
            self._slots_pending = True
            asyncio.get_running_loop().call_soon(self._tell_slots)

    def _tell_slots(self) -> None:
        """More room leaves at once (requests may wait for it). Less room leaves with the next
        write (ready_now), which is soon the request's Head: queued now, it would make a write
        of its own, and the Head would wait the coalescing window behind it."""
        self._slots_pending = False
        told = self._slots_told
        if self._queue_slots(lambda free: told is None or free > told):
            self._wake.set()

    def _queue_slots(self, when: Callable[[int], bool] = lambda free: True) -> bool:
        """Queue a report of the free slots if they changed since the last (and ``when`` agrees)."""
        free = self.slots.free
        if free is None or free == self._slots_told or not self.slots.capped_by(self) or self.closing:
            return False
        if not when(free):
            return False
        self._slots_told = free
        try:
            self.conn.slots(free)
        except ProtocolError as exc:  # the broker acknowledges nothing: the session is ending anyway
            log.warning("free slots not reported: %s", exc)
            return False
        return True

    # --- the uplink ----------------------------------------------------------------

    async def _uplink_forever(self) -> None:
        """Uplinks, one after another, until the session closes; each new one starts by
        sending again what the broker has not acknowledged."""
        url = self.settings.broker_url + REPLY_PATH
        misses = 0
        probing = True  # until the balancer turns out to pick per request, not per connection
        # Closing, what is not acknowledged still goes out (a Drain above all), within finish()'s grace.
        while not self.closing or self.conn.wants_write:
            self._restart_uplink.clear()
            probed = False
            try:
                async with make_client(self.settings, http2=self.path.http2, read_timeout=None) as client:
                    probed = probing and await probe_uplink(client, self.settings.broker_url, self.headers)
                    if await self._upload_once(client, url):
                        return  # closed on purpose, everything sent
            except Misdirected as exc:  # another broker: a new connection, at once a few times
                probing = probing and not probed  # the probe's connection did not hold: per request
                misses += 1
                if misses % MISDIRECT_ATTEMPTS:
                    self.conn.rewind()
                    continue
                self._trouble("uplink", exc)
            except (httpx.HTTPError, OSError) as exc:
                self._trouble("uplink", exc)
            self.conn.rewind()
            await asyncio.sleep(RETRY_DELAY)

    async def _upload_once(self, client: httpx.AsyncClient, url: str) -> bool:
        """One uplink until it ends (True: closed on purpose, all sent) or is restarted on
        purpose (False); raises what broke it."""
        attempt = asyncio.ensure_future(upload(client, url, self.headers, self, batching=self.path.buffering))
        restart = asyncio.ensure_future(self._restart_uplink.wait())
        try:
            await asyncio.wait((attempt, restart), return_when=asyncio.FIRST_COMPLETED)
        finally:
            restart.cancel()
            if not attempt.done():  # restarted on purpose (or the session ends)
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
        if attempt.cancelled():
            return False
        try:
            attempt.result()
        except UplinkError as exc:
            if exc.status == 401:
                raise SessionLost("the broker no longer knows this session") from exc
            if exc.status == MISDIRECTED:  # a balancer that picks per request
                raise Misdirected("an uplink reached another broker") from exc
            raise
        return True

    async def next_write(self) -> bytes | None:
        """The next write for the uplink: frames as soon as there are any, an
        acknowledgement alone a little later; None once closing and all is sent."""
        conn = self.conn
        while not conn.wants_write:
            if self.closing:
                return None
            if not conn.ack_owed:
                self._ack_by = None
                await self._wait(None)
                continue
            if self._ack_by is None:
                self._ack_by = time.monotonic() + ACK_DELAY
            if not await self._wait(self._ack_by - time.monotonic()):
                break  # an acknowledgement alone, now
        delay = self._coalescer.delay(time.monotonic())
        if delay:  # close behind the last write: frames ready meanwhile join this one
            await asyncio.sleep(delay)
        self._coalescer.wrote(time.monotonic())
        return self.ready_now()

    def ready_now(self) -> bytes:
        self._queue_slots()  # (a report of less room waits for a write: this one)
        self._ack_by = None  # (every write acknowledges what arrived)
        return self.conn.data_to_send()

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a wake-up, at most ``timeout`` seconds; False if none came."""
        if timeout is not None and timeout <= 0:
            return False
        self._wake.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

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
            waiting = self._unechoed_since
            # Held, not dead: the poll still brings bytes (a dead path brings nothing).
            poll_alive = now - self.last_heard < UNECHOED_PINGS * interval
            if waiting is not None and now - waiting > UNECHOED_PINGS * interval and poll_alive:
                self._unechoed_since = None
                if self.path.observe_held_uploads():
                    self._restart_uplink.set()
            if self._unechoed_since is None:
                self._unechoed_since = now
                self._unechoed_ping = self.conn.last_ping.sent if self.conn.last_ping else 0.0
            self.conn.pong()
            self._wake.set()

    # --- requests -------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        if not self.slots.take():  # refused before anything started: the broker tries elsewhere
            self.conn.end(request.id, "busy", f"at max_concurrent ({self.slots.limit}) over all brokers")
            return
        self._holding.add(request.id)
        if request.more_body:  # (bounded: the broker sends no more than the credit we grant)
            self._bodies[request.id] = asyncio.Queue()
        task = asyncio.create_task(self._serve(request))
        self.tasks[request.id] = task
        task.add_done_callback(lambda _: self._done(request.id, task))

    def _done(self, request_id: int, task: "asyncio.Task[None]") -> None:
        """A request's task is over, however it ended: its slot comes back."""
        self.tasks.pop(request_id, None)
        self._release(request_id)
        if task.cancelled():  # cancelled before it ran (its Cancel came with it): _serve never sent the End
            self._bodies.pop(request_id, None)
            self.conn.end(request_id, "cancelled")
            self._wake.set()

    def _release(self, request_id: int) -> bool:
        """The request's slot comes back, once, whichever path gets here first; False if it had."""
        if request_id not in self._holding:
            return False
        self._holding.discard(request_id)
        self.slots.give_back()
        return True

    def _cancel(self, request_id: int) -> None:
        task = self.tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def _serve(self, request: Request) -> None:
        """Replay one request on the LLM; its reply frames leave on the uplink, and its End
        carries the tokens the meter read (the client gets the LLM's bytes as it would directly)."""
        await self._pacer.turn()  # (cancelled while it waits: _done ends it)
        body, meter = prepare(request.method, request.path, request.body)
        if body is not request.body and not request.more_body:
            request = msgspec.structs.replace(request, body=body)
        try:
            error, detail = await self._call_llm(request, meter)
        except asyncio.CancelledError:
            error, detail = "cancelled", ""
            meter.close()  # a stream cut short: its tokens are estimated from what was delivered
        finally:
            self._credit.pop(request.id, None)
            self._bodies.pop(request.id, None)
        used = meter.result()
        tokens = (used.prompt_tokens, used.completion_tokens)
        if self._release(request.id):
            self._queue_slots()  # the room it leaves goes with its End: one write, not two
        self.conn.end(request.id, error, detail, tokens=tokens, usage=used.source)
        self._wake.set()
        if error and error != "cancelled":
            log.warning("request %d: %s (%s)", request.id, error, detail)

    async def _call_llm(self, request: Request, meter: UsageMeter) -> tuple[ErrorKind | None, str]:
        conn, request_id = self.conn, request.id
        started = time.perf_counter()
        try:
            body = self._streamed_body(request) if request.more_body else None
            async with self.llm.stream(request, body) as response:
                meter.start(response.status_code, response.headers.get("content-type"))
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
                if meter.strip:  # the body will be shorter than the LLM said: let it be framed anew
                    raw = [(k, v) for k, v in raw if k.lower() != "content-length"]
                conn.send_head(request_id, response.status_code, raw, (time.perf_counter() - started) * 1000)
                self._wake.set()
                async for data in body_of(response):
                    forward = meter.feed(data)
                    if forward:
                        await self._send_chunk(request_id, forward)
                rest = meter.close()
                if rest:
                    await self._send_chunk(request_id, rest)
        except Forbidden as exc:
            return "forbidden", str(exc)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return "llm_unreachable", type(exc).__name__
        except httpx.HTTPError as exc:
            return "llm_failed", type(exc).__name__
        except Exception as exc:  # a bug, or a request httpx cannot express: say so, never go silent
            log.exception("request %d failed", request_id)
            return "internal", type(exc).__name__
        return None, ""

    async def _streamed_body(self, request: Request) -> AsyncIterator[bytes]:
        """A streamed request body as the broker sends it. Each piece is paid back in credit
        once the LLM's socket took it: the transport asks for the next one only then."""
        queue, request_id = self._bodies[request.id], request.id
        if request.body:
            yield request.body  # the head the broker read to route it (outside the credit)
        more = True
        while more:
            frame = await queue.get()
            more = frame.more
            if frame.data:
                yield frame.data
            self.conn.consumed(request_id, len(frame.data))
            if self.conn.wants_write:
                self._wake.set()

    async def _send_chunk(self, request_id: int, data: bytes) -> None:
        """Send ``data`` as the broker's credit allows, waiting for more when it runs out."""
        conn = self.conn
        while data:
            room = conn.reply_room(request_id)
            if room <= 0:
                waiting = self._credit[request_id] = asyncio.Event()
                await waiting.wait()
                continue
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            conn.send_chunk(request_id, piece)
            self._wake.set()


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase
