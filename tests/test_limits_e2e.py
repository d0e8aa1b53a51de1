"""Limits through real brokers: three sharing one Redis, and slots that come back after cancels."""

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.servers import start_redis
from tests.support import BrokerHandle, Stack, free_port

CONFIG = """
users:
  - name: team
    key: sk-team
    limits: {requests_per_minute: 30}
  - name: canceller
    key: sk-cancel
    limits: {max_parallel: 5}
connectors:
  - name: box-{n}
    token: tok-{n}
    models: [m]
"""


def brokers_sharing_redis(stack: Stack, tmp_path: Path, count: int) -> list[BrokerHandle]:
    redis = start_redis(stack, tmp_path)
    handles = []
    for n in range(count):
        env = {"REMOTELLM_REDIS_URL": redis.url}
        broker = stack.broker(CONFIG.replace("{n}", str(n)), user_keys=(), env=env, via="module", name=f"broker-{n}")
        stack.connector(broker.url, f"tok-{n}", stack.llm("m", name=f"llm-{n}"), "m", name=f"connector-{n}")
        broker.wait_models("m")
        handles.append(broker)
    return handles


def test_three_brokers_sharing_redis_admit_exactly_the_limit(stack: Stack, tmp_path: Path) -> None:
    """150 requests at once, spread over three brokers, against 30 a minute: 30 admitted."""
    brokers = brokers_sharing_redis(stack, tmp_path, 3)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(i: int) -> int:
                url = brokers[i % 3].url + "/v1/chat/completions"
                body = {"model": "m", "messages": []}
                return (await client.post(url, json=body, headers={"authorization": "Bearer sk-team"})).status_code

            return await asyncio.gather(*(one(i) for i in range(150)))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 30, statuses  # within 1.02x of the limit: exactly it
    assert statuses.count(429) == 120


@pytest.mark.slow
def test_ten_thousand_cancelled_streams_leave_every_parallel_slot_free(stack: Stack, tmp_path: Path) -> None:
    broker = brokers_sharing_redis(stack, tmp_path, 1)[0]
    url = broker.url + "/v1/chat/completions"
    headers = {"authorization": "Bearer sk-cancel"}
    body = {"model": "m", "stream": True, "messages": [], "fake": {"chunks": 1000, "delay_ms": 5}}

    async def cancelled(client: httpx.AsyncClient, gate: asyncio.Semaphore) -> int:
        async with gate, client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code == 200:
                async for _ in resp.aiter_raw():
                    break  # the first bytes, then gone
            return resp.status_code

    async def run() -> tuple[list[int], list[int]]:
        limits = httpx.Limits(max_connections=5, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            gate = asyncio.Semaphore(5)  # as many at once as the limit: a slot still closing means a 429
            statuses = await asyncio.gather(*(cancelled(client, gate) for _ in range(10_000)))
            # Within a second of the last one: all five slots are free again, at once.
            deadline = asyncio.get_running_loop().time() + 1.0
            while True:
                after = await asyncio.gather(*(cancelled(client, asyncio.Semaphore(5)) for _ in range(5)))
                if after == [200] * 5 or asyncio.get_running_loop().time() > deadline:
                    return statuses, after

    statuses, after = asyncio.run(run())
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1_000, {s: statuses.count(s) for s in set(statuses)}
    assert after == [200] * 5


@pytest.mark.parametrize(("policy", "status"), [("local", 200), ("refuse", 503)])
def test_the_policy_while_redis_is_unreachable_is_the_operators(stack: Stack, policy: str, status: int) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {"REMOTELLM_REDIS_URL": dead, "REMOTELLM_REDIS_UNREACHABLE": policy}
    broker = stack.broker(CONFIG.replace("{n}", "0"), user_keys=(), env=env, via="module")
    stack.connector(broker.url, "tok-0", stack.llm("m"), "m")
    broker.wait_models("m")
    resp = httpx.post(
        broker.url + "/v1/chat/completions", json={"model": "m"}, headers={"authorization": "Bearer sk-team"}
    )
    assert resp.status_code == status, resp.text
    if status == 503:
        assert resp.json()["error"]["code"] == "limits_unavailable"
