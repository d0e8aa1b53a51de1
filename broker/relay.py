"""The OpenAI surface: every ``POST /v1/...`` is relayed to a connector serving its model.

Pure ASGI on purpose: this is the hot path, and it needs the raw ``receive`` to notice
a user who goes away while the LLM is still answering.
"""

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from broker.accounting import Accounting, Tokens, reservation_of
from broker.affinity import Affinity, IdSniffer
from broker.asgi import ClientGone, Message, Receive, Scope, Send, SendChunk, chunk_writer, header
from broker.body import BodyRefused, HeldBody, read_held, too_large, too_many
from broker.errors import send_error
from broker.form import MODEL_SCAN_LIMIT, FormModel
from broker.hub import Hub
from broker.limits import Lease, Rejection
from broker.logs import log
from broker.metrics import UNROUTED
from broker.router import AtCapacity, ModelUnavailable, RouteError
from broker.routes import (
    FORM_MODEL_ROUTES,
    JSON_MODEL_ROUTES,
    RESPONSES_PATH,
    Family,
    family,
    management,
    responses_object_id,
)
from broker.settings import Settings
from broker.tunnel import Exchange, Interrupt, ReplyEvent, Session, Sink
from broker.upload import Upload
from broker.users import User
from wire import UPLOAD_CREDIT, Chunk, End, Head, connector_of
from wire.headers import forwardable_request_header, forwardable_response_header, valid_header, valid_status

# Attempts of one request: a connector that is full refuses it before anything started
# (End "busy"), and it goes on to another with room — within this bound and the total timeout.
MAX_ATTEMPTS = 8
# How long a stream cut by its user waits for the connector's End (it carries the tokens
# delivered); the LLM stops at the Cancel, so it comes in milliseconds unless the tunnel is gone.
LATE_END_TIMEOUT = 10.0
# Response headers the broker sets itself.
_SET_BY_BROKER = frozenset(["date", "cache-control", "x-accel-buffering", "x-remotellm-overhead-ms", "x-request-id"])
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
Headers = Sequence[tuple[bytes, bytes]]
_NO_BUFFERING = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_END_ERRORS = {
    "llm_unreachable": "the connector could not reach its LLM",
    "llm_failed": "the LLM failed before answering",
    "internal": "the connector could not forward the request",
    "forbidden": "the connector refused to forward the request",
}


class _Body(msgspec.Struct):
    """All of the request body the broker reads: routing needs nothing else."""

    model: str
    previous_response_id: str | None = None  # Responses: chained to the connector that made it


class _Target(NamedTuple):
    """Where a forwarded request may go: connectors that ``accepts`` it, or, for the by-id
    routes of the Responses API, the connector that created ``object_id``."""

    accepts: "Accepts"
    object_id: str | None = None


_decode_body = msgspec.json.Decoder(_Body).decode
_NO_MODEL = "The body must be a JSON object with a 'model' string."
_NO_FORM_MODEL = (
    f"The body must be a multipart/form-data form with a 'model' field within its first {MODEL_SCAN_LIMIT} bytes."
)


def _model_of(data: bytes, form: FormModel | None) -> _Body | None:
    """What routes the request: the JSON body's fields, or the form's model field."""
    if form is not None:
        return _Body(form.model) if form.model else None
    with contextlib.suppress(msgspec.MsgspecError):
        return _decode_body(data)
    return None


