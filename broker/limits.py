"""Per-user limits, exact under concurrency, for one broker (in memory) or several (Redis).

The four limits of the contract and how each is kept:

- ``requests_per_minute``: GCRA (a "theoretical arrival time" per user; each request moves
  it 60/limit seconds ahead; a request fits while it stays within a minute of now).
- ``tokens_per_minute``: the same GCRA counted in tokens, by reserve and reconcile: admission
  reserves the prompt estimate plus ``max_tokens``; ``Lease.settle`` corrects that to the real
  usage; ``Lease.release`` (a failure, a cancel before any token) gives it all back.
- ``max_parallel``: one slot per admitted request, given back by the lease, on every path out.
- ``tokens_per_day``: reserved and settled like the minute tokens, per UTC day.

A limit refuses only when it is reached, never below it: a request is admitted while its user
has at least one request (or one token) left, so a token limit is exceeded by at most one
request's reservation. The checks and the updates of one admission are one atomic step (one
synchronous function in memory; one Lua script in Redis: broker/limits_redis.py), so
concurrency cannot slip past.
"""

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol

from broker.metrics import Metrics

Clock = Callable[[], float]  # seconds since the epoch; the tests pass a frozen one
LimitName = Literal["requests_per_minute", "tokens_per_minute", "max_parallel", "tokens_per_day"]

MINUTE = 60.0
DAY = 86400
# Float rounding must never turn "exactly at the limit" into a refusal or an admission.
EPSILON = 1e-9
# A slot frees when one of the user's requests ends, which nobody can predict.
PARALLEL_RETRY_AFTER = 1
# What a request without max_tokens reserves for its completion (settled to the real count).
DEFAULT_MAX_TOKENS = 4096
# Prompt estimate: real tokenizers average about 4 characters per token; 3 over-reserves a little.
CHARS_PER_TOKEN = 3
# Hostile max_tokens values stay within 64-bit counters whatever the arithmetic on them.
MAX_RESERVATION = 1 << 40


@dataclass(frozen=True)
class Limits:
    """One user's limits; None is no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_parallel: int | None = None
    tokens_per_day: int | None = None

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer")

    @property
    def any(self) -> bool:
        """Whether any limit is set: a user without one needs no admission at all."""
        return any(value is not None for value in vars(self).values())


def ratelimit_headers(limits: Limits, remaining_requests: int, remaining_tokens: int) -> list[tuple[bytes, bytes]]:
    """The contract's ``x-ratelimit-*`` headers, for the limits that are set."""
    headers = []
    if limits.requests_per_minute is not None:
        headers += [
            (b"x-ratelimit-limit-requests", b"%d" % limits.requests_per_minute),
            (b"x-ratelimit-remaining-requests", b"%d" % remaining_requests),
        ]
    if limits.tokens_per_minute is not None:
        headers += [
            (b"x-ratelimit-limit-tokens", b"%d" % limits.tokens_per_minute),
            (b"x-ratelimit-remaining-tokens", b"%d" % remaining_tokens),
        ]
    return headers


@dataclass(frozen=True)
class Rejection:
    """Why a request is refused: what the broker answers instead of relaying it."""

    status: int
    code: str
    message: str
    limit: LimitName | None  # None: the limits could not be checked (Redis unreachable, policy "refuse")
    retry_after: int | None  # whole seconds, for the Retry-After header
    headers: list[tuple[bytes, bytes]]


def rejection(limits: Limits, limit: LimitName, wait: float, remaining: tuple[int, int]) -> Rejection:
    headers = ratelimit_headers(limits, *remaining)
    if limit == "tokens_per_day":  # the contract gives this one no Retry-After
        return Rejection(429, "insufficient_quota", "the daily token budget is used up", limit, None, headers)
    retry_after = max(1, math.ceil(wait))
    headers.append((b"retry-after", b"%d" % retry_after))
    return Rejection(429, "rate_limit_exceeded", f"{limit} limit reached", limit, retry_after, headers)


UNAVAILABLE = Rejection(503, "limits_unavailable", "the shared limits store is unreachable", None, None, [])


def count_rejection(metrics: Metrics, user: str, refused: Rejection) -> None:
    """Prometheus: one refusal of ``user`` by a limit (proposed; not wired yet)."""
    metrics.limit_rejections.labels(user, refused.limit or "unavailable").inc()


class Lease:
    """An admitted request's hold on its user's limits.

    ``settle`` (the tokens really used) or ``release`` (none) ends it; the first call wins,
    later ones do nothing. ``async with lease:`` releases on every way out that did not settle.
    Both return an awaitable that a cancelled caller cannot interrupt: the release goes on.
    """

    def __init__(self, headers: list[tuple[bytes, bytes]], finish: Callable[[int], "asyncio.Future[None]"]) -> None:
        self.headers = headers  # x-ratelimit-* for the response
        self._finish = finish
        self._finished: asyncio.Future[None] | None = None

    def settle(self, tokens_used: int) -> "asyncio.Future[None]":
        if self._finished is None:
            self._finished = self._finish(bounded(tokens_used))
        return asyncio.shield(self._finished)

    def release(self) -> "asyncio.Future[None]":
        return self.settle(0)

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Limiter(Protocol):
    """What the request path calls, whichever the backend (MemoryLimiter, RedisLimiter)."""

    async def admit(self, user: str, limits: Limits, reserve: int) -> Lease | Rejection:
        """One request of ``user`` reserving ``reserve`` tokens: a lease, or why not."""

    async def in_flight(self, user: str) -> int:
        """The user's parallel slots taken."""

    async def aclose(self) -> None:
        """Waits (bounded) for the releases under way; frees connections."""


