"""Per-user limits, in memory and through a real redis-server: exactness under concurrency.

Time is a frozen clock the tests move: verdicts count events, never the machine's speed.
"""

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.limits import (
    DEFAULT_MAX_TOKENS,
    UNAVAILABLE,
    Lease,
    Limiter,
    Limits,
    MemoryLimiter,
    Rejection,
    count_rejection,
    reservation,
)
from broker.limits_redis import RedisLimiter, redis_client
from broker.metrics import Metrics, Snapshot
from tests.servers import RedisServer, start_redis
from tests.support import Stack

START = 1_765_000_000.0  # a Saturday, 05:46:40 UTC: a day boundary is 18,800 s away
SETTLE_TIMEOUT = 10.0  # every wait for releases has this bound

MakeLimiter = Callable[["FakeClock"], Limiter]


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def redis(stack: Stack, tmp_path: Path) -> RedisServer:
    return start_redis(stack, tmp_path)


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> Iterator[MakeLimiter]:
    """Builds limiters of one backend (inside the test's event loop, as redis-py wants)."""
    if request.param == "memory":
        yield MemoryLimiter
        return
    server: RedisServer = request.getfixturevalue("redis")
    yield lambda clock: RedisLimiter(redis_client(server.url), clock=clock)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))  # type: ignore[arg-type]


def leases(verdicts: list[Lease | Rejection]) -> list[Lease]:
    return [verdict for verdict in verdicts if isinstance(verdict, Lease)]


def rejections(verdicts: list[Lease | Rejection]) -> list[Rejection]:
    return [verdict for verdict in verdicts if isinstance(verdict, Rejection)]


async def admit_many(limiter: Limiter, count: int, limits: Limits, reserve: int = 1) -> list[Lease | Rejection]:
    return list(await asyncio.gather(*(limiter.admit("alice", limits, reserve) for _ in range(count))))


