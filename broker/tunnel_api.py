"""The connector-facing endpoints: register, poll (frames out), reply (frames in)."""

import asyncio
import logging
import time

from broker.asgi import ClientGone, Receive, Scope, Send, header, read_body
from broker.errors import send_error
from broker.hub import Hub, Refused
from broker.tunnel import Session
from wire import (
    FRAMES_CONTENT_TYPE,
    PARTIAL_HEADER,
    SESSION_HEADER,
    SHORT_POLL_QUERY,
    Chunk,
    Drain,
    End,
    Frame,
    FrameDecoder,
    FrameError,
    Head,
    Hello,
    Pong,
    Welcome,
    decode_all,
    encode,
    encode_many,
)

log = logging.getLogger("remotellm.tunnel")
_FRAMES_HEADERS = [
    (b"content-type", FRAMES_CONTENT_TYPE.encode()),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_HELLO_LIMIT = 1024 * 1024
# A reply frame holds at most a credit's worth of body, or a head: far below this.
MAX_REPLY_FRAME = 1024 * 1024
SHORT_POLL_WAIT = 5.0  # an idle short poll returns after this long (or the ping interval)


def _remote(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


async def _refuse_token(hub: Hub, send: Send, scope: Scope) -> None:
    """401, after a delay that grows with the address's recent failures (guessing is slow)."""
    client = scope.get("client")
    delay = hub.auth_throttle.failed(client[0] if client else "?")
    log.warning("tunnel request with a bad token or session from %s", _remote(scope))
    if delay:
        await asyncio.sleep(delay)
    await send_error(send, 401, "invalid_token", "Unknown connector token or session.")


async def _session(hub: Hub, scope: Scope, send: Send) -> Session | None:
    spec = hub.connector_spec(header(scope, b"authorization"))
    if spec is None:
        await _refuse_token(hub, send, scope)
        return None
    session = hub.session_of(spec, header(scope, SESSION_HEADER.encode()))
    if session is None:  # a valid token with a session this broker forgot: register again
        await send_error(send, 401, "unknown_session", "Unknown or expired session; register again.")
    return session


async def register(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    spec = hub.connector_spec(header(scope, b"authorization"))
    if spec is None:
        await _refuse_token(hub, send, scope)
        return
    try:
        body = await read_body(receive, _HELLO_LIMIT)
        frames = decode_all(body or b"", _HELLO_LIMIT)
    except (ClientGone, FrameError):
        frames = []
    if len(frames) != 1 or not isinstance(frames[0], Hello):
        await send_error(send, 400, "invalid_request", "The body must be exactly one Hello frame.")
        return
    try:
        session = hub.register(spec, frames[0], _remote(scope))
    except Refused as exc:
        log.warning("connector %s refused: %s", spec.name, exc)
        await send_error(send, exc.status, exc.code, str(exc))
        return
    body = encode(Welcome(session.id, hub.settings.ping_interval))
    await send({"type": "http.response.start", "status": 200, "headers": _FRAMES_HEADERS})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def poll(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    session = await _session(hub, scope, send)
    if session is None:
        return
    protocol = "h2" if scope.get("http_version") == "2" else "http/1.1"
    if scope.get("query_string", b"").decode("latin-1") == SHORT_POLL_QUERY:
        await _short_poll(hub, session, send, protocol)
        return
    generation = hub.poll_attached(session, protocol)
    await send({"type": "http.response.start", "status": 200, "headers": _FRAMES_HEADERS})
    lost = asyncio.Event()
    watcher = asyncio.ensure_future(_watch(receive, hub, session, generation, lost))
    settings = hub.settings
    until = time.monotonic() + settings.poll_lifetime
    # A first frame at once: some proxies hold the response head until body bytes flow.
    frames: list[Frame] | None = [session.ping()]
    try:
        while frames is not None:
            await send({"type": "http.response.body", "body": encode_many(frames), "more_body": True})
            if lost.is_set():
                break
            frames = await session.next_frames(generation, settings.ping_interval, until)
    finally:
        watcher.cancel()
        session.detach_poll(generation)
    if not lost.is_set():
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _short_poll(hub: Hub, session: Session, send: Send, protocol: str) -> None:
    """A poll that returns as soon as it has frames, for paths that buffer whole responses."""
    generation = hub.poll_attached(session, protocol + " short-poll")
    wait = min(hub.settings.ping_interval, SHORT_POLL_WAIT)
    try:
        frames = await session.next_frames(generation, wait, time.monotonic() + wait)
    finally:
        session.detach_poll(generation)
    body = encode_many(frames or [session.ping()])
    await send({"type": "http.response.start", "status": 200, "headers": _FRAMES_HEADERS})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _watch(receive: Receive, hub: Hub, session: Session, generation: int, lost: asyncio.Event) -> None:
    """The poll's connection went away: the connector with it, unless a newer poll took over."""
    while (await receive())["type"] != "http.disconnect":
        pass
    lost.set()
    if generation == session.poll_generation:
        hub.drop(session, "tunnel lost")  # wakes the poll loop, fails the requests in flight


async def reply(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    """One streamed body of reply frames; each goes to its exchange as it arrives."""
    session = await _session(hub, scope, send)
    if session is None:
        return
    if session.replies_open >= hub.settings.max_replies_per_session:
        await send_error(send, 429, "too_many_replies", "Too many reply streams open for this session.")
        return
    session.replies_open += 1
    try:
        await _read_reply(hub, session, scope, receive, send)
    finally:
        session.replies_open -= 1


async def _read_reply(hub: Hub, session: Session, scope: Scope, receive: Receive, send: Send) -> None:
    decoder = FrameDecoder(MAX_REPLY_FRAME)
    unfinished: set[int] = set()
    status = 204
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                status = 0
                break
            if session.closed:  # revoked, replaced or reaped: nothing it sends counts any more
                status = 401
                break
            session.touch()
            for frame in decoder.feed(message.get("body", b"")):
                if isinstance(frame, End):
                    session.deliver(frame)
                    unfinished.discard(frame.id)  # also for requests already over (cancelled)
                elif isinstance(frame, (Head, Chunk)):
                    if session.deliver(frame):
                        unfinished.add(frame.id)
                elif isinstance(frame, Pong):
                    hub.heartbeat(session, frame)
                elif isinstance(frame, Drain):
                    hub.retire(session, frame.reason)
                else:
                    raise FrameError(f"unexpected {type(frame).__name__} frame in a reply")
            if not message.get("more_body", False):
                decoder.finish()
                break
    except FrameError as exc:
        log.warning("connector %s sent a bad reply: %s", session.name, exc)
        status = 400
    if status != 204 or header(scope, PARTIAL_HEADER.encode()) is None:
        for request_id in unfinished:
            session.interrupt(request_id, "connector_lost")
    if status == 400:
        await send_error(send, 400, "invalid_frames", "The reply body is not a valid frame stream.")
    elif status == 401:
        await send_error(send, 401, "unknown_session", "This session is over; register again.")
    elif status:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
