"""The connector-facing endpoints: register, poll (frames out), reply (frames in)."""

import asyncio
import logging
import time

from broker.asgi import ClientGone, Receive, Scope, Send, header, read_body
from broker.errors import send_error
from broker.hub import Hub
from broker.sessions import Refused
from broker.tunnel import Session
from wire import (
    BROKER_HEADER,
    FRAMES_CONTENT_TYPE,
    MISDIRECTED,
    RECEIVED_HEADER,
    SESSION_HEADER,
    SHORT_POLL_QUERY,
    Drain,
    FrameError,
    Hello,
    Inbound,
    ProtocolError,
    Welcome,
    decode_all,
    encode,
)
from wire.endpoints import ROTATE_HEADER

log = logging.getLogger("remotellm.tunnel")
_FRAMES_HEADERS = [
    (b"content-type", FRAMES_CONTENT_TYPE.encode()),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_HELLO_LIMIT = 1024 * 1024
VIA_SHOWN = 120  # characters of a Via header kept for the console
SHORT_POLL_WAIT = 5.0  # an idle short poll returns after this long (or the ping interval)


def _remote(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _poll_headers(hub: Hub, session: Session) -> list[tuple[bytes, bytes]]:
    """A poll's response head; it asks an enrolled connector for a new credential when an admin did."""
    if hub.enrollment.enrolled.rotating(session.spec.token_digest):
        return [*_FRAMES_HEADERS, (ROTATE_HEADER.encode(), b"1")]
    return _FRAMES_HEADERS


def _proxy(scope: Scope) -> str | None:
    """The proxy a request says it came through (Via), cut short: it is the connector's input."""
    via = header(scope, b"via")
    return via[:VIA_SHOWN] if via else None


async def _refuse_token(hub: Hub, send: Send, scope: Scope) -> None:
    """401, after a delay that grows with the address's recent failures (guessing is slow)."""
    client = scope.get("client")
    delay = hub.auth_throttle.failed(client[0] if client else "?")
    log.warning("tunnel request with a bad token or session from %s", _remote(scope))
    if delay:
        await asyncio.sleep(delay)
    await send_error(send, 401, "invalid_token", "Unknown connector token or session.")


async def _misdirected(hub: Hub, scope: Scope, send: Send) -> bool:
    """A request pinned to another broker process (it came through a balancer): 421, before
    anything else, and the connector tries again on a new connection."""
    wanted = header(scope, BROKER_HEADER.encode())
    if wanted is None or wanted == hub.peers.broker_id:
        return False
    await send_error(send, MISDIRECTED, "misdirected", "This is another broker; connect again.")
    return True


async def _session(hub: Hub, scope: Scope, send: Send) -> Session | None:
    if await _misdirected(hub, scope, send):
        return None
    spec = hub.connector_spec(header(scope, b"authorization"))
    if spec is None:
        await _refuse_token(hub, send, scope)
        return None
    session = hub.sessions.find(spec, header(scope, SESSION_HEADER.encode()))
    if session is None:  # a valid token with a session this broker forgot: register again
        await send_error(send, 401, "unknown_session", "Unknown or expired session; register again.")
    return session


async def _refuse_frames(hub: Hub, session: Session, send: Send, exc: ProtocolError) -> None:
    """The connector broke the protocol as a whole: its session ends."""
    log.warning("connector %s sent bad frames: %s", session.name, exc)
    hub.sessions.drop(session, "protocol error")
    await send_error(send, 400, "invalid_frames", "The frames break the tunnel protocol.")


async def register(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    if await _misdirected(hub, scope, send):
        return
    authorization = header(scope, b"authorization")
    spec = hub.connector_spec(authorization)
    if spec is None and hub.enrollment.enrolled.pending(authorization):
        await send_error(send, 403, "pending_approval", "This connector is enrolled and awaits an admin's approval.")
        return
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
        session = hub.sessions.register(spec, frames[0], _remote(scope), _proxy(scope))
    except Refused as exc:
        log.warning("connector %s refused: %s", spec.name, exc)
        await send_error(send, exc.status, exc.code, str(exc))
        return
    settings = hub.settings
    # A broker alone names no broker id: its connectors pin nothing, as before there were several.
    broker_id = hub.peers.broker_id if hub.peers.enabled else ""
    body = encode(Welcome(session.credential, settings.ping_interval, settings.resume_grace, broker_id))
    await send({"type": "http.response.start", "status": 200, "headers": _FRAMES_HEADERS})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _received(scope: Scope) -> int | None:
    """The poll's count of frames the connector has (None: not a count)."""
    value = header(scope, RECEIVED_HEADER.encode()) or "0"
    return int(value) if value.isdigit() and len(value) < 20 else None


async def poll(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    session = await _session(hub, scope, send)
    if session is None:
        return
    received = _received(scope)
    protocol = "h2" if scope.get("http_version") == "2" else "http/1.1"
    short = scope.get("query_string", b"").decode("latin-1") == SHORT_POLL_QUERY
    try:
        if received is None:
            raise ProtocolError(f"{RECEIVED_HEADER} is not a count")
        generation = hub.poll_attached(session, received, protocol + (" short-poll" if short else ""))
    except ProtocolError as exc:
        await _refuse_frames(hub, session, send, exc)
        return
    if short:
        await _short_poll(hub, session, send, generation)
        return
    await send({"type": "http.response.start", "status": 200, "headers": _poll_headers(hub, session)})
    lost = asyncio.Event()
    watcher = asyncio.ensure_future(_watch(receive, session, generation, lost))
    settings = hub.settings
    until = time.monotonic() + settings.poll_lifetime
    data: bytes | None = session.first_write()
    try:
        while data is not None:
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if lost.is_set():
                break
            data = await session.next_write(generation, settings.ping_interval, until)
    finally:
        watcher.cancel()
        session.detach_poll(generation)  # the session waits for the next poll (a resume)
    if not lost.is_set():
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _short_poll(hub: Hub, session: Session, send: Send, generation: int) -> None:
    """A poll that returns as soon as it has frames, for paths that buffer whole responses."""
    wait = min(hub.settings.ping_interval, SHORT_POLL_WAIT)
    try:
        data = await session.next_write(generation, wait, time.monotonic() + wait)
    finally:
        session.detach_poll(generation)
    await send({"type": "http.response.start", "status": 200, "headers": _poll_headers(hub, session)})
    await send({"type": "http.response.body", "body": data or session.first_write(), "more_body": False})


async def _watch(receive: Receive, session: Session, generation: int, lost: asyncio.Event) -> None:
    """The poll's connection went away: the session stays, for the connector to resume."""
    while (await receive())["type"] != "http.disconnect":
        pass
    lost.set()
    session.detach_poll(generation)


async def reply(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    """One body of the uplink (streamed, or one of a series of short ones); each frame goes
    to its request as it arrives. A body cut short loses nothing: the connector sends
    again what was not acknowledged."""
    session = await _session(hub, scope, send)
    if session is None:
        return
    reader = session.inbound()
    if reader is None:
        await send_error(send, 429, "too_many_uplinks", "Too many uplink bodies open for this session.")
        return
    try:
        await _read_uplink(hub, session, reader, receive, send)
    finally:
        session.done_inbound()


async def _read_uplink(hub: Hub, session: Session, reader: Inbound, receive: Receive, send: Send) -> None:
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if session.closed:  # revoked, replaced or reaped: nothing more it sends counts
                await send_error(send, 401, "unknown_session", "This session is over; register again.")
                return
            for notice in session.receive(reader, message.get("body", b"")):
                if isinstance(notice, Drain):
                    hub.sessions.retire(session, notice.reason)
                else:  # more room on a connector: waiting requests look again
                    hub.admission.freed()
            if not message.get("more_body", False):
                reader.finish()
                break
    except ProtocolError as exc:
        await _refuse_frames(hub, session, send, exc)
        return
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
