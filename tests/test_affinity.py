"""Response-id affinity shared by several brokers through a real redis-server."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from broker.affinity import KEY_PREFIX, MAX_SHARED_CONNECTOR_ID, IdSniffer, MemoryAffinity, RedisAffinity
from broker.limits_redis import redis_client
from tests.fleets import free_slots, two_brokers
from tests.servers import RedisServer, start_redis
from tests.support import Stack, free_port, wait_until

TTL = 3600.0


@pytest.fixture
def redis(stack: Stack, tmp_path: Path) -> RedisServer:
    return start_redis(stack, tmp_path)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))  # type: ignore[arg-type]


def with_two_brokers(redis: RedisServer, scenario: Callable[[RedisAffinity, RedisAffinity], Awaitable[None]]) -> None:
    """Runs ``scenario`` with the affinities of two brokers sharing one redis-server."""

    async def brokers() -> None:
        a, b = RedisAffinity(redis_client(redis.url), TTL), RedisAffinity(redis_client(redis.url), TTL)
        try:
            await scenario(a, b)
        finally:
            for affinity in (a, b):
                await affinity.aclose()

    run(brokers)


def test_an_id_remembered_by_one_broker_is_found_by_another(redis: RedisServer) -> None:
    async def scenario(a: RedisAffinity, b: RedisAffinity) -> None:
        await a.remember("resp_1", "connector-x")
        assert await b.connector_of("resp_1") == "connector-x"
        assert await b.connector_of("resp_unknown") is None
        raw = aioredis.Redis.from_url(redis.url)
        assert await raw.keys("*") == [f"{KEY_PREFIX}resp_1".encode()]  # namespaced
        assert TTL - 5 <= await raw.ttl(f"{KEY_PREFIX}resp_1") <= TTL  # bounded by response_ttl
        await raw.aclose()

    with_two_brokers(redis, scenario)


def test_a_lookup_is_one_round_trip_and_none_for_ids_this_broker_made(redis: RedisServer) -> None:
    async def scenario(a: RedisAffinity, b: RedisAffinity) -> None:
        await a.remember("resp_1", "connector-x")
        monitor = aioredis.Redis.from_url(redis.url)

        async def commands() -> int:  # data commands (a new connection's handshake does not count)
            stats = await monitor.info("commandstats")
            return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_get", "cmdstat_set"))

        before = await commands()
        assert await a.connector_of("resp_1") == "connector-x"  # its own: from memory
        assert await b.connector_of("resp_1") == "connector-x"
        assert await commands() - before == 1  # b's GET
        await monitor.aclose()

    with_two_brokers(redis, scenario)


def test_a_huge_connector_id_stays_out_of_redis(redis: RedisServer) -> None:
    async def scenario(a: RedisAffinity, b: RedisAffinity) -> None:
        hostile = "x" * (MAX_SHARED_CONNECTOR_ID + 1)
        await a.remember("resp_1", hostile)
        assert await a.connector_of("resp_1") == hostile  # this broker still routes it
        assert await b.connector_of("resp_1") is None

    with_two_brokers(redis, scenario)


def test_redis_unreachable_leaves_each_broker_its_own_ids(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        a = RedisAffinity(redis_client(f"redis://127.0.0.1:{free_port()}/0"), TTL)
        await a.remember("resp_1", "connector-x")  # never raises
        assert await a.connector_of("resp_1") == "connector-x"
        assert await a.connector_of("resp_other") is None
        assert sum("redis unreachable" in r.message for r in caplog.records) == 1  # once per outage
        await a.aclose()

    caplog.set_level(logging.WARNING, logger="remotellm.affinity")
    run(scenario)


def test_the_sniffer_remembers_the_first_id_before_its_bytes_go_on() -> None:
    async def scenario() -> None:
        memory = MemoryAffinity(TTL)
        sniffer = IdSniffer(memory.remember)
        sniffer.creator = "connector-x"
        await sniffer.feed(b'data: {"type":"response.created","response":{"i')
        assert not sniffer.done
        await sniffer.feed(b'd":"resp_7","object":"response"}}\n\n')
        assert sniffer.done and await memory.connector_of("resp_7") == "connector-x"
        await sniffer.feed(b'{"id":"resp_8"}')
        assert await memory.connector_of("resp_8") is None

    run(scenario)


def test_a_response_created_through_one_broker_is_continued_through_another_on_its_connector(
    stack: Stack, tmp_path: Path
) -> None:
    brokers = two_brokers(stack, tmp_path)
    for token, name in (("tok-box", "llm-a"), ("tok-other", "llm-b")):
        stack.connector(brokers[0].url, token, stack.llm("m", name=name), "m", name=f"connector-{name}")
    wait_until(lambda: all(len(free_slots(b)) == 2 for b in brokers), what="both connectors on both brokers")
    headers = {"authorization": "Bearer sk-user"}
    created = httpx.post(brokers[0].url + "/v1/responses", json={"model": "m", "input": "hi"}, headers=headers)
    assert created.status_code == 200, created.text
    previous = created.json()["id"]
    maker = previous.split("_")[1]  # fakellm's ids name the LLM that made them: resp_<llm>_<n>
    for turn in range(6):  # by chance, through the other connector, six times in a row: 1 in 64
        broker = brokers[(turn + 1) % 2]
        body = {"model": "m", "input": "again", "previous_response_id": previous}
        answer = httpx.post(broker.url + "/v1/responses", json=body, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        previous = answer.json()["id"]
        assert previous.split("_")[1] == maker
        assert httpx.get(f"{brokers[turn % 2].url}/v1/responses/{previous}", headers=headers).status_code == 200