class Relay:
    def __init__(self, hub: Hub, affinity: Affinity, accounting: Accounting) -> None:
        self.hub = hub
        self.affinity = affinity
        self.accounting = accounting
        self._closing: set[asyncio.Task[None]] = set()  # requests waiting for a cancelled End

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _raw_path(scope)
        out = _Outcome(_request_id(header(scope, b"x-request-id")), family(path))
        held = HeldBody(self.hub.body_budget)
        watcher: asyncio.Future[None] | None = None
        try:
            target = await self._admit(scope, receive, send, path, held, out)
            if target is not None:
                target = await self._limit(send, held.data, target, out)
            if target is not None:
                user = receive if out.upload is None else out.upload.receive  # an upload's rest first
                watcher = asyncio.ensure_future(_watch_disconnect(user, out))
                await self._forward(scope, send, path, held.data, target, out)
        finally:
            held.release()
            if watcher is not None:
                watcher.cancel()
            if out.late_end is None:
                await self._close(out)
            else:  # the user cut the stream: what was delivered is counted once the connector's End says
                task = asyncio.ensure_future(self._close_after_end(out, out.late_end))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close(self, out: "_Outcome") -> None:
        """Every way out: the slot given back, the tokens settled, the request accounted."""
        if out.lease is not None:
            await out.lease.settle(out.tokens.total if out.tokens.source != "unknown" else out.reserve)
        self._account(out)

    async def _close_after_end(self, out: "_Outcome", late_end: "asyncio.Future[End]") -> None:
        try:
            async with asyncio.timeout(LATE_END_TIMEOUT):
                end = await late_end
            out.tokens = Tokens(end.prompt_tokens, end.completion_tokens, end.usage)
        except TimeoutError:
            pass  # a connector that never ends it: counted as unknown
        await self._close(out)

    async def _admit(
        self, scope: Scope, receive: Receive, send: Send, path: str, held: HeldBody, out: "_Outcome"
    ) -> _Target | None:
        """Where the request may go, once its route, key, body and model check out (the
        body is then in ``held``); None once the user was answered or left."""
        hub = self.hub
        caller = hub.identify(header(scope, b"authorization"), header(scope, b"x-api-key"))
        if caller is None or caller.user is None:
            await out.fail(send, 401, "invalid_api_key", "Incorrect or missing API key.")
            return None
        out.user = caller.user
        target = self._route_of(scope["method"], path)
        if target is None:
            if management(path):
                await out.fail(send, 403, "forbidden", f"{path} manages the LLM's models: not available here.")
            else:
                await out.fail(send, 404, "not_found", f"{scope['method']} {path}: not found.")
            return None
        form = FormModel.of(header(scope, b"content-type")) if path in FORM_MODEL_ROUTES else None
        try:
            out.upload = await _read_body(scope, receive, held, form, hub.settings)
        except ValueError:
            await out.fail(send, 400, "invalid_request", "Content-Length is not a number.")
            return None
        except BodyRefused as exc:
            retry = [(b"retry-after", b"1")] if exc.status == 503 else []
            await out.fail(send, exc.status, exc.code, str(exc), retry)
            return None
        except ClientGone:
            out.result = "user_gone"
            return None
        out.request_bytes = held.size
        if target.object_id is not None:
            return await self._creator(target, send, out)
        body = _model_of(held.data, form)
        if body is None or not body.model:
            await out.fail(send, 400, "invalid_request", _NO_MODEL if form is None else _NO_FORM_MODEL)
            return None
        out.model = body.model
        if not caller.user.may_use(body.model):
            await out.fail(send, 403, "model_not_allowed", f"This key may not use the model {body.model!r}.")
            return None
        if path == RESPONSES_PATH:
            out.sniffer = IdSniffer(self.affinity.remember)  # its id will lead the by-id routes back here
            previous = body.previous_response_id
            creator = await self.affinity.connector_of(previous) if previous else None
            if creator is not None:
                return _Target(lambda session: _connector(session) == creator)
        return target

    def _route_of(self, method: str, path: str) -> _Target | None:
        """Where a forwarded route may go (None: not forwarded at all)."""
        object_id = responses_object_id(method, path)
        if object_id is not None:
            return _Target(_anyone, object_id)
        if method != "POST":
            return None
        if path in JSON_MODEL_ROUTES or path in FORM_MODEL_ROUTES or path in self.hub.settings.allowed_paths:
            return _Target(_anyone)
        if any(path in spec.allowed_paths for spec in self.hub.settings.connectors):
            return _Target(lambda session: path in session.spec.allowed_paths)
        return None

    async def _limit(self, send: Send, body: bytes, target: _Target, out: "_Outcome") -> _Target | None:
        """The user's limits, at admission: a lease to settle at the end, or a 429 now."""
        assert out.user is not None
        if not out.user.limits.any:
            return target
        reserve = reservation_of(body)  # the body is parsed for it once, and only for limited users
        verdict = await self.accounting.admit(out.user, reserve)
        if isinstance(verdict, Rejection):
            await out.fail(send, verdict.status, verdict.code, verdict.message, verdict.headers)
            return None
        if verdict is not None:
            out.lease, out.reserve = verdict, reserve
        return target

    async def _creator(self, target: _Target, send: Send, out: "_Outcome") -> _Target | None:
        """A by-id route goes to the connector that created the object: 404 if none did here."""
        assert target.object_id is not None
        creator = await self.affinity.connector_of(target.object_id)
        if creator is None:
            await out.fail(send, 404, "not_found", f"No response with id {target.object_id!r} is known here.")
            return None
        return _Target(lambda session: _connector(session) == creator, target.object_id)

    async def _forward(
        self, scope: Scope, send: Send, path: str, body: bytes, target: _Target, out: "_Outcome"
    ) -> None:
        hub, settings = self.hub, self.hub.settings
        try:
            session = await self._pick(target, out)
        except RouteError as exc:
            await _send_route_error(send, exc, out)
            return
        out.routed = True
        headers = _forwarded_headers(scope["headers"])
        headers.append(("x-request-id", out.request_id))
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            async with asyncio.timeout(settings.total_timeout):
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    if out.gone:  # left while waiting for a slot: nothing to ask the LLM
                        out.status, out.result = 499, "user_gone"
                        return
                    out.connector = session.name
                    if out.sniffer is not None:
                        out.sniffer.creator = _connector(session)
                    upload = out.upload
                    exchange = out.exchange = session.open(
                        scope["method"], path, query, headers, body, more_body=upload is not None
                    )
                    if upload is not None:
                        upload.opened(exchange)
                    try:
                        failure = await _respond(exchange, send, chunk_writer(scope), settings, out)
                    finally:
                        hub.finish(exchange, cancel=not out.ended, on_end=_late_end(out))
                    if failure is None:
                        return
                    alternate = await self._retry(failure, attempt, session, target, out)
                    if alternate is None:
                        await _fail_before_head(send, failure.event, out)
                        return
                    log.info(
                        "request %s: %s on %s, retrying on %s", out.request_id, out.result, session.name, alternate.name
                    )
                    session = alternate
        except TimeoutError:
            out.result = "total_timeout"
            if not out.head_sent:
                await out.fail(send, 504, "timeout", "The request took longer than the total time allowed.")

    async def _retry(
        self, failure: "_BeforeHead", attempt: int, session: Session, target: _Target, out: "_Outcome"
    ) -> Session | None:
        """Where an attempt that ended before its head goes next; None: nowhere, the user gets
        the error. Nothing reached the user, so another connector is safe — not with a streamed
        body, though: what went to the first connector is gone."""
        if out.upload is not None or attempt >= MAX_ATTEMPTS:
            return None
        if _busy(failure.event):
            if target.object_id is not None:
                return None  # only its creator can answer, and it is full
            # Full with other brokers' requests: a connector capped here is now known full and
            # skipped until it reports room (the request waits the short queue when every one
            # is full); one that is not (another broker's cap) is not asked again.
            refused = session if session.free_slots is None else None
            try:
                return await self.hub.route(out.model, lambda other: other is not refused and target.accepts(other))
            except RouteError:
                return None
        if attempt == 1 and _retryable(failure.event) and target.object_id is None:
            return self.hub.alternate(out.model, session, target.accepts)
        return None

    async def _pick(self, target: _Target, out: "_Outcome") -> Session:
        if target.object_id is None:
            return await self.hub.route(out.model, target.accepts)
        # By id: no model to route by; the creator's live sessions, least busy first.
        live = sorted((s for s in self.hub.router.connectors() if target.accepts(s)), key=lambda s: s.in_flight)
        if not live:
            raise ModelUnavailable(target.object_id)
        return live[0]

    def _account(self, out: "_Outcome") -> None:
        hub = self.hub
        model = out.model if out.routed else UNROUTED
        elapsed = time.perf_counter() - out.started
        metrics = hub.metrics
        child = metrics.child
        child(metrics.requests, model, str(out.status), out.connector).inc()
        child(metrics.duration, model).observe(elapsed)
        child(metrics.bytes, "request").inc(out.request_bytes + (out.upload.streamed if out.upload else 0))
        child(metrics.bytes, "response").inc(out.bytes)
        if out.ttfb:
            child(metrics.ttfb, model).observe(out.ttfb)
        if out.user is not None:
            self.accounting.record(
                user=out.user, model=model,  # unrouted: a label, not whatever model was asked for
                connector=out.connector if out.routed else None, status=out.status, tokens=out.tokens,
                started=out.wall_started, ttfb=out.ttfb, duration=elapsed,
            )  # fmt: skip
        hub.request_log.write(
            id=out.request_id,
            user=(out.user.name or "-") if out.user is not None else "-",
            model=out.model if out.routed else "-",
            connector=out.connector,
            status=out.status,
            ms=round(elapsed * 1000, 2),
            ttfb_ms=round(out.ttfb * 1000, 2),
            bytes=out.bytes,
            result=out.result,
        )


