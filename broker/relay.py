"""The OpenAI surface: every ``POST /v1/...`` is relayed to a connector serving its model.

Pure ASGI on purpose: this is the hot path, and it needs the raw ``receive`` to notice
a user who goes away while the LLM is still answering.
"""

import asyncio
import secrets
import time

import msgspec

from broker.asgi import ClientGone, Receive, Scope, Send, header, read_body
from broker.errors import send_error
from broker.hub import Hub
from broker.metrics import UNROUTED
from broker.router import AtCapacity, RouteError
from broker.tunnel import Exchange, Interrupt, ReplyEvent
from wire import Chunk, End, Head

# Request headers that describe this hop, not the request; the user's Authorization
# never leaves the broker.
_HOP_REQUEST = frozenset(
    b"authorization host content-length connection keep-alive transfer-encoding te "
    b"upgrade proxy-authorization proxy-connection http2-settings expect x-request-id".split()
)
# Response headers the broker sets itself or that describe the LLM's hop.
_HOP_RESPONSE = frozenset(
    [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "date",
        "cache-control",
        "x-accel-buffering",
        "x-remotellm-overhead-ms",
        "x-request-id",
    ]
)
_NO_BUFFERING = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_END_ERRORS = {
    "llm_unreachable": "the connector could not reach its LLM",
    "llm_failed": "the LLM failed before answering",
    "overloaded": "the connector is overloaded",
}


class _Body(msgspec.Struct):
    """All of the request body the broker reads: routing needs nothing else."""

    model: str


_decode_body = msgspec.json.Decoder(_Body).decode


class Relay:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        started = time.perf_counter()
        if not hub.user_allowed(header(scope, b"authorization")):
            await send_error(send, 401, "invalid_api_key", "Incorrect or missing API key.")
            return
        settings = hub.settings
        declared = header(scope, b"content-length")
        try:
            too_big = declared is not None and int(declared) > settings.max_body_size
            body = None if too_big else await read_body(receive, settings.max_body_size)
        except (ClientGone, ValueError):
            return
        if body is None:
            limit = settings.max_body_size
            await send_error(send, 413, "request_too_large", f"Request body over {limit} bytes.")
            return
        try:
            model = _decode_body(body).model
        except msgspec.MsgspecError:
            model = ""
        if not model:
            message = "The body must be a JSON object with a 'model' string."
            await send_error(send, 400, "invalid_request", message)
            return
        try:
            route = await hub.route(model)
        except RouteError as exc:
            await _send_route_error(send, exc, model)
            hub.metrics.requests.labels(UNROUTED, str(exc.status)).inc()
            return

        session = route.connector
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _HOP_REQUEST]
        outcome = _Outcome(_request_id(header(scope, b"x-request-id")))
        headers.append(("x-request-id", outcome.request_id))
        query = scope.get("query_string", b"").decode("latin-1")
        exchange = session.open(scope["method"], scope["path"], query, headers, body)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, exchange))
        hub.metrics.in_flight.inc()
        try:
            await _respond(exchange, send, settings.first_byte_timeout, settings.idle_timeout, outcome, started)
        finally:
            watcher.cancel()
            hub.finish(exchange, cancel=not outcome.ended)
            hub.metrics.in_flight.dec()
            hub.metrics.requests.labels(model, str(outcome.status)).inc()
            if outcome.ttfb:
                hub.metrics.ttfb.observe(outcome.ttfb)
            hub.request_log.write(
                id=outcome.request_id,
                model=model,
                connector=session.name,
                status=outcome.status,
                ms=round((time.perf_counter() - started) * 1000, 2),
                ttfb_ms=round(outcome.ttfb * 1000, 2),
                bytes=outcome.bytes,
                result=outcome.result,
            )


class _Outcome:
    __slots__ = ("bytes", "ended", "request_id", "result", "status", "ttfb")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.status = 0
        self.ttfb = 0.0
        self.bytes = 0
        self.ended = False  # the connector sent End: nothing to cancel
        self.result = "ok"


async def _respond(
    exchange: Exchange, send: Send, first_byte: float, idle: float, out: _Outcome, started: float
) -> None:
    event = await _next(exchange, first_byte)
    if not isinstance(event, Head):
        out.ended = isinstance(event, End)
        await _fail_before_head(send, event, out)
        return
    out.ttfb = time.perf_counter() - started
    out.status = event.status
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in event.headers if k.lower() not in _HOP_RESPONSE]
    overhead = b"%.2f" % max(0.0, out.ttfb * 1000 - event.llm_ms)
    headers += [*_NO_BUFFERING, (b"x-remotellm-overhead-ms", overhead), (b"x-request-id", out.request_id.encode())]
    await send({"type": "http.response.start", "status": event.status, "headers": headers})
    queue = exchange.events
    pending: ReplyEvent | None = None
    while True:
        event, pending = pending or await _next(exchange, idle), None
        if isinstance(event, Chunk):
            parts = [event.data]
            while not queue.empty():  # coalesce what is already here into one write
                ready = queue.get_nowait()
                if not isinstance(ready, Chunk):
                    pending = ready
                    break
                parts.append(ready.data)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            out.bytes += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": True})
        elif isinstance(event, End) and event.error is None:
            out.ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        else:
            # Returning without the final body message makes hypercorn cut the response,
            # so the user sees a truncated stream rather than a falsely complete one.
            out.ended = isinstance(event, End)
            out.result = _describe(event)
            return


async def _fail_before_head(send: Send, event: ReplyEvent | None, out: _Outcome) -> None:
    out.result = _describe(event)
    if isinstance(event, Interrupt) and event.reason == "user_gone":
        out.status = 499
        return
    if event is None:
        out.status = 504
        await send_error(send, 504, "timeout", "The LLM did not start answering in time.")
        return
    out.status = 502
    if isinstance(event, End) and event.error in _END_ERRORS:
        message = _END_ERRORS[event.error]
    else:
        message = "The connector serving this model went away."
    await send_error(send, 502, "upstream_unavailable", message)


def _request_id(given: str | None) -> str:
    """The user's X-Request-ID if it is a sane token, else a fresh one."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
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


async def _watch_disconnect(receive: Receive, exchange: Exchange) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    exchange.events.put_nowait(Interrupt("user_gone"))


async def _send_route_error(send: Send, exc: RouteError, model: str) -> None:
    if isinstance(exc, AtCapacity):
        message = f"Every connector serving {model!r} is busy; retry shortly."
        await send_error(send, exc.status, exc.code, message, [(b"retry-after", b"1")])
    elif exc.status == 404:
        await send_error(send, 404, exc.code, f"The model {model!r} does not exist.")
    else:
        await send_error(send, exc.status, exc.code, f"No connector is serving {model!r} right now.")
