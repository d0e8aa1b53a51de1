"""The broker's composition root: settings, authentication, and the parts that hold state.

Sessions (broker.sessions), model placement and discovery (broker.models), admission
(broker.admission), the config watch (broker.config_watch) and the notices between brokers
(broker.notices) each own one job; the Hub wires them together and knows nothing of HTTP.
"""

import asyncio
import functools
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from broker import config_watch
from broker.admission import Accepts, Admission
from broker.body import BodyBudget
from broker.config import ConfigError, ConnectorSpec
from broker.enrollment import Enrollment
from broker.keys import bearer, find_secret
from broker.logs import RequestLog, log
from broker.metrics import Metrics, Snapshot
from broker.models import ModelPlacement
from broker.notices import Notices
from broker.peers import Listing, Peers
from broker.router import ModelRouter
from broker.sessions import Sessions
from broker.settings import Settings
from broker.throttle import AuthThrottle
from broker.tunnel import Exchange, Session
from broker.users import Caller, users_of
from wire import End


class Hub:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.snapshot)
        self.request_log = RequestLog(settings.log_format)
        self.router: ModelRouter[Session] = ModelRouter()
        self.sessions = Sessions(settings, self.router, self.metrics)
        self.placement = ModelPlacement(settings, self.router)
        self.admission = Admission(self.router, settings.queue_timeout)
        self.body_budget = BodyBudget(settings.body_memory_limit)
        self.users = users_of(settings)
        self.auth_throttle = AuthThrottle()
        self._token_digests = tuple(spec.token_digest for spec in settings.connectors)
        self.enrollment = Enrollment(settings.database, self.revoke)
        self._tasks: set[asyncio.Task[None]] = set()
        self.notices: Notices | None = None  # with Redis: reloads and revocations reach every broker at once
        self.peers = Peers(settings, self._announce)
        _log_warnings(settings)

    def snapshot(self) -> Snapshot:
        by_protocol: dict[str, int] = {}
        for session in self.router.connectors():
            by_protocol[session.protocol] = by_protocol.get(session.protocol, 0) + 1
        return Snapshot(self.sessions.in_flight, self.admission.queued, by_protocol)

    # --- authentication -------------------------------------------------

    def identify(self, authorization: str | None, api_key: str | None) -> Caller | None:
        """Who presents this key (None: nobody; counted as an auth failure)."""
        caller = self.users.identify(authorization, api_key)
        if caller is None:
            self.metrics.auth_failures.labels("user").inc()
        return caller

    def connector_spec(self, authorization: str | None) -> ConnectorSpec | None:
        token = bearer(authorization)
        if token is None:
            return None
        index = find_secret(token, self._token_digests)
        if index is not None:
            return self.settings.connectors[index]
        spec = self.enrollment.approved(authorization)
        if spec is None:
            self.metrics.auth_failures.labels("tunnel").inc()
        return spec

    def recycle_polls(self, identity: bytes) -> None:
        """The polls of this connector's sessions end; each comes back at once on the same
        session (a resume: nothing in flight is lost), and reads its response's headers anew."""
        for session in self.sessions:
            if session.spec.token_digest == identity:
                session.detach_poll(session.poll_generation)

    def revoke(self, identities: set[bytes]) -> None:
        """The sessions of these connectors (by ``token_digest``) end now: revoked, or no longer approved."""
        self.sessions.revoke(lambda session: None if session.spec.token_digest in identities else session.spec)

    # --- a session's life ------------------------------------------------

    def poll_attached(self, session: Session, received: int, protocol: str) -> int:
        """A poll opened (or reopened: a resume); raises ProtocolError on a bad count."""
        generation = session.attach_poll(received, protocol)
        self.metrics.polls.labels(session.name).inc()
        if generation == 1:
            if self.peers.enabled:
                session.brokers(self.peers.current)
            if session.hello.models:
                session.offer(frozenset(session.hello.models))
                self.placement.place(session)
            else:
                self._spawn(self.placement.discover(session, self.finish))
        return generation

    def finish(self, exchange: Exchange, *, cancel: bool, on_end: Callable[[End], None] | None = None) -> None:
        """A request is over for its user (``cancel``: the connector may still be at it, and
        ``on_end`` gets its End when it comes, with the tokens of what was delivered)."""
        session = exchange.session
        session.finish(exchange, cancel=cancel, on_end=on_end)
        self.sessions.settle(session)
        self.admission.freed()

    async def route(self, model: str, accepts: Accepts | None = None) -> Session:
        return await self.admission.route(model, accepts)

    def alternate(self, model: str, failed: Session, accepts: Accepts) -> Session | None:
        return self.admission.alternate(model, failed, accepts)

    # --- configuration and lifetime ----------------------------------------

    def _announce(self, brokers: Listing) -> None:
        """The set of brokers changed: every connector hears of it (and dials the new ones)."""
        for session in self.sessions:
            session.brokers(brokers)

    def start(self, reload: Callable[[], Settings] | None = None) -> None:
        self._spawn(self.sessions.reap())
        settings = self.settings
        if settings.redis_url and reload is not None:
            on_config = functools.partial(self.reload_from, reload, announce=False)
            self.notices = Notices(settings.redis_url, on_config, lambda digest: self.revoke({digest}))
            self._spawn(self.notices.listen())
        self._spawn(self.peers.run())
        path = settings.connector_config
        if reload is not None and path:
            self._spawn(config_watch.watch(path, lambda: self.reload_from(reload)))

    def reload(self, settings: Settings) -> None:
        """New keys and connectors, in place: no stream is dropped, revocations act at once."""
        self.settings = replace(
            self.settings,
            user_key_digests=settings.user_key_digests,
            connectors=settings.connectors,
            allowed_paths=settings.allowed_paths,
            users=settings.users,
            admin_key_digests=settings.admin_key_digests,
            require_approval=settings.require_approval,
        )
        self.users = users_of(self.settings)
        self._token_digests = tuple(spec.token_digest for spec in settings.connectors)
        specs = {spec.token_digest: spec for spec in settings.connectors}
        self.placement.reconfigure(self.settings)
        _log_warnings(settings)
        enrolled = self.enrollment.enrolled
        self.sessions.revoke(
            lambda session: specs.get(session.spec.token_digest) or enrolled.by_identity(session.spec.token_digest)
        )
        for session in self.sessions:
            self.placement.place(session)
        log.info(
            "configuration reloaded: %d connector(s), %d named user(s), %d unnamed user key(s)",
            len(settings.connectors),
            len(settings.users),
            len(settings.user_key_digests),
        )

    def reload_from(self, load: Callable[[], Settings], *, announce: bool = True) -> None:
        """Reload (on SIGHUP, a changed file, or another broker's notice); ``announce``: tell
        the other brokers to reload theirs now."""
        try:
            self.reload(load())
        except ConfigError as exc:
            log.error("configuration not reloaded, the old one stays: %s", exc)
            return
        if announce and self.notices is not None:
            self._spawn(self.notices.config_changed())

    async def drain(self, timeout: float) -> None:
        await self.peers.leave()
        await self.sessions.drain(timeout)
        self.close()

    def close(self) -> None:
        self.sessions.close()
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        self.close()
        if self.notices is not None:
            await self.notices.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _log_warnings(settings: Settings) -> None:
    for warning in settings.warnings:
        log.warning("%s", warning)