async def _read_body(
    scope: Scope, receive: Receive, held: HeldBody, form: FormModel | None, settings: Settings
) -> Upload | None:
    """Read the body into ``held``: whole, or an audio form only up to its model field,
    the rest then to be streamed (the Upload returned). Raises BodyRefused, ClientGone,
    or ValueError for a Content-Length that is no number."""
    # A streamed upload is never held whole, so it may be larger than a body read whole.
    limit = settings.max_upload_size if form is not None else settings.max_body_size
    declared = header(scope, b"content-length")
    if declared is not None and int(declared) > limit:
        raise too_large(limit)
    deadline = asyncio.get_running_loop().time() + settings.body_timeout  # for the whole body, streamed too
    until = form.enough if form is not None else None
    more = await read_held(receive, held, limit=limit, timeout=settings.body_timeout, until=until)
    if not (more and form is not None and form.model):
        return None
    if not held.reserve(UPLOAD_CREDIT):  # what may be on its way to the connector at once
        raise too_many()
    return Upload(receive, head=held.size, limit=limit, timeout=settings.body_timeout, deadline=deadline)


class _Outcome:
    """What happened to one user request, for its reply, its log line and its metrics."""

    __slots__ = (
        "bytes", "connector", "ended", "exchange", "family", "gone", "head_sent", "late_end", "lease", "model",
        "request_bytes", "request_id", "reserve", "result", "routed", "sniffer", "started", "status", "tokens",
        "ttfb", "upload", "user", "wall_started",
    )  # fmt: skip

    def __init__(self, request_id: str, family: Family) -> None:
        self.request_id = request_id
        self.family = family
        self.started = time.perf_counter()
        self.model = ""
        self.routed = False
        self.connector = "-"
        self.exchange: Exchange | None = None
        self.status = 0
        self.ttfb = 0.0
        self.bytes = 0
        self.request_bytes = 0
        self.head_sent = False
        self.ended = False  # the connector sent End: nothing to cancel
        self.gone = False
        self.result = "ok"
        self.sniffer: IdSniffer | None = None  # set for a Responses create: finds the new id
        self.wall_started = time.time()
        self.user: User | None = None
        self.lease: Lease | None = None  # a limited user's admission, settled at the end
        self.reserve = 0  # the tokens reserved for it
        self.tokens = Tokens()  # what the request used, once known
        self.late_end: asyncio.Future[End] | None = None  # a cut stream's End, still to come
        self.upload: Upload | None = None  # the rest of a body streamed after routing

    @property
    def sniffing(self) -> IdSniffer | None:
        """The sniffer of a Responses create whose body has not shown its id yet (each chunk
        goes through it, on the relay's own way), else None."""
        sniffer = self.sniffer
        return sniffer if sniffer is not None and not sniffer.done else None

    async def fail(self, send: Send, status: int, code: str, message: str, headers: Headers = ()) -> None:
        self.status = status
        if self.result == "ok":
            self.result = code
        headers = [(b"x-request-id", self.request_id.encode()), *headers]
        await send_error(send, status, code, message, headers, self.family)


