"""The broker's state: who may connect, which sessions are live, where a model goes.

Endpoints stay thin and call into the Hub; the Hub knows nothing of HTTP.
"""

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import msgspec

from broker.body import BodyBudget
from broker.config import ConfigError, ConnectorSpec
from broker.keys import bearer, find_secret, presented_key
from broker.logs import RequestLog, log
from broker.metrics import Metrics, Snapshot
from broker.router import AtCapacity, ModelRouter, RouteError
from broker.settings import Settings
from broker.throttle import AuthThrottle
from broker.tunnel import Exchange, Interrupt, Session
from wire import DEAD_AFTER_PINGS, PROTOCOL_VERSION, Chunk, Credit, Drain, End, Head, Hello, Models, Pong

DISCOVERY_TIMEOUT = 30.0
DISCOVERY_RETRY_MAX = 60.0
CONFIG_WATCH_INTERVAL = 2.0
CONFIG_SETTLE = 0.5  # a changed file is applied once it stayed the same this long (not half-written)


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
        self.metrics = Metrics(self.snapshot)
        self.queued = 0
        self.request_log = RequestLog(settings.log_format)
        self.sessions: dict[str, Session] = {}
        self.router: ModelRouter[Session] = ModelRouter(_allowlisted(settings))
        self._reserved = _allowlisted(settings)
        self.body_budget = BodyBudget(settings.body_memory_limit)
        _log_warnings(settings)
        self._token_digests = tuple(spec.token_digest for spec in settings.connectors)
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.auth_throttle = AuthThrottle()
        self.shutting_down = False

    def snapshot(self) -> Snapshot:
        by_protocol: dict[str, int] = {}
        for session in self.router.connectors():
            by_protocol[session.protocol] = by_protocol.get(session.protocol, 0) + 1
        in_flight = sum(session.in_flight for session in self.sessions.values())
        return Snapshot(in_flight, self.queued, by_protocol)

    # --- authentication -------------------------------------------------

    def user_allowed(self, authorization: str | None, api_key: str | None = None) -> bool:
        key = presented_key(authorization, api_key)
        allowed = key is not None and find_secret(key, self.settings.user_key_digests) is not None
        if not allowed:
            self.metrics.auth_failures.labels("user").inc()
        return allowed

    def connector_spec(self, authorization: str | None) -> ConnectorSpec | None:
        token = bearer(authorization)
        if token is None:
            return None
        index = find_secret(token, self._token_digests)
        if index is None:
            self.metrics.auth_failures.labels("tunnel").inc()
            return None
        return self.settings.connectors[index]

    def session_of(self, spec: ConnectorSpec, session_id: str | None) -> Session | None:
        session = self.sessions.get(session_id or "")
        if session is None or session.spec is not spec or session.closed:
            return None
        return session

    # --- session lifecycle ---------------------------------------------

    def register(self, spec: ConnectorSpec, hello: Hello, remote: str) -> Session:
        if self.shutting_down:
            raise Refused(503, "shutting_down", "this broker is shutting down; try again shortly")
        if hello.protocol != PROTOCOL_VERSION:
            message = f"tunnel protocol {hello.protocol} is not supported (this broker speaks {PROTOCOL_VERSION})"
            raise Refused(400, "unsupported_protocol", message)
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
        session = Session(spec, hello)
        self.sessions[session.id] = session
        self.metrics.registrations.labels(spec.name).inc()
        log.info("connector %s registered from %s (models: %s)", spec.name, remote, _models_text(hello))
        return session

    def poll_attached(self, session: Session, protocol: str) -> int:
        generation = session.attach_poll()
        session.protocol = protocol
        self.metrics.polls.labels(session.name).inc()
        if generation == 1:
            if session.hello.models:
                session.offered = frozenset(session.hello.models)
                self._route(session)
            else:
                self._spawn(self._discover(session))
        return generation

    def drop(self, session: Session, reason: str) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        self.router.remove(session)
        session.close()
        log.info("connector %s dropped: %s", session.name, reason)

    def start(self, reload: Callable[[], Settings] | None = None) -> None:
        self._spawn(self._reap())
        if reload is not None:
            self._spawn(self._watch_config(reload))

    def reload(self, settings: Settings) -> None:
        """New keys and connectors, in place: no stream is dropped, revocations act at once."""
        self.settings = replace(
            self.settings, user_key_digests=settings.user_key_digests, connectors=settings.connectors
        )
        self._token_digests = tuple(spec.token_digest for spec in settings.connectors)
        self.settings = replace(self.settings, allowed_paths=settings.allowed_paths)
        specs = {spec.token_digest: spec for spec in settings.connectors}
        self._reserved = _allowlisted(settings)
        self.router.know(self._reserved)
        _log_warnings(settings)
        for session in list(self.sessions.values()):
            spec = specs.get(session.spec.token_digest)
            if spec is None:
                self.drop(session, "token revoked")
                continue
            session.spec = spec
            self._route(session)
        log.info(
            "configuration reloaded: %d connector(s), %d user key(s)",
            len(settings.connectors),
            len(settings.user_key_digests),
        )

    def reload_from(self, load: Callable[[], Settings]) -> None:
        try:
            self.reload(load())
        except ConfigError as exc:
            log.error("configuration not reloaded, the old one stays: %s", exc)

    async def _watch_config(self, load: Callable[[], Settings]) -> None:
        """Reload when connectors.yaml changes (SIGHUP does it at once)."""
        path = self.settings.connector_config
        if not path:
            return
        last = _stamp(path)
        while True:
            await asyncio.sleep(CONFIG_WATCH_INTERVAL)
            stamp = _stamp(path)
            if stamp == last:
                continue
            while True:  # an editor may still be writing: wait until the file holds still
                await asyncio.sleep(CONFIG_SETTLE)
                settled, stamp = stamp, _stamp(path)
                if settled == stamp:
                    break
            last = stamp
            self.reload_from(load)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self.drop(session, "broker shutting down")
        for task in self._tasks:
            task.cancel()

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: tell every connector, refuse new work, let requests in flight end."""
        self.shutting_down = True
        for session in self.sessions.values():
            session.leaving = True
            self.router.remove(session)  # new requests get 503 from now on
            session.send(Drain("broker shutting down"))
        deadline = time.monotonic() + timeout
        while any(s.exchanges for s in self.sessions.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.close()

    def heartbeat(self, session: Session, pong: Pong) -> None:
        """A connector's sign of life, acknowledged at once: it proves its uploads arrive."""
        session.touch()
        session.last_pong = pong.ping_sent
        session.send(session.ping())

    def retire(self, session: Session, reason: str) -> None:
        """The connector is leaving: route nothing new to it; drop it once its replies end."""
        log.info("connector %s is leaving: %s", session.name, reason)
        session.leaving = True
        self.router.remove(session)
        if not session.exchanges:
            self.drop(session, "left")

    async def _reap(self) -> None:
        """Drops sessions that went silent (a frozen or half-open connector) or stopped polling."""
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval / 2)
            # Silent (no upload, no heartbeat) or not polling for that long: gone.
            deadline = time.monotonic() - DEAD_AFTER_PINGS * interval
            for session in list(self.sessions.values()):
                if session.last_seen < deadline:
                    self.drop(session, "silent")
                elif not session.polling and session.unpolled_since < deadline:
                    self.drop(session, "not polling")

    def _route(self, session: Session) -> None:
        """Route what the connector offers, as far as its token's allowlist allows."""
        if session.closed or session.leaving or session.poll_generation == 0:
            return  # (a session is routed once it polls)
        allowed = session.spec.models
        if allowed is None:  # an unrestricted token may not take models reserved to others
            models = session.offered - self._reserved
            taken = sorted(session.offered & self._reserved)
            if taken and frozenset(taken) != session.refused:
                log.warning("connector %s may not serve %s: reserved to the connectors that list them",
                            session.name, ", ".join(taken))  # fmt: skip
            session.refused = frozenset(taken)
        else:
            models = session.offered & allowed
        if models == self.router.models_of(session) and session in self.router.connectors():
            return
        self.router.set_models(session, models)
        session.send(Models(sorted(models)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discover(self, session: Session) -> None:
        """List the LLM's models through the tunnel: only the broker has the LLM key."""
        delay = 1.0
        while not session.closed:
            models = await self._list_models(session)
            if models is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, DISCOVERY_RETRY_MAX)
                continue
            delay = 1.0
            session.offered = models
            self._route(session)
            await asyncio.sleep(self.settings.model_refresh)  # the LLM may load or drop models meanwhile

    async def _list_models(self, session: Session) -> frozenset[str] | None:
        exchange = session.open("GET", "/v1/models", "", [("accept", "application/json")], b"")
        ended = False
        try:
            async with asyncio.timeout(DISCOVERY_TIMEOUT):
                status, body, ended = await _collect(exchange)
        except TimeoutError:
            status, body = 0, b""
        finally:
            self.finish(exchange, cancel=not ended)
        try:
            if status == 200:
                return frozenset(m.id for m in msgspec.json.decode(body, type=_ModelList).data)
        except msgspec.MsgspecError:
            pass
        log.warning("connector %s: listing the LLM's models failed (status %s)", session.name, status)
        return None

    # --- routing ---------------------------------------------------------

    async def route(self, model: str, accepts: Callable[[Session], bool] | None = None) -> Session:
        """A connector for the model, waiting briefly for a free slot; raises RouteError."""
        try:
            return self.router.get_route(model, accepts=accepts)
        except AtCapacity:
            pass
        deadline = time.monotonic() + self.settings.queue_timeout
        self.queued += 1
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), deadline - time.monotonic())
                try:
                    return self.router.get_route(model, accepts=accepts)
                except AtCapacity:
                    if time.monotonic() >= deadline:
                        raise
        finally:
            self.queued -= 1

    def alternate(self, model: str, failed: Session, accepts: Callable[[Session], bool]) -> Session | None:
        """Another live connector with a free slot for a request that lost its own."""
        try:
            return self.router.get_route(model, exclude=failed, accepts=accepts)
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
            exchange.buffered -= len(event.data)
            exchange.session.send(Credit(exchange.id, len(event.data)))
        elif isinstance(event, End):
            return (status if event.error is None else 0), b"".join(parts), True
        elif isinstance(event, Interrupt):
            return 0, b"", False


def _allowlisted(settings: Settings) -> frozenset[str]:
    """Every model some token's allowlist names: known (503, not 404) before any connector."""
    return frozenset().union(*(spec.models or () for spec in settings.connectors))


def _log_warnings(settings: Settings) -> None:
    for warning in settings.warnings:
        log.warning("%s", warning)


def _models_text(hello: Hello) -> str:
    return ", ".join(hello.models) if hello.models else "to be discovered"


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