def test_fifty_concurrent_requests_against_ten_per_minute_admit_exactly_ten(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = make_limiter(clock)
        limits = Limits(requests_per_minute=10)
        verdicts = await admit_many(limiter, 50, limits)
        assert len(leases(verdicts)) == 10
        remaining = sorted(dict(lease.headers)[b"x-ratelimit-remaining-requests"] for lease in leases(verdicts))
        assert remaining == [b"%d" % n for n in range(10)]
        refused = rejections(verdicts)[0]
        assert (refused.status, refused.code, refused.limit) == (429, "rate_limit_exceeded", "requests_per_minute")
        assert refused.retry_after == 6  # GCRA: one request frees every 60/10 s
        assert dict(refused.headers) == {
            b"x-ratelimit-limit-requests": b"10",
            b"x-ratelimit-remaining-requests": b"0",
            b"retry-after": b"6",
        }
        await limiter.aclose()

    run(scenario)


def test_a_request_is_refused_only_at_the_limit_and_admitted_as_soon_as_one_frees(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = make_limiter(clock)
        limits = Limits(requests_per_minute=10)
        assert len(leases(await admit_many(limiter, 10, limits))) == 10
        clock.advance(5.999)
        assert isinstance(await limiter.admit("alice", limits, 1), Rejection)
        clock.advance(0.001)  # 6 s after the first: exactly one more fits, no sooner
        assert isinstance(await limiter.admit("alice", limits, 1), Lease)
        assert isinstance(await limiter.admit("alice", limits, 1), Rejection)
        clock.advance(60)  # a minute idle: the whole burst again, never more
        assert len(leases(await admit_many(limiter, 15, limits))) == 10
        assert isinstance(await limiter.admit("bob", limits, 1), Lease)  # users do not share limits
        await limiter.aclose()

    run(scenario)


def test_a_token_limit_admits_no_more_than_the_limit_plus_one_reservation(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = make_limiter(clock)
        limits = Limits(tokens_per_minute=1000)
        verdicts = await admit_many(limiter, 50, limits, reserve=300)
        admitted = leases(verdicts)
        assert len(admitted) * 300 <= 1000 + 300
        assert len(admitted) == 4  # 0, 300, 600, 900 used: each below the limit, so admitted
        refused = rejections(verdicts)[0]
        assert (refused.code, refused.limit) == ("rate_limit_exceeded", "tokens_per_minute")
        # 1200 reserved: 201 must drain at 1000 per 60 s before one token fits: 12.06 s.
        assert refused.retry_after == 13
        assert dict(refused.headers)[b"x-ratelimit-remaining-tokens"] == b"0"
        await limiter.aclose()

    run(scenario)


def test_settling_gives_back_what_was_reserved_but_not_used(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = make_limiter(clock)
        limits = Limits(tokens_per_minute=1000)
        first = await limiter.admit("alice", limits, 900)
        assert isinstance(first, Lease)
        assert dict(first.headers)[b"x-ratelimit-remaining-tokens"] == b"100"
        await first.settle(150)
        second = await limiter.admit("alice", limits, 100)
        assert isinstance(second, Lease)
        assert dict(second.headers)[b"x-ratelimit-remaining-tokens"] == b"750"
        await second.release()  # a failure before any token: everything back
        third = await limiter.admit("alice", limits, 0)
        assert isinstance(third, Lease)
        assert dict(third.headers)[b"x-ratelimit-remaining-tokens"] == b"850"
        # More used than reserved (a low prompt estimate): the excess counts too.
        await third.settle(900)
        assert isinstance(await limiter.admit("alice", limits, 0), Rejection)
        await limiter.aclose()

    run(scenario)


def test_max_parallel_counts_slots_and_each_lease_ends_once(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        limiter = make_limiter(FakeClock())
        limits = Limits(max_parallel=2)
        first, second = leases(await admit_many(limiter, 2, limits))
        refused = await limiter.admit("alice", limits, 1)
        assert isinstance(refused, Rejection)
        assert (refused.limit, refused.retry_after) == ("max_parallel", 1)
        assert refused.headers == [(b"retry-after", b"1")]  # no rate limit set: no x-ratelimit-*
        await first.settle(10)
        await first.release()  # later calls do nothing: no slot freed twice
        await first.settle(20)
        assert await limiter.in_flight("alice") == 1
        async with second:
            pass
        assert await limiter.in_flight("alice") == 0
        assert len(leases(await admit_many(limiter, 3, limits))) == 2
        await limiter.aclose()

    run(scenario)


@pytest.mark.slow  # (heavy: once per tox run keeps CI under 25 minutes)
def test_ten_thousand_cancelled_requests_leave_no_slot_taken(make_limiter: MakeLimiter) -> None:
    """Cancelled while admitted, and cancelled while the admission itself was under way."""

    async def scenario() -> None:
        limiter = make_limiter(FakeClock())
        limits = Limits(max_parallel=20_000)
        never = asyncio.Event()
        admitted = 0

        async def stream() -> None:
            nonlocal admitted
            verdict = await limiter.admit("alice", limits, 100)
            assert isinstance(verdict, Lease)
            async with verdict:
                admitted += 1
                await never.wait()

        tasks = [asyncio.create_task(stream()) for _ in range(10_000)]
        for _ in range(20):  # some admissions get cancelled half-way, the rest while streaming
            await asyncio.sleep(0)
        while admitted < 5_000:
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        started = time.monotonic()
        deadline = started + SETTLE_TIMEOUT
        while await limiter.in_flight("alice") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await limiter.in_flight("alice") == 0
        print(f"10,000 cancelled: 0 slots after {time.monotonic() - started:.3f} s ({admitted} were streaming)")
        await limiter.aclose()

    run(scenario)


def test_a_daily_budget_refuses_until_the_next_utc_day(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = make_limiter(clock)
        limits = Limits(tokens_per_day=1000)
        first = await limiter.admit("alice", limits, 600)
        second = await limiter.admit("alice", limits, 600)  # 600 used < 1000: admitted
        assert isinstance(first, Lease) and isinstance(second, Lease)
        assert first.headers == []  # x-ratelimit-* are the per-minute limits
        refused = await limiter.admit("alice", limits, 1)
        assert isinstance(refused, Rejection)
        assert (refused.status, refused.code, refused.limit) == (429, "insufficient_quota", "tokens_per_day")
        assert refused.retry_after is None and refused.headers == []  # the contract: no Retry-After
        await first.settle(100)  # 700 used: room again
        assert isinstance(await limiter.admit("alice", limits, 1), Lease)
        await second.settle(10**6)
        clock.now = (START // 86400 + 1) * 86400 - 0.001
        assert isinstance(await limiter.admit("alice", limits, 1), Rejection)
        clock.advance(0.001)  # midnight UTC
        late = await limiter.admit("alice", limits, 999)
        assert isinstance(late, Lease)
        assert isinstance(await limiter.admit("alice", limits, 1), Lease)  # 999 < 1000
        assert isinstance(await limiter.admit("alice", limits, 1), Rejection)
        await limiter.aclose()

    run(scenario)


def test_the_longest_wait_names_the_refusal(make_limiter: MakeLimiter) -> None:
    async def scenario() -> None:
        limiter = make_limiter(FakeClock())
        limits = Limits(requests_per_minute=60, tokens_per_minute=100, max_parallel=1)
        assert isinstance(await limiter.admit("alice", limits, 500), Lease)
        refused = await limiter.admit("alice", limits, 1)
        assert isinstance(refused, Rejection)
        assert (refused.limit, refused.retry_after) == ("tokens_per_minute", 241)  # 401 tokens at 100/min
        assert dict(refused.headers) == {
            b"x-ratelimit-limit-requests": b"60",
            b"x-ratelimit-remaining-requests": b"59",
            b"x-ratelimit-limit-tokens": b"100",
            b"x-ratelimit-remaining-tokens": b"0",
            b"retry-after": b"241",
        }
        await limiter.aclose()

    run(scenario)


def test_three_brokers_sharing_redis_admit_exactly_the_limits(redis: RedisServer) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        brokers = [RedisLimiter(redis_client(redis.url), clock=clock) for _ in range(3)]
        rpm = Limits(requests_per_minute=30)
        verdicts = await asyncio.gather(*(b.admit("alice", rpm, 1) for b in brokers for _ in range(50)))
        assert len(leases(verdicts)) == 30
        tpm = Limits(tokens_per_minute=10_000)
        verdicts = await asyncio.gather(*(b.admit("bob", tpm, 500) for b in brokers for _ in range(50)))
        assert len(leases(verdicts)) == 20
        parallel = Limits(max_parallel=7)
        verdicts = await asyncio.gather(*(b.admit("carol", parallel, 1) for b in brokers for _ in range(50)))
        assert len(leases(verdicts)) == 7
        await asyncio.gather(*(lease.release() for lease in leases(verdicts)))
        assert [await b.in_flight("carol") for b in brokers] == [0, 0, 0]
        for broker in set(brokers):
            await broker.aclose()

    run(scenario)


def test_redis_killed_mid_run_each_broker_enforces_the_limits_alone(
    redis: RedisServer, stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = RedisLimiter(redis_client(redis.url), clock=clock, retry_interval=0)
        limits = Limits(requests_per_minute=10, max_parallel=5)
        held = leases(await admit_many(limiter, 3, limits))
        redis.proc.kill()
        started = time.monotonic()
        verdicts = await admit_many(limiter, 20, limits)
        assert time.monotonic() - started < 10  # bounded: timeouts, not hangs
        assert len(leases(verdicts)) == 5  # this broker's own memory: max_parallel of 5
        assert sum("redis unreachable" in r.message for r in caplog.records) == 1  # once per outage
        for lease in [*held, *leases(verdicts)]:
            await lease.release()  # Redis gone: logged, never raised
        start_redis(stack, tmp_path, port=redis.port)  # empty: the old slots died with it
        back = await admit_many(limiter, 20, limits)
        assert len(leases(back)) == 5
        assert await limiter.in_flight("alice") == 5
        assert any("reachable again" in r.message for r in caplog.records)
        await limiter.aclose()

    caplog.set_level(logging.WARNING, logger="remotellm.limits")
    run(scenario)


def test_redis_unreachable_with_the_refuse_policy_answers_503(redis: RedisServer) -> None:
    async def scenario() -> None:
        limiter = RedisLimiter(redis_client(redis.url), on_unreachable="refuse", clock=FakeClock())
        limits = Limits(requests_per_minute=10)
        assert isinstance(await limiter.admit("alice", limits, 1), Lease)
        redis.proc.kill()
        refused = await limiter.admit("alice", limits, 1)
        assert isinstance(refused, Rejection)
        assert (refused.status, refused.code, refused.limit) == (503, "limits_unavailable", None)
        await limiter.aclose()

    run(scenario)


def test_redis_clock_is_used_when_no_clock_is_given(redis: RedisServer) -> None:
    async def scenario() -> None:
        limiter = RedisLimiter(redis_client(redis.url))
        limits = Limits(requests_per_minute=2, max_parallel=3)
        verdicts = await admit_many(limiter, 3, limits)
        assert len(leases(verdicts)) == 2
        assert await limiter.in_flight("alice") == 2
        await limiter.aclose()

    run(scenario)


def test_reservation_estimates_the_prompt_and_the_completion() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 50}
    assert reservation(chat) == math.ceil(len("user" + "x" * 300) / 3) + 50  # every string counts
    parts = {
        "messages": [{"content": [{"type": "text", "text": "y" * 30}, {"image_url": {"url": "data:" + "A" * 9000}}]}],
        "max_completion_tokens": 7,
        "max_tokens": 99,
    }
    assert reservation(parts) == math.ceil(len("text" + "y" * 30) / 3) + 7
    assert reservation({"prompt": "z" * 3}) == 1 + DEFAULT_MAX_TOKENS
    assert reservation({"prompt": "", "max_tokens": True}) == DEFAULT_MAX_TOKENS  # a bool is no count
    assert reservation({"prompt": "", "max_tokens": 10**30}) == 1 << 40
    assert reservation([1, 2]) == DEFAULT_MAX_TOKENS
    deep: object = "w" * 3
    for _ in range(100_000):  # hostile nesting: no recursion to overflow
        deep = [deep]
    assert reservation({"input": deep, "max_tokens": 1}) == 2


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_limits_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="requests_per_minute must be a positive integer"):
        Limits(requests_per_minute=bad)  # type: ignore[arg-type]
    assert not Limits().any
    assert Limits(max_parallel=1).any


def test_prometheus_counts_rejections_by_user_and_limit() -> None:
    async def scenario() -> None:
        metrics = Metrics(Snapshot)
        limiter = MemoryLimiter(FakeClock())
        limits = Limits(max_parallel=1)
        for _ in range(3):
            verdict = await limiter.admit("alice", limits, 1)
            if isinstance(verdict, Rejection):
                count_rejection(metrics, "alice", verdict)
        count_rejection(metrics, "bob", UNAVAILABLE)
        text = metrics.render().decode()
        assert 'remotellm_limit_rejections_total{limit="max_parallel",user="alice"} 2.0' in text
        assert 'remotellm_limit_rejections_total{limit="unavailable",user="bob"} 1.0' in text

    run(scenario)


def test_leases_of_a_live_broker_are_renewed_and_those_of_a_dead_one_expire(redis: RedisServer) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        live = RedisLimiter(redis_client(redis.url), clock=clock, lease_ttl=60)
        dead = RedisLimiter(redis_client(redis.url), clock=clock, lease_ttl=60)
        limits = Limits(max_parallel=1)
        long_stream = await live.admit("alice", limits, 1)
        assert isinstance(long_stream, Lease)
        assert isinstance(await dead.admit("bob", limits, 1), Lease)  # then its broker dies
        for _ in range(10):  # ten minutes of streaming, renewed every 20 s
            clock.advance(20)
            await live.renew()
        assert await live.in_flight("alice") == 1
        assert isinstance(await live.admit("alice", limits, 1), Rejection)
        assert await live.in_flight("bob") == 0  # the dead broker's slot came back
        assert isinstance(await live.admit("bob", limits, 1), Lease)
        await long_stream.release()
        await live.renew()  # a lease released meanwhile is not brought back
        assert await live.in_flight("alice") == 0
        await live.aclose()
        await dead.aclose()

    run(scenario)


def test_a_sustained_overload_gets_exactly_the_rate(make_limiter: MakeLimiter) -> None:
    """Ten minutes at 18 attempts a second from three callers against 10 per minute: the
    minute's burst, then exactly one request every 6 s (GCRA: any window of W seconds
    admits at most limit * (1 + W/60))."""

    async def scenario() -> None:
        clock = FakeClock()
        first = make_limiter(clock)
        # Brokers share only Redis: in memory, the three callers share one broker.
        brokers = [first] * 3 if isinstance(first, MemoryLimiter) else [first, make_limiter(clock), make_limiter(clock)]
        limits = Limits(requests_per_minute=10)
        admitted = 0
        for _second in range(600):
            verdicts = await asyncio.gather(*(b.admit("alice", limits, 1) for b in brokers for _ in range(6)))
            admitted += len(leases(list(verdicts)))
            clock.advance(1)
        assert admitted == 10 + 599 // 6
        for broker in set(brokers):
            await broker.aclose()

    run(scenario)


TOLERANCE = 1e-6  # the oracle decays levels, the limiter moves arrival times: rounding differs

limits_drawn = st.builds(
    Limits,
    requests_per_minute=st.none() | st.integers(1, 20),
    tokens_per_minute=st.none() | st.integers(1, 2000),
    max_parallel=st.none() | st.integers(1, 5),
    tokens_per_day=st.none() | st.integers(1, 5000),
)
steps_drawn = st.lists(
    st.tuples(st.sampled_from(["admit", "settle", "release", "wait"]), st.integers(0, 30_000)), max_size=60
)


class LeakyBuckets:
    """The limits written the other way round: levels that drain continuously. An oracle
    for which limits are reached, independent of the limiters' arrival-time arithmetic."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.requests = self.tokens = 0.0
        self.day_tokens = self.open = 0

    def wait(self, seconds: float) -> None:
        if self.limits.requests_per_minute:
            self.requests = max(0.0, self.requests - seconds * self.limits.requests_per_minute / 60)
        if self.limits.tokens_per_minute:
            self.tokens = max(0.0, self.tokens - seconds * self.limits.tokens_per_minute / 60)

    def reached(self, margin: float) -> set[str]:
        """The limits at their limit; ``margin`` > 0 also counts those within it."""
        limits, reached = self.limits, set()
        if limits.requests_per_minute and self.requests + 1 > limits.requests_per_minute - margin:
            reached.add("requests_per_minute")
        if limits.tokens_per_minute and self.tokens + 1 > limits.tokens_per_minute - margin:
            reached.add("tokens_per_minute")
        if limits.max_parallel and self.open >= limits.max_parallel:
            reached.add("max_parallel")
        if limits.tokens_per_day and self.day_tokens >= limits.tokens_per_day:
            reached.add("tokens_per_day")
        return reached

    def admitted(self, reserve: int) -> None:
        self.requests += 1
        self.tokens += reserve
        self.day_tokens += reserve
        self.open += 1

    def settled(self, correction: int) -> None:
        self.tokens = max(0.0, self.tokens + correction)
        self.day_tokens = max(0, self.day_tokens + correction)
        self.open -= 1


def verdict_seen(verdict: Lease | Rejection) -> tuple[object, ...]:
    if isinstance(verdict, Lease):
        return ("admitted", verdict.headers)
    return (verdict.limit, verdict.retry_after, verdict.headers)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limits_drawn, steps=steps_drawn)
def test_both_backends_agree_and_refuse_only_at_a_limit(redis: RedisServer, limits: Limits, steps: list) -> None:
    """Random admissions, settlements and waits (within one UTC day): the Lua scripts give
    the in-memory limiter's verdicts exactly, and a refusal always names a limit reached."""

    async def scenario() -> None:
        clock = FakeClock()
        memory = MemoryLimiter(clock)
        shared = RedisLimiter(redis_client(redis.url), clock=clock, prefix=f"prop{next(examples)}")
        oracle = LeakyBuckets(limits)
        open_leases: list[tuple[Lease, Lease, int]] = []
        for action, amount in steps:
            if action == "wait":
                clock.advance(amount / 1000)
                oracle.wait(amount / 1000)
                await shared.renew()  # the renewer's job in real time (waits are at most 30 s < lease_ttl)
            elif action == "admit":
                verdicts = await memory.admit("u", limits, amount // 50), await shared.admit("u", limits, amount // 50)
                assert verdict_seen(verdicts[0]) == verdict_seen(verdicts[1])
                if isinstance(verdicts[0], Lease):
                    assert not oracle.reached(margin=-TOLERANCE)  # never a refusal below a limit
                    oracle.admitted(amount // 50)
                    open_leases.append((verdicts[0], verdicts[1], amount // 50))  # type: ignore[arg-type]
                else:
                    assert verdicts[0].limit in oracle.reached(margin=TOLERANCE)
            elif open_leases:
                in_memory, in_redis, reserve = open_leases.pop(0)
                used = amount // 50 if action == "settle" else 0
                await in_memory.settle(used)
                await in_redis.settle(used)
                oracle.settled(used - reserve)
        assert await shared.in_flight("u") == await memory.in_flight("u") == len(open_leases)
        await shared.aclose()

    run(scenario)


examples = itertools.count()