class _BeforeHead(NamedTuple):
    """What ended an attempt before the response head (None: the first-byte timeout)."""

    event: ReplyEvent | None


async def _respond(
    exchange: Exchange, send: Send, send_chunk: SendChunk | None, settings: Settings, out: _Outcome
) -> _BeforeHead | None:
    """Relay one attempt; None once a response went out, whole or cut."""
    out.ended = False
    wait = settings.first_byte_timeout
    if out.upload is not None:  # the first-byte clock starts once the upload may be complete
        wait += max(0.0, out.upload.deadline - asyncio.get_running_loop().time())
    event = await _next(exchange, wait)
    if not isinstance(event, Head):
        out.ended = isinstance(event, End)
        out.result = _describe(event)
        return _BeforeHead(event)
    headers = _response_headers(event)
    if headers is None:  # never relayed: a bad head could break the user's whole connection
        out.result = "invalid_head"
        return _BeforeHead(event)
    out.ttfb = time.perf_counter() - out.started
    out.status = event.status
    if out.sniffer is not None and not 200 <= event.status < 300:
        out.sniffer.stop()  # an error's id is no response's
    overhead = b"%.2f" % max(0.0, out.ttfb * 1000 - event.llm_ms)
    headers += [*_NO_BUFFERING, (b"x-remotellm-overhead-ms", overhead), (b"x-request-id", out.request_id.encode())]
    if out.lease is not None:
        headers += out.lease.headers
    start: Message = {"type": "http.response.start", "status": event.status, "headers": headers}
    deadline = asyncio.timeout(None)
    stall = _Stall(deadline, settings.idle_timeout)
    try:
        async with deadline:
            # In a task of its own: each chunk wakes it alone, not the nine coroutines of
            # the ASGI stack above (cancelling this one cancels it).
            await asyncio.ensure_future(_relay_body(exchange, send, send_chunk, start, out, stall))
    except TimeoutError:
        out.result = "user_stalled" if stall.sending else "timeout"
    finally:
        stall.cancel()
    return None


