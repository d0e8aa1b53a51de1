"""The broker's live sessions: registration, resume, retirement, the reaper, and drain."""

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from broker.config import ConnectorSpec
from broker.logs import log
from broker.metrics import Metrics
from broker.router import ModelRouter
from broker.settings import Settings
from broker.tunnel import Session
from wire import DEAD_AFTER_PINGS, PROTOCOL_VERSION, Hello, check_models


class Refused(Exception):
    """A registration the broker will not accept; the message is safe to show."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


HISTORY_LENGTH = 500  # connects and disconnects kept for the console


@dataclass(frozen=True, slots=True)
class Event:
    """A connect or disconnect, for the console's history (no secret in it)."""

    at: float
    name: str
    connector_id: str
    connected: bool
    detail: str  # where from (and through which proxy), or why it ended


class Sessions:
    """Every session this broker holds, keyed by resume credential; the only code that
    starts or ends one."""

    def __init__(self, settings: Settings, router: ModelRouter[Session], metrics: Metrics) -> None:
        self.settings = settings
        self._router = router
        self._metrics = metrics
        self._sessions: dict[str, Session] = {}
        self.shutting_down = False
        self.history: deque[Event] = deque(maxlen=HISTORY_LENGTH)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def find(self, spec: ConnectorSpec, credential: str | None) -> Session | None:
        """The session this credential resumes, if the same token registered it."""
        session = self._sessions.get(credential or "")
        if session is None or session.spec.token_digest != spec.token_digest or session.closed:
            return None
        return session

    def register(self, spec: ConnectorSpec, hello: Hello, remote: str, proxy: str | None = None) -> Session:
        """A new session; raises Refused, with the reason the connector is shown. ``proxy``:
        the proxy its request came through, when one said so (a Via header)."""
        self._check(spec, hello)
        for old in self:
            if old.spec.token_digest == spec.token_digest and old.hello.connector_id == hello.connector_id:
                self.drop(old, "replaced by a new registration")
        if sum(s.spec.token_digest == spec.token_digest for s in self) >= self.settings.sessions_per_token:
            limit = self.settings.sessions_per_token
            raise Refused(429, "too_many_sessions", f"this token holds {limit} sessions already")
        session = Session(spec, hello, self.settings.limits)
        self._sessions[session.credential] = session
        self._metrics.registrations.labels(spec.name).inc()
        models = ", ".join(hello.models) if hello.models else "to be discovered"
        log.info("connector %s registered from %s (models: %s)", spec.name, remote, models)
        where = f"from {remote}" + (f" via {proxy}" if proxy else "")
        self.history.append(Event(time.time(), spec.name, hello.connector_id, True, where))
        return session

    def _check(self, spec: ConnectorSpec, hello: Hello) -> None:
        if self.shutting_down:
            raise Refused(503, "shutting_down", "this broker is shutting down; try again shortly")
        if hello.protocol != PROTOCOL_VERSION:
            message = f"tunnel protocol {hello.protocol} is not supported (this broker speaks {PROTOCOL_VERSION})"
            raise Refused(400, "unsupported_protocol", message)
        why = check_models(hello.models, self.settings.limits)
        if why is not None:
            raise Refused(400, "invalid_models", why)
        if spec.models is not None:
            refused = sorted(set(hello.models) - spec.models)
            if refused:
                raise Refused(403, "model_not_allowed", f"this connector's token may not serve: {', '.join(refused)}")

    def drop(self, session: Session, reason: str) -> None:
        if self._sessions.pop(session.credential, None) is None:
            return
        self._router.remove(session)
        session.close()
        log.info("connector %s dropped: %s", session.name, reason)
        self.history.append(Event(time.time(), session.name, session.hello.connector_id, False, reason))

    def retire(self, session: Session, reason: str) -> None:
        """The connector is leaving: route nothing new to it; drop it once its replies end."""
        log.info("connector %s is leaving: %s", session.name, reason)
        session.leave()
        self._router.remove(session)
        self.settle(session)

    def settle(self, session: Session) -> None:
        """A request of the session ended: a leaving session goes once it has none."""
        if session.leaving and not session.exchanges:
            self.drop(session, "left")

    def revoke(self, still_valid: Callable[[Session], ConnectorSpec | None]) -> None:
        """After a reload: sessions whose token is gone end now, the rest take their new spec."""
        for session in self:
            spec = still_valid(session)
            if spec is None:
                self.drop(session, "token revoked")
            else:
                session.renew(spec)

    async def reap(self) -> None:
        """Drops sessions not resumed within the grace period, or silent (a frozen connector
        whose connections look open) for as long again."""
        settings = self.settings
        while True:
            await asyncio.sleep(min(settings.ping_interval, settings.resume_grace) / 2)
            now = time.monotonic()
            silent_after = DEAD_AFTER_PINGS * settings.ping_interval + settings.resume_grace
            for session in self:
                if session.closed:
                    self.drop(session, "given up")
                elif not session.polling and now - session.detached_since > settings.resume_grace:
                    self.drop(session, "not resumed in time")
                elif now - session.last_seen > silent_after:
                    self.drop(session, "silent")

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: tell every connector, refuse new work, let requests in flight end."""
        self.shutting_down = True
        for session in self:
            session.drain("broker shutting down")
            self._router.remove(session)  # new requests get 503 from now on
        deadline = time.monotonic() + timeout
        while any(s.exchanges for s in self) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.close()

    def close(self) -> None:
        for session in self:
            self.drop(session, "broker shutting down")

    @property
    def in_flight(self) -> int:
        return sum(session.in_flight for session in self._sessions.values())
