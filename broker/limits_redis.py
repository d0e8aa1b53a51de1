"""The limits of several brokers, shared through Redis: one Lua script call per admission."""

import asyncio
import contextlib
import logging
import secrets
import string
import time
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar, get_args

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker.limits import (
    DAY,
    EPSILON,
    MINUTE,
    PARALLEL_RETRY_AFTER,
    UNAVAILABLE,
    Clock,
    Lease,
    LimitName,
    Limits,
    MemoryLimiter,
    Rejection,
    bounded,
    ratelimit_headers,
    rejection,
)

log = logging.getLogger("remotellm.limits")
T = TypeVar("T")
RedisPolicy = Literal["local", "refuse"]
_LIMIT_NAMES: dict[bytes, LimitName] = {name.encode(): name for name in get_args(LimitName)}

# Redis: every wait is bounded; after a failure, Redis is tried again only after this long.
REDIS_TIMEOUT = 1.0
REDIS_RETRY_INTERVAL = 1.0
REDIS_POOL_SIZE = 32
# Under a burst, calls queue for a pooled connection: longer than one call's timeout.
REDIS_QUEUE_TIMEOUT = 10.0
# A slot held in Redis by a broker that died frees itself after this long; a live broker
# renews its leases three times per period, however long its requests last.
LEASE_TTL = 60.0
KEY_PREFIX = "remotellm:limits"

# Both scripts: KEYS[1] the user's hash (request and token arrival times, the day and its
# tokens), KEYS[2] the user's leases (a sorted set: lease id -> expiry time). ARGV[1] is the
# time in seconds, or "" for the Redis server's clock (one clock for every broker).
# Python's constants replace the $NAMES. Numbers are stored with %.17g: Lua's tostring keeps
# only 14 digits, too few for exactness.
_LUA_NOW = """
local now = tonumber(ARGV[1])
if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
_LUA_COMMON = (
    _LUA_NOW
    + """
local MINUTE, DAY, EPSILON = $MINUTE, $DAY, $EPSILON
local function used(tat, limit) return math.max(0, tat - now) * limit / MINUTE end
local function advance(tat, limit, units) return math.max(now, math.max(tat, now) + units * MINUTE / limit) end
local function exact(number) return string.format('%.17g', number) end
local state = redis.call('HMGET', KEYS[1], 'request_tat', 'token_tat', 'day', 'day_tokens')
local request_tat, token_tat = tonumber(state[1]) or 0, tonumber(state[2]) or 0
"""
)

# ARGV: now, requests_per_minute, tokens_per_minute, max_parallel, tokens_per_day (0: none),
# reserve, lease id, lease ttl, parallel retry-after. Returns {refused limit or '',
# wait (string), remaining requests, remaining tokens, day of the reservation}.
_ADMIT_LUA = (
    _LUA_COMMON
    + """