async def _relay_body(
    exchange: Exchange, send: Send, send_chunk: SendChunk | None, start: Message, out: _Outcome, stall: "_Stall"
) -> None:
    """The reply's head, then its body chunk by chunk, until its End (or until it fails).

    The head is sent from here, a loop turn after it came, with what came by then: the
    user's connection gathers a step's writes into one, so the head and its first chunks
    (or the whole body and its End) leave in one write, not two. A head sent at once
    instead when nothing was queued behind it left a stream's first chunk to a write of
    its own: scenario 3's first chunk p50 143 against 123 ms (12 alternating rounds)."""
    stall.writing()
    # Marked first: hypercorn writes the head before it first waits (on a full
    # connection's drain), so a cancel in that wait leaves a head that is out.
    out.head_sent = True
    await send(start)
    stall.sent()
    if send_chunk is not None:
        exchange.events.deliver_to(_writer_of_chunks(exchange, send_chunk, out, stall))
    try:
        await _relay_events(exchange, send, send_chunk, out, stall)
    finally:
        exchange.events.deliver_to(None)


def _writer_of_chunks(exchange: Exchange, send_chunk: SendChunk, out: _Outcome, stall: "_Stall") -> Sink:
    """What relays a chunk that comes while the relay waits, without waking it: the usual
    chunk, which the user's connection takes at once. False leaves it to the relay."""

    def write(chunk: Chunk) -> bool:
        data = chunk.data
        if out.sniffing is not None or not send_chunk.write_nowait(data):
            return False
        _taken(exchange, out, stall, len(data))
        return True

    return write


