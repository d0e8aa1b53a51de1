"""The broker's state: who may connect, which sessions are live, where a model goes.

Endpoints stay thin and call into the Hub; the Hub knows nothing of HTTP.
"""

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from broker.config import ConnectorSpec
from broker.keys import bearer, find_secret
from broker.logs import RequestLog, log
from broker.metrics import Metrics
from broker.router import AtCapacity, ModelRouter, Route, RouteError
from broker.settings import Settings
from broker.throttle import AuthThrottle
from broker.tunnel import Exchange, Interrupt, Session
from wire import Chunk, Credit, Drain, End, Head, Hello, Models, Pong

# A connector silent (no reply or heartbeat), or without a poll, for this many ping
# intervals is dropped.
SILENT_PINGS = 3
DISCOVERY_TIMEOUT = 30.0
DISCOVERY_RETRY_MAX = 60.0


class Refused(Exception):
    """A registration the broker will not accept; the message is safe to show."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _ModelList(msgspec.Struct):
    class _Model(msgspec.Struct):
        id: str

    data: list[_Model]


class Hub:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.request_log = RequestLog(settings.log_format)
        self.sessions: dict[str, Session] = {}
        allowlisted = frozenset().union(*(s.models or () for s in settings.connectors))
        self.router: ModelRouter[Session] = ModelRouter(allowlisted)
        self._token_digests = tuple(spec.token_digest for spec in settings.connectors)
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.auth_throttle = AuthThrottle()
        self.shutting_down = False

    # --- authentication -------------------------------------------------

    def user_allowed(self, authorization: str | None) -> bool:
        key = bearer(authorization)
        return key is not None and find_secret(key, self.settings.user_key_digests) is not None

    def connector_spec(self, authorization: str | None) -> ConnectorSpec | None:
        token = bearer(authorization)
        if token is None:
            return None
        index = find_secret(token, self._token_digests)
        return None if index is None else self.settings.connectors[index]

    def session_of(self, spec: ConnectorSpec, session_id: str | None) -> Session | None:
        session = self.sessions.get(session_id or "")
        if session is None or session.spec is not spec or session.closed:
            return None
        return session

    # --- session lifecycle ---------------------------------------------

    def register(self, spec: ConnectorSpec, hello: Hello, remote: str) -> Session:
        if self.shutting_down:
            raise Refused(503, "shutting_down", "this broker is shutting down; try again shortly")
        if spec.models is not None:
            refused = sorted(set(hello.models) - spec.models)
            if refused:
                raise Refused(
                    403,
                    "model_not_allowed",
                    f"this connector's token may not serve: {', '.join(refused)}",
                )
        for old in list(self.sessions.values()):
            if old.spec is spec and old.hello.connector_id == hello.connector_id:
                self.drop(old, "replaced by a new registration")
        session = Session(spec, hello, remote)
        self.sessions[session.id] = session
        log.info("connector %s registered from %s (models: %s)", spec.name, remote, _models_text(hello))
        return session

    def poll_attached(self, session: Session, protocol: str) -> int:
        generation = session.attach_poll()
        session.protocol = protocol
        if generation == 1:
            if session.hello.models:
                self._route(session, frozenset(session.hello.models))
            else:
                self._spawn(self._discover(session))
        return generation

    def drop(self, session: Session, reason: str) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        self.router.remove(session)
        session.close()
        self.metrics.connectors.set(len(self.router.connectors()))
        log.info("connector %s dropped: %s", session.name, reason)

    def start(self) -> None:
        self._spawn(self._reap())

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self.drop(session, "broker shutting down")
        for task in self._tasks:
            task.cancel()

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: tell every connector, refuse new work, let requests in flight end."""
        self.shutting_down = True
        for session in self.sessions.values():
            session.send(Drain("broker shutting down"))
        deadline = time.monotonic() + timeout
        while any(s.exchanges for s in self.sessions.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.close()

    def heartbeat(self, session: Session, pong: Pong) -> None:
        session.touch()

    def retire(self, session: Session, reason: str) -> None:
        """The connector is leaving: route nothing new to it; drop it once its replies end."""
        log.info("connector %s is leaving: %s", session.name, reason)
        session.leaving = True
        self.router.remove(session)
        self.metrics.connectors.set(len(self.router.connectors()))
        if not session.exchanges:
            self.drop(session, "left")

    async def _reap(self) -> None:
        """Drops sessions that went silent (a frozen or half-open connector) or stopped polling."""
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval / 2)
            deadline = time.monotonic() - SILENT_PINGS * interval
            for session in list(self.sessions.values()):
                if session.last_seen < deadline:
                    self.drop(session, "silent")
                elif not session.polling and session.unpolled_since < deadline:
                    self.drop(session, "not polling")

    def _route(self, session: Session, models: frozenset[str]) -> None:
        if session.closed:
            return
        self.router.set_models(session, models)
        session.send(Models(sorted(models)))
        self.metrics.connectors.set(len(self.router.connectors()))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discover(self, session: Session) -> None:
        """List the LLM's models through the tunnel: only the broker has the LLM key."""
        delay = 1.0
        while not session.closed:
            models = await self._list_models(session)
            if models is not None:
                allowed = session.spec.models
                self._route(session, models if allowed is None else models & allowed)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, DISCOVERY_RETRY_MAX)

    async def _list_models(self, session: Session) -> frozenset[str] | None:
        exchange = session.open("GET", "/v1/models", "", [("accept", "application/json")], b"")
        ended = False
        try:
            async with asyncio.timeout(DISCOVERY_TIMEOUT):
                status, body, ended = await _collect(exchange)
        except TimeoutError:
            status, body = 0, b""
        finally:
            session.finish(exchange, cancel=not ended)
        try:
            if status == 200:
                return frozenset(m.id for m in msgspec.json.decode(body, type=_ModelList).data)
        except msgspec.MsgspecError:
            pass
        log.warning("connector %s: listing the LLM's models failed (status %s)", session.name, status)
        return None

    # --- routing ---------------------------------------------------------

    async def route(self, model: str) -> Route[Session]:
        """A route for the model, waiting briefly for a free slot; raises RouteError."""
        deadline = time.monotonic() + self.settings.queue_timeout
        while True:
            try:
                return self.router.get_route(model)
            except AtCapacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), remaining)

    def alternate(self, model: str, failed: Session) -> Session | None:
        """Another live connector with a free slot for a request that lost its own."""
        try:
            return self.router.get_route(model, exclude=failed).connector
        except RouteError:
            return None

    def finish(self, exchange: Exchange, *, cancel: bool) -> None:
        session = exchange.session
        session.finish(exchange, cancel=cancel)
        if session.leaving and not session.exchanges:
            self.drop(session, "left")
        event, self._slot_freed = self._slot_freed, asyncio.Event()
        event.set()


async def _collect(exchange: Exchange) -> tuple[int, bytes, bool]:
    status, parts = 0, []
    while True:
        event = await exchange.events.get()
        if isinstance(event, Head):
            status = event.status
        elif isinstance(event, Chunk):
            parts.append(event.data)
            exchange.session.send(Credit(exchange.id, len(event.data)))
        elif isinstance(event, End):
            return (status if event.error is None else 0), b"".join(parts), True
        elif isinstance(event, Interrupt):
            return 0, b"", False


def _models_text(hello: Hello) -> str:
    return ", ".join(hello.models) if hello.models else "to be discovered"