local rpm, tpm, parallel, per_day = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local reserve, lease, ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local today = math.floor(now / DAY)
local day_tokens = 0
if tonumber(state[3]) == today then day_tokens = tonumber(state[4]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local function wait(tat, limit)
    local excess = used(tat, limit) + 1 - limit
    if excess > EPSILON then return excess * MINUTE / limit end
    return 0
end
local function remaining()
    local requests, tokens = 0, 0
    if rpm > 0 then requests = math.max(0, math.floor(rpm - used(request_tat, rpm) + EPSILON)) end
    if tpm > 0 then tokens = math.max(0, math.floor(tpm - used(token_tat, tpm) + EPSILON)) end
    return requests, tokens
end
local refused, longest = '', 0
if per_day > 0 and day_tokens >= per_day then
    refused = 'tokens_per_day'
else
    local waits = {}
    if rpm > 0 then waits[#waits + 1] = {'requests_per_minute', wait(request_tat, rpm)} end
    if tpm > 0 then waits[#waits + 1] = {'tokens_per_minute', wait(token_tat, tpm)} end
    if parallel > 0 and redis.call('ZCARD', KEYS[2]) >= parallel then
        waits[#waits + 1] = {'max_parallel', tonumber(ARGV[9])}
    end
    for _, pair in ipairs(waits) do
        if pair[2] > longest then refused, longest = pair[1], pair[2] end
    end
end
if refused ~= '' then
    local requests, tokens = remaining()
    return {refused, exact(longest), requests, tokens, today}
end
if rpm > 0 then request_tat = advance(request_tat, rpm, 1) end
if tpm > 0 then token_tat = advance(token_tat, tpm, reserve) end
redis.call('HSET', KEYS[1], 'request_tat', exact(request_tat), 'token_tat', exact(token_tat),
    'day', today, 'day_tokens', day_tokens + reserve)
redis.call('EXPIRE', KEYS[1], 2 * DAY)
redis.call('ZADD', KEYS[2], now + ttl, lease)
redis.call('EXPIRE', KEYS[2], math.ceil(ttl))
local requests, tokens = remaining()
return {'', '0', requests, tokens, today}
"""
)

# ARGV: now, tokens_per_minute (0: none), correction (tokens used - reserved), day, lease id.
_SETTLE_LUA = (
    _LUA_COMMON
    + """
local tpm, correction, day = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 then redis.call('HSET', KEYS[1], 'token_tat', exact(advance(token_tat, tpm, correction))) end
if tonumber(state[3]) == day then
    redis.call('HSET', KEYS[1], 'day_tokens', math.max(0, tonumber(state[4]) + correction))
end
redis.call('ZREM', KEYS[2], ARGV[5])
return 0
"""
)


def _lua(script: str) -> str:
    return string.Template(script).substitute(MINUTE=MINUTE, DAY=DAY, EPSILON=repr(EPSILON))


# KEYS[1] the user's leases; ARGV: now, lease ttl, then the ids of the leases this broker
# still holds. XX: a lease settled meanwhile is not brought back.
_RENEW_LUA = (
    _LUA_NOW
    + """
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[i]) end
return 0
"""
)

# What "Redis is unreachable" looks like through redis-py: anything else is a bug, and raises.
REDIS_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def redis_client(url: str) -> "aioredis.Redis":
    """A client whose every wait is bounded: a dead Redis costs an admission at most ~2 s."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_QUEUE_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        # One retry: a pooled connection broken by a Redis restart gets one fresh attempt.
        retry=Retry(NoBackoff(), 1),
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def _release_orphan(admission: "asyncio.Task[Lease | Rejection]") -> None:
    if not admission.cancelled() and admission.exception() is None:
        verdict = admission.result()
        if isinstance(verdict, Lease):
            verdict.release()


class RedisLimiter:
    """The limits of several brokers sharing one Redis: one script call per admission.

    ``clock``: None uses Redis's own clock (brokers' clocks may differ); the tests pass one.
    ``on_unreachable``: what admission does while Redis cannot be reached —
    ``"local"``: each broker enforces the limits alone, from its memory (never unlimited; at
    worst the limits times the number of brokers), with one log line when Redis goes and one
    when it is back; ``"refuse"``: 503 ``limits_unavailable``.

    Leases in Redis expire after ``lease_ttl`` unless renewed: this broker renews those it
    holds (``renew``, every third of the period), so the slots of a broker that died, or
    whose release could not reach Redis, come back within ``lease_ttl``.
    """

    def __init__(
        self,
        client: "aioredis.Redis",
        *,
        on_unreachable: RedisPolicy = "local",
        clock: Clock | None = None,
        prefix: str = KEY_PREFIX,
        lease_ttl: float = LEASE_TTL,
        retry_interval: float = REDIS_RETRY_INTERVAL,
    ) -> None:
        self.client = client
        self.on_unreachable = on_unreachable
        self.local = MemoryLimiter(clock or time.time)
        self._clock = clock
        self._prefix = prefix
        self._lease_ttl = lease_ttl
        self._retry_interval = retry_interval
        self._unreachable_since: float | None = None  # monotonic time of an outage's first failure
        self._pending: set[asyncio.Task[Any]] = set()
        self._held: dict[str, set[str]] = {}  # user -> ids of the leases this broker holds in Redis
        self._renewer: asyncio.Task[None] | None = None
        self._admit = client.register_script(_lua(_ADMIT_LUA))
        self._settle = client.register_script(_lua(_SETTLE_LUA))
        self._renew = client.register_script(_lua(_RENEW_LUA))

    def _keys(self, user: str) -> list[str]:
        # The user in braces: a Redis Cluster keeps both keys of one user in one slot.
        return [f"{self._prefix}:{{{user}}}", f"{self._prefix}:{{{user}}}:leases"]

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    async def admit(self, user: str, limits: Limits, reserve: int) -> Lease | Rejection:
        # A task of its own: a caller cancelled while the script runs must not leave a slot
        # taken in Redis; the lease it would have had is released when the script answers.
        task = self._spawn(self._admit_once(user, limits, reserve))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_release_orphan)
            raise

    async def _admit_once(self, user: str, limits: Limits, reserve: int) -> Lease | Rejection:
        if self._unreachable_since is not None and time.monotonic() - self._unreachable_since < self._retry_interval:
            return self._fallback(user, limits, reserve)
        lease_id = secrets.token_hex(8)
        reserve = bounded(reserve)
        args: list[str | int | float] = [
            self._now(),
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_parallel or 0,
            limits.tokens_per_day or 0,
            reserve,
            lease_id,
            self._lease_ttl,
            PARALLEL_RETRY_AFTER,
        ]
        try:
            refused, wait, requests, tokens, day = await self._admit(self._keys(user), args)
        except REDIS_UNREACHABLE as exc:
            self._lost(exc)
            return self._fallback(user, limits, reserve)
        if self._unreachable_since is not None:
            log.warning("redis reachable again: limits shared by every broker again")
            self._unreachable_since = None
        if refused:
            return rejection(limits, _LIMIT_NAMES[refused], float(wait), (requests, tokens))
        self._held.setdefault(user, set()).add(lease_id)
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever())

        def finish(tokens_used: int) -> "asyncio.Future[None]":
            self._held[user].discard(lease_id)
            return self._spawn(self._finish(user, limits, day, lease_id, tokens_used - reserve))

        return Lease(ratelimit_headers(limits, requests, tokens), finish)

    def _policy_words(self) -> str:
        return "enforced by each broker alone" if self.on_unreachable == "local" else "refusing every limited request"

    def _fallback(self, user: str, limits: Limits, reserve: int) -> Lease | Rejection:
        return self.local.admit_now(user, limits, reserve) if self.on_unreachable == "local" else UNAVAILABLE

    async def _finish(self, user: str, limits: Limits, day: int, lease_id: str, correction: int) -> None:
        args: list[str | int | float] = [self._now(), limits.tokens_per_minute or 0, correction, day, lease_id]
        try:
            await self._settle(self._keys(user), args)
        except REDIS_UNREACHABLE as exc:
            self._lost(exc)  # the slot frees itself when its lease expires

    async def renew(self) -> None:
        """Extends the leases this broker holds: one pipelined round trip for all of them."""
        for user in [user for user, ids in self._held.items() if not ids]:
            del self._held[user]
        held = [(self._keys(user)[1], list(ids)) for user, ids in self._held.items()]  # admissions go on meanwhile
        if not held:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for leases, ids in held:
                await self._renew([leases], [self._now(), self._lease_ttl, *ids], client=pipe)
            await pipe.execute()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                await self.renew()
            except REDIS_UNREACHABLE as exc:
                self._lost(exc)
            except Exception:  # a renewer that died would let every lease expire: log, go on
                log.exception("renewing the leases in redis failed")

    def _lost(self, exc: Exception) -> None:
        """One log line per outage, not one per request."""
        if self._unreachable_since is None:
            log.warning(
                "redis unreachable (%s: %s): limits now %s; leases held there expire within %.0f s",
                type(exc).__name__,
                exc,
                self._policy_words(),
                self._lease_ttl,
            )
        self._unreachable_since = time.monotonic()

    def _spawn(self, work: Coroutine[object, object, T]) -> "asyncio.Task[T]":
        """Runs ``work`` as a task of its own, held here: a cancelled caller cannot stop it."""
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def in_flight(self, user: str) -> int:
        if self._clock is not None:
            now = self._clock()
        else:
            seconds, microseconds = await self.client.time()
            now = seconds + microseconds / 1e6
        return int(await self.client.zcount(self._keys(user)[1], f"({now!r}", "+inf"))

    async def aclose(self, timeout: float = 5.0) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)
        with contextlib.suppress(*REDIS_UNREACHABLE):
            await self.client.aclose()