def bounded(tokens: int) -> int:
    """A token count as the counters take it: not negative, not absurd."""
    return max(0, min(tokens, MAX_RESERVATION))


def reservation(request: object, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """Tokens to reserve for a chat or completion request body (parsed JSON, any shape)."""
    if not isinstance(request, dict):
        return default_max_tokens
    completion = default_max_tokens
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            completion = value
            break
    prompt = _text_length(request.get(key) for key in ("messages", "prompt", "input"))
    return min(MAX_RESERVATION, math.ceil(prompt / CHARS_PER_TOKEN) + completion)


def _text_length(roots: Iterable[object]) -> int:
    """Characters of text in a JSON value, iteratively (hostile nesting cannot recurse)."""
    total = 0
    stack = list(roots)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not value.startswith("data:"):  # inline images and audio are not prompt text
                total += len(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return total


# --- the arithmetic; broker/limits_redis.py's Lua mirrors it, and the tests run both ---


def _used(tat: float, now: float, limit: int) -> float:
    """GCRA: what the theoretical arrival time says is used of a per-minute limit."""
    return max(0.0, tat - now) * limit / MINUTE


def _wait(tat: float, now: float, limit: int) -> float:
    """Seconds until one more unit fits; 0 when it fits now."""
    excess = _used(tat, now, limit) + 1 - limit
    return excess * MINUTE / limit if excess > EPSILON else 0.0


def _advance(tat: float, now: float, limit: int, units: float) -> float:
    """The arrival time after ``units`` more (or, negative, given back: never before now)."""
    return max(now, max(tat, now) + units * MINUTE / limit)


def _remaining(tat: float, now: float, limit: int | None) -> int:
    return 0 if limit is None else max(0, math.floor(limit - _used(tat, now, limit) + EPSILON))


@dataclass
class _UserState:
    request_tat: float = 0.0
    token_tat: float = 0.0
    day: int = 0
    day_tokens: int = 0
    in_flight: int = 0

    def tokens_today(self, today: int) -> int:
        return self.day_tokens if self.day == today else 0


def _refusal(limits: Limits, state: _UserState, now: float) -> tuple[LimitName, float] | None:
    """The limit that refuses a request now and the wait it asks for, or None.

    The daily budget first (waiting a minute does not help); else the rate limit that
    asks for the longest wait, so that a retry after it meets no other refusal.
    """
    if limits.tokens_per_day is not None and state.tokens_today(int(now // DAY)) >= limits.tokens_per_day:
        return "tokens_per_day", 0.0
    waits: dict[LimitName, float] = {}
    if limits.requests_per_minute is not None:
        waits["requests_per_minute"] = _wait(state.request_tat, now, limits.requests_per_minute)
    if limits.tokens_per_minute is not None:
        waits["tokens_per_minute"] = _wait(state.token_tat, now, limits.tokens_per_minute)
    if limits.max_parallel is not None and state.in_flight >= limits.max_parallel:
        waits["max_parallel"] = PARALLEL_RETRY_AFTER
    refusing = {name: wait for name, wait in waits.items() if wait > 0}
    if not refusing:
        return None
    name = max(refusing, key=lambda limit: refusing[limit])
    return name, refusing[name]


def _done() -> "asyncio.Future[None]":
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class MemoryLimiter:
    """The limits of one broker, in its memory: an admission is one synchronous step."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._users: dict[str, _UserState] = {}  # users come from the configuration: bounded

    async def admit(self, user: str, limits: Limits, reserve: int) -> Lease | Rejection:
        return self.admit_now(user, limits, reserve)

    def admit_now(self, user: str, limits: Limits, reserve: int) -> Lease | Rejection:
        now, reserve = self._clock(), bounded(reserve)
        state = self._users.setdefault(user, _UserState())
        refusal = _refusal(limits, state, now)
        if refusal is not None:
            return rejection(limits, *refusal, self._remaining(state, limits, now))
        if limits.requests_per_minute is not None:
            state.request_tat = _advance(state.request_tat, now, limits.requests_per_minute, 1)
        if limits.tokens_per_minute is not None:
            state.token_tat = _advance(state.token_tat, now, limits.tokens_per_minute, reserve)
        today = int(now // DAY)
        state.day, state.day_tokens = today, state.tokens_today(today) + reserve
        state.in_flight += 1
        headers = ratelimit_headers(limits, *self._remaining(state, limits, now))

        def finish(tokens_used: int) -> "asyncio.Future[None]":
            self._settle(state, limits, today, tokens_used - reserve)
            return _done()

        return Lease(headers, finish)

    def _settle(self, state: _UserState, limits: Limits, day: int, correction: int) -> None:
        if limits.tokens_per_minute is not None:
            state.token_tat = _advance(state.token_tat, self._clock(), limits.tokens_per_minute, correction)
        if state.day == day:  # a reservation of a day gone by no longer counts against anything
            state.day_tokens = max(0, state.day_tokens + correction)
        state.in_flight -= 1

    @staticmethod
    def _remaining(state: _UserState, limits: Limits, now: float) -> tuple[int, int]:
        return (
            _remaining(state.request_tat, now, limits.requests_per_minute),
            _remaining(state.token_tat, now, limits.tokens_per_minute),
        )

    async def in_flight(self, user: str) -> int:
        state = self._users.get(user)
        return 0 if state is None else state.in_flight

    async def aclose(self) -> None:
        return None