def _taken(exchange: Exchange, out: _Outcome, stall: "_Stall", size: int) -> None:
    """The user took ``size`` more bytes of the reply, however they were written."""
    stall.sent()
    out.bytes += size
    exchange.consumed(size)  # the connector may send as many more


async def _relay_events(
    exchange: Exchange, send: Send, send_chunk: SendChunk | None, out: _Outcome, stall: "_Stall"
) -> None:
    queue = exchange.events
    pending: ReplyEvent | None = None
    while True:
        event, pending = pending or await queue.get(), None
        stall.moved()
        if isinstance(event, Chunk):
            parts = [event.data]
            while not queue.empty():  # coalesce what is already here into one write
                ready = queue.get_nowait()
                if not isinstance(ready, Chunk):
                    pending = ready
                    break
                parts.append(ready.data)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if (sniffer := out.sniffing) is not None:
                await sniffer.feed(data)
            # The End is here already (a whole reply in one uplink write): this write ends it.
            last = pending if isinstance(pending, End) and pending.error is None else None
            if last is not None:
                out.ended = True
                out.tokens = Tokens(last.prompt_tokens, last.completion_tokens, last.usage)
            # A user who stops reading for the idle timeout loses the stream (and its slot).
            stall.writing()
            if last is not None or send_chunk is None or not await send_chunk(data):
                await send({"type": "http.response.body", "body": data, "more_body": last is None})
            _taken(exchange, out, stall, len(data))
            if last is not None:
                return
        elif isinstance(event, End) and event.error is None:
            out.ended = True
            out.tokens = Tokens(event.prompt_tokens, event.completion_tokens, event.usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        else:
            # Returning without the final body message makes hypercorn cut the response,
            # so the user sees a truncated stream rather than a falsely complete one.
            out.ended = isinstance(event, End)
            out.result = _describe(event)
            if isinstance(event, End):  # failed after the head: still, what was delivered was used
                out.tokens = Tokens(event.prompt_tokens, event.completion_tokens, event.usage)
            return


class _Stall:
    """The idle timeout of a streamed reply: one timer per stream rather than one per chunk
    (a timer costs microseconds; a stream has thousands of chunks). It fires ``idle``
    seconds after the last sign of progress — an event from the connector, or a write the
    user took — by expiring ``deadline``; ``sending`` tells which side stalled."""

    __slots__ = ("_deadline", "_handle", "_idle", "_last", "_loop", "sending")

    def __init__(self, deadline: asyncio.Timeout, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = deadline
        self._idle = idle
        self._last = self._loop.time()
        self.sending = False  # the user is being written to
        self._handle = self._loop.call_at(self._last + idle, self._check)

    def moved(self) -> None:
        self._last = self._loop.time()

    def writing(self) -> None:
        self.sending = True

    def sent(self) -> None:
        """The user took the write."""
        self.sending = False
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self._idle
        if self._loop.time() >= due:
            self._deadline.reschedule(self._loop.time())  # expires now: the relay is cancelled
        else:
            self._handle = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


Accepts = Callable[[Session], bool]


def _anyone(session: Session) -> bool:
    return True


def _connector(session: Session) -> str:
    """The connector behind a session: the same on every broker it holds a session with."""
    return connector_of(session.hello.connector_id)


def _raw_path(scope: Scope) -> str:
    """The path as the user sent it, still percent-encoded: what is checked is what is forwarded."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
    return raw.split(b"?", 1)[0].decode("latin-1")


def _forwarded_headers(raw: Headers) -> list[tuple[str, str]]:
    """The user's headers that may reach the LLM (wire.headers has the policy)."""
    headers = []
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if forwardable_request_header(name) and name != "x-request-id":  # the broker sets its own
            headers.append((name, value.decode("latin-1")))
    return headers


def _response_headers(head: Head) -> list[tuple[bytes, bytes]] | None:
    """The LLM's response head as the user gets it; None if it is not valid HTTP."""
    if not valid_status(head.status):
        return None
    headers = []
    for key, value in head.headers:
        name, value = key.lower(), value.strip(" \t")
        if not valid_header(name, value):
            return None
        if forwardable_response_header(name) and name not in _SET_BY_BROKER:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
    return headers


def _late_end(out: _Outcome) -> Callable[[End], None] | None:
    """For a stream cut after its head: where the End the Cancel brings back is to go."""
    if out.ended or not out.head_sent:
        return None
    future = out.late_end = asyncio.get_running_loop().create_future()

    def ended(end: End) -> None:
        if not future.done():
            future.set_result(end)

    return ended


def _busy(event: ReplyEvent | None) -> bool:
    return isinstance(event, End) and event.error == "busy"


def _retryable(event: ReplyEvent | None) -> bool:
    if isinstance(event, Interrupt):
        return event.reason == "connector_lost"
    return isinstance(event, End) and event.error == "llm_unreachable"


async def _fail_before_head(send: Send, event: ReplyEvent | None, out: _Outcome) -> None:
    if isinstance(event, Interrupt) and event.reason == "user_gone":
        out.status = 499
        return
    if event is None:
        await out.fail(send, 504, "timeout", "The LLM did not start answering in time.")
        return
    if _busy(event):  # every connector tried, or waited for, is at its max_concurrent
        await _send_route_error(send, AtCapacity(out.model), out)
        return
    refused = out.upload.refused if out.upload is not None else None
    if refused is not None:  # the streamed rest of the body was too large or too slow
        await out.fail(send, refused.status, refused.code, str(refused))
        return
    if isinstance(event, Head):
        message = "The LLM's response head is not valid HTTP."
    elif isinstance(event, End) and event.error in _END_ERRORS:
        message = _END_ERRORS[event.error]
    else:
        message = "The connector serving this model went away."
    await out.fail(send, 502, "upstream_unavailable", message)


def _request_id(given: str | None) -> str:
    """The user's X-Request-ID if it is a plain token (it goes into log lines), else a fresh one."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(8)


def _describe(event: ReplyEvent | None) -> str:
    if event is None:
        return "timeout"
    if isinstance(event, Interrupt):
        return event.reason
    if isinstance(event, End):
        return event.error or "ok"
    return "protocol_error"


async def _next(exchange: Exchange, timeout: float) -> ReplyEvent | None:
    """The next reply event, or None after ``timeout`` seconds without one."""
    queue = exchange.events
    if not queue.empty():
        return queue.get_nowait()
    try:
        async with asyncio.timeout(timeout):
            return await queue.get()
    except TimeoutError:
        return None


async def _watch_disconnect(receive: Receive, out: _Outcome) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    out.gone = True
    if out.exchange is not None:
        out.exchange.events.put_nowait(Interrupt("user_gone"))


async def _send_route_error(send: Send, exc: RouteError, out: _Outcome) -> None:
    model = out.model
    if isinstance(exc, AtCapacity):
        message = f"Every connector serving {model!r} is busy; retry shortly."
        await out.fail(send, exc.status, exc.code, message, [(b"retry-after", b"1")])
    elif exc.status == 404:
        await out.fail(send, 404, exc.code, f"The model {model!r} does not exist.")
    else:
        await out.fail(send, exc.status, exc.code, f"No connector is serving {model!r} right now.")
