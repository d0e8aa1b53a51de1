"""The live set of brokers: this process and its peers, from a static list or a Redis registry.

Connectors hold a session to every broker listed here (wire.Brokers). Peers come from
three places: sibling workers of ``--workers`` (always live: their parent restarts them),
``--peer`` URLs (asked for their broker id at ``/health`` every second), and the Redis
registry of ``--redis-url`` (each broker refreshes its own key, which expires unless
refreshed). A peer not confirmed for ``EXPIRY`` seconds drops out; a draining broker
leaves the registry at once.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import httpx
import redis.exceptions

from broker.limits_redis import redis_client
from broker.settings import Settings
from wire.limits import BROKER_ID, MAX_BROKERS, check_broker_url

log = logging.getLogger("remotellm.peers")

Listing = list[tuple[str, str]]  # (broker id, URL); "" is the URL the connector came by

REFRESH = 1.0  # seconds between two refreshes of the registry key, or probes of the peers
EXPIRY = 3.0  # a peer not confirmed for this long is gone
PROBE_TIMEOUT = 1.0
LEAVE_TIMEOUT = 2.0
REGISTRY = "remotellm:brokers"  # a set of broker ids; each id's URL at REGISTRY:<id>, expiring
_PROBE_LIMIT = 64 * 1024  # bytes of a peer's /health read


class Peers:
    """Owns the live list; ``on_change`` hears each new one."""

    def __init__(self, settings: Settings, on_change: Callable[[Listing], None]) -> None:
        self.broker_id = settings.identity.broker_id
        self._own_url = settings.advertise_url or ""
        self._probed = settings.peers
        # The registry needs this broker's address to list it; Redis alone is for the limits.
        self._registry = redis_client(settings.redis_url) if settings.redis_url and settings.advertise_url else None
        self._on_change = on_change
        # Without any of these the broker is alone: no list is sent, connectors behave as ever.
        self.enabled = bool(settings.advertise_url or settings.peers or settings.identity.siblings)
        self._siblings = {sibling: self._own_url for sibling in settings.identity.siblings}
        self._seen: dict[str, tuple[str, float]] = {}  # probed peer id -> (URL, when it answered)
        self._registered: dict[str, str] = {}  # the registry's last answer
        self._registered_at = 0.0
        self._leaving = False
        self.current: Listing = self._listing(time.monotonic())

    def _listing(self, now: float) -> Listing:
        live = dict(self._siblings)
        if now - self._registered_at <= EXPIRY:
            live.update(self._registered)
        live.update({i: url for i, (url, at) in self._seen.items() if now - at <= EXPIRY})
        live.pop(self.broker_id, None)
        others = sorted(live.items())[: MAX_BROKERS - 1]
        return [(self.broker_id, self._own_url), *others] if self.enabled else []

    def _update(self) -> None:
        listing = self._listing(time.monotonic())
        if listing != self.current:
            log.info("brokers now: %s", ", ".join(f"{i} {url or '(this address)'}" for i, url in listing))
            self.current = listing
            self._on_change(listing)

    async def run(self) -> None:
        """Refresh until cancelled (nothing to do for a broker alone or with siblings only)."""
        if not (self._probed or self._registry):
            return
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT, trust_env=False) as client:
            while not self._leaving:
                await asyncio.gather(self._probe_all(client), self._refresh())
                self._update()
                await asyncio.sleep(REFRESH)

    async def leave(self) -> None:
        """This broker drains: out of the registry now, so that connectors hear of it at once."""
        self._leaving = True
        if self._registry is None:
            return
        with contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(LEAVE_TIMEOUT):
                async with self._registry.pipeline(transaction=False) as pipe:
                    pipe.delete(f"{REGISTRY}:{self.broker_id}")
                    pipe.srem(REGISTRY, self.broker_id)
                    await pipe.execute()

    async def aclose(self) -> None:
        if self._registry is not None:
            await self._registry.aclose()

    async def _probe_all(self, client: httpx.AsyncClient) -> None:
        now = time.monotonic()
        found = await asyncio.gather(*(_probe(client, url) for url in self._probed))
        for url, peer_id in zip(self._probed, found, strict=True):
            if peer_id is not None:
                self._seen[peer_id] = (url, now)

    async def _refresh(self) -> None:
        """Renew this broker's key, and read everyone's (a bounded number)."""
        if self._registry is None:
            return
        try:
            async with self._registry.pipeline(transaction=False) as pipe:
                pipe.set(f"{REGISTRY}:{self.broker_id}", self._own_url, px=int(EXPIRY * 1000))
                pipe.sadd(REGISTRY, self.broker_id)
                pipe.smembers(REGISTRY)
                members = sorted((await pipe.execute())[2])[: 4 * MAX_BROKERS]
            ids = [_text(m) for m in members]
            urls = await self._registry.mget([f"{REGISTRY}:{i}" for i in ids])
            gone = [i for i, url in zip(ids, urls, strict=True) if url is None]
            if gone:
                await self._registry.srem(REGISTRY, *gone)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("the broker registry in Redis is unreachable: %s", type(exc).__name__)
            return
        found = {i: _text(url) for i, url in zip(ids, urls, strict=True) if url is not None}
        self._registered = {i: url for i, url in found.items() if BROKER_ID.fullmatch(i) and not check_broker_url(url)}
        self._registered_at = time.monotonic()


async def _probe(client: httpx.AsyncClient, url: str) -> str | None:
    """A peer's broker id, from its /health (None: it does not answer, or not as a broker)."""
    try:
        response = await client.get(url + "/health")
        peer_id = response.json().get("broker") if len(response.content) <= _PROBE_LIMIT else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return peer_id if isinstance(peer_id, str) and BROKER_ID.fullmatch(peer_id) else None


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
