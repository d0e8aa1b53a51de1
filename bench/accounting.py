"""``python -m bench.accounting [--redis-url URL] [--database URL ...]``: what limits and usage cost.

Admission latency (admit then settle, one request at a time, and 64 at once) in memory and,
with ``--redis-url``, through Redis; the cost of ``UsageStore.record`` on the request path and
the flusher's throughput into each ``--database`` (default: a SQLite file in a temporary
directory). Prints a markdown table.
"""

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from broker.database import async_url, shown
from broker.limits import Lease, Limiter, Limits, MemoryLimiter
from broker.limits_redis import RedisLimiter, redis_client
from broker.usage import UsageQuery, UsageRecord, UsageStore

LIMITS = Limits(requests_per_minute=10**9, tokens_per_minute=10**12, max_parallel=10**6, tokens_per_day=10**15)
ADMISSIONS = 5000
CONCURRENCY = 64
RECORDS = 100_000


def _percentile(samples: list[float], fraction: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(len(samples) * fraction))]


async def _one_admission(limiter: Limiter, user: str) -> float:
    started = time.perf_counter()
    lease = await limiter.admit(user, LIMITS, 500)
    assert isinstance(lease, Lease), lease
    await lease.settle(300)
    return time.perf_counter() - started


async def admission(name: str, make: Callable[[], Limiter]) -> list[str]:
    limiter = make()
    sequential = [await _one_admission(limiter, "bench") for _ in range(ADMISSIONS)]
    started = time.perf_counter()
    for _ in range(ADMISSIONS // CONCURRENCY):
        await asyncio.gather(*(_one_admission(limiter, f"user{i % 8}") for i in range(CONCURRENCY)))
    rate = (ADMISSIONS // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - started)
    await limiter.aclose()
    p50, p99 = (_percentile(sequential, q) * 1e6 for q in (0.5, 0.99))
    return [f"| admit + settle, {name} | {p50:.0f} µs | {p99:.0f} µs | {rate:,.0f}/s at {CONCURRENCY} at once |"]


async def usage(database: str) -> list[str]:
    store = UsageStore.open(database, queue_limit=RECORDS)
    await store.flush(30)
    now = time.time()
    records = [
        UsageRecord(now + i / 1000, f"user{i % 20}", f"model{i % 5}", "gpu", 200, 100, 20, "reported", 50, 900)
        for i in range(RECORDS)
    ]
    started = time.perf_counter()
    for record in records:
        store.record(record)
    per_record = (time.perf_counter() - started) / RECORDS
    assert await store.flush(600)
    rate = RECORDS / (time.perf_counter() - started)
    query_started = time.perf_counter()
    await store.query(UsageQuery(group_by=("user", "model", "day")))
    query_ms = (time.perf_counter() - query_started) * 1000
    assert store.dropped == 0
    await store.aclose()
    where = shown(async_url(database)).split("://")[0]
    return [
        f"| UsageStore.record ({where}) | {per_record * 1e6:.1f} µs | | on the request path |",
        f"| flusher, {RECORDS:,} records ({where}) | | | {rate:,.0f} records/s; query {query_ms:.0f} ms |",
    ]


async def main(redis_url: str | None, databases: list[str]) -> None:
    rows = await admission("in memory", MemoryLimiter)
    if redis_url:
        rows += await admission("Redis", lambda: RedisLimiter(redis_client(redis_url)))
    for database in databases:
        rows += await usage(database)
    print("| what | p50 | p99 | throughput |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\np50/p99: {ADMISSIONS:,} admissions one at a time; one run, on this machine")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.accounting", description=__doc__.split("\n\n")[1])
    parser.add_argument("--redis-url")
    parser.add_argument("--database", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(args.redis_url, args.database or [str(Path(tmp) / "bench.db")]))
