"""Which connector created a stored object (a Responses API response): its by-id routes go there.

Keyed by the connector's own id (``Hello.connector_id``): one connector holds a session with
every broker, so whichever broker a follow-up reaches routes it to its own session with that
connector. With Redis every broker sees every id; without, each broker knows its own.
"""

import contextlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.asyncio as aioredis

from broker.limits_redis import REDIS_RETRY_INTERVAL, REDIS_UNREACHABLE, redis_client

log = logging.getLogger("remotellm.affinity")

# The first "id" of a Responses body or stream: the top-level id of a JSON response, the
# response's own id inside the first SSE event (response.created).
_FIRST_ID = re.compile(rb'"id"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{1,256})"')
SNIFF_LIMIT = 64 * 1024  # the id comes within the first bytes; nobody scans further
MAX_ENTRIES = 100_000
KEY_PREFIX = "remotellm:affinity:"
# A connector id longer than this is not stored in Redis (a hostile connector's megabyte id
# would be copied once per response): such a connector keeps its ids on one broker only.
MAX_SHARED_CONNECTOR_ID = 256


class Affinity(Protocol):
    async def remember(self, object_id: str, connector: str) -> None: ...
    async def connector_of(self, object_id: str) -> str | None: ...
    async def aclose(self) -> None: ...


class MemoryAffinity:
    """object id → connector id, forgotten after ``ttl`` seconds or when the oldest of
    ``max_entries`` makes room (least recently used first)."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def remember(self, object_id: str, connector: str) -> None:
        self._entries[object_id] = (connector, time.monotonic() + self.ttl)
        self._entries.move_to_end(object_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def connector_of(self, object_id: str) -> str | None:
        entry = self._entries.get(object_id)
        if entry is None:
            return None
        connector, expires = entry
        if expires < time.monotonic():
            del self._entries[object_id]
            return None
        self._entries.move_to_end(object_id)
        return connector

    async def aclose(self) -> None:
        pass


class RedisAffinity:
    """Every broker's ids in one Redis: one SET per response created, one GET per lookup of an
    id this broker did not create itself (its own are kept in memory too).

    While Redis is unreachable — whatever ``redis_unreachable`` says, which is about limits —
    each broker knows only the ids it created: a follow-up of another broker's response is then
    routed by its model, and a by-id route answers 404. Redis is tried again after
    ``retry_interval``, so an outage does not cost every lookup a timeout.
    """

    def __init__(
        self, client: "aioredis.Redis", ttl: float, *, prefix: str = KEY_PREFIX,
        retry_interval: float = REDIS_RETRY_INTERVAL,
    ) -> None:  # fmt: skip
        self.client = client
        self.local = MemoryAffinity(ttl)
        self._expire = max(1, math.ceil(ttl))
        self._prefix = prefix
        self._retry_interval = retry_interval
        self._down_since: float | None = None

    async def remember(self, object_id: str, connector: str) -> None:
        await self.local.remember(object_id, connector)
        if len(connector) <= MAX_SHARED_CONNECTOR_ID:
            await self._call(lambda: self.client.set(self._prefix + object_id, connector, ex=self._expire))

    async def connector_of(self, object_id: str) -> str | None:
        found = await self.local.connector_of(object_id)
        if found is not None:
            return found
        value = await self._call(lambda: self.client.get(self._prefix + object_id))
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else None

    async def _call(self, command: Callable[[], Awaitable[object]]) -> object:
        """One round trip, or None while Redis is out of reach (logged once per outage)."""
        down = self._down_since
        if down is not None and time.monotonic() - down < self._retry_interval:
            return None
        try:
            result = await command()
        except REDIS_UNREACHABLE as exc:
            if down is None:
                log.warning("redis unreachable (%s): response ids known to this broker only", type(exc).__name__)
            self._down_since = time.monotonic()
            return None
        if down is not None:
            log.warning("redis reachable again: response ids shared by every broker again")
            self._down_since = None
        return result

    async def aclose(self) -> None:
        with contextlib.suppress(*REDIS_UNREACHABLE):
            await self.client.aclose()


class IdSniffer:
    """Fed a successful Responses body as it is relayed: the first id in it is remembered as
    made by ``creator`` — before the bytes that carry it go out, so that a follow-up sent the
    moment the user reads the id finds it, through any broker."""

    __slots__ = ("_head", "_remember", "creator", "done", "found")

    def __init__(self, remember: Callable[[str, str], Awaitable[None]]) -> None:
        self._remember = remember
        self._head = b""
        self.creator = ""  # the connector id of the session this attempt went to
        self.found: str | None = None
        self.done = False

    def stop(self) -> None:
        """Search no further: the body is not a created response's."""
        self.done = True

    async def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._head += data[: SNIFF_LIMIT - len(self._head)]
        match = _FIRST_ID.search(self._head)
        self.done = match is not None or len(self._head) >= SNIFF_LIMIT
        if match:
            self.found = match.group(1).decode("ascii")
            await self._remember(self.found, self.creator)


def affinity_of(redis_url: str | None, ttl: float) -> Affinity:
    """Shared through Redis when there is one, else this broker's memory."""
    return RedisAffinity(redis_client(redis_url), ttl) if redis_url else MemoryAffinity(ttl)
