"""Several brokers: every connector holds a session to every broker (issue 13).

Real processes: redis-server as the registry, nginx as the load balancer (its README
config), brokers and connectors; the heavy ones are marked slow.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from broker.config import ConfigError
from broker.settings import parse_cli, resolve
from connector.fleet import Fleet
from connector.llm import LLMClient
from connector.settings import Settings as ConnectorSettings
from connector.settings import resolve as connector_resolve
from connector.tunnel import Status
from tests.balancer import Balancer, readme_block, start_balancer
from tests.proxies import proxy_workdir
from tests.servers import RedisServer, start_redis
from tests.support import BrokerHandle, Stack, free_port, wait_until
from wire import (
    BROKER_HEADER,
    MAX_BROKERS,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    Batch,
    Brokers,
    ConnectorConnection,
    ProtocolError,
    check_brokers,
    encode,
)

USER = {"authorization": "Bearer sk-user"}
CONFIG = """
connectors:
  - name: a
    token: tok-a
  - name: b
    token: tok-b
"""
KILL_STREAMS = 50


def body(model: str, stream: bool = False, **fake: object) -> dict[str, object]:
    return {"model": model, "messages": [], "stream": stream, "fake": fake}


def start_broker(
    stack: Stack, port: int, *, redis: RedisServer | None = None, peers: tuple[str, ...] = (), name: str = "broker"
) -> BrokerHandle:
    env = {"REMOTELLM_ADVERTISE_URL": f"http://127.0.0.1:{port}"}
    if redis is not None:
        env["REMOTELLM_REDIS_URL"] = redis.url
    if peers:
        env["REMOTELLM_PEERS"] = ",".join(peers)
    return stack.broker(CONFIG, via="python", port=port, env=env, name=name)


def sessions(broker: BrokerHandle) -> int:
    return int(broker.health()["connectors"])  # type: ignore[call-overload]


def wait_sessions(brokers: list[BrokerHandle], count: int, timeout: float = 15.0) -> None:
    wait_until(lambda: all(sessions(b) == count for b in brokers), timeout=timeout, what=f"{count} sessions each")


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body(model), headers=USER, timeout=30)


@dataclass
class Fleet3:
    brokers: list[BrokerHandle]
    balancer: Balancer
    redis: RedisServer
    health_ports: list[int]  # the connectors'

    def connector_tunnels(self) -> list[set[str]]:
        """Each connector's tunnels, as the broker ids they are for."""
        reports = [httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json() for port in self.health_ports]
        return [{t["broker"] for t in report["tunnels"]} for report in reports]


@contextlib.contextmanager
def fleet_of_three(stack: Stack) -> Iterator[Fleet3]:
    """Redis, three brokers behind nginx, two connectors (models m-a, m-b) given nginx alone."""
    with proxy_workdir("balancer") as workdir:
        redis = start_redis(stack, stack.log_dir)
        ports = [free_port() for _ in range(3)]
        brokers = [start_broker(stack, port, redis=redis, name=f"broker{i}") for i, port in enumerate(ports)]
        balancer = start_balancer(stack, workdir, [f"127.0.0.1:{port}" for port in ports])
        health_ports = []
        for name in ("a", "b"):
            llm = stack.llm(f"m-{name}", name=f"llm-{name}")
            health_ports.append(free_port())
            stack.connector(balancer.url, f"tok-{name}", llm, f"m-{name}", health_port=health_ports[-1])
        wait_sessions(brokers, 2)
        try:
            yield Fleet3(brokers, balancer, redis, health_ports)
        finally:
            shutil.copy(workdir / "access.log", stack.log_dir / "balancer-access.log")


# --- the frame and the fleet, without processes ------------------------------------------


def test_a_list_of_brokers_is_bounded_and_validated() -> None:
    assert check_brokers([("b-1", "https://b1.example:8443"), ("b-2", "")]) is None
    assert check_brokers([(f"b{i}", "") for i in range(MAX_BROKERS + 1)]) is not None
    for bad in ("ftp://b", "http://user:pw@b", "http://b/?q=1", "http://b#x", "http://b:99999", "https://", "x" * 600):
        assert check_brokers([("b", bad)]) is not None, bad
    assert check_brokers([("b c", "")]) is not None
    assert check_brokers([("b" * 65, "")]) is not None


def test_a_connector_refuses_a_hostile_list() -> None:
    conn = ConnectorConnection()
    reader = conn.inbound()
    with pytest.raises(ProtocolError, match="Brokers"):
        reader.feed(encode(Batch(0, 0)) + encode(Brokers([("evil", "file:///etc/passwd")])))


def test_broker_settings_for_several_brokers() -> None:
    args = parse_cli(
        ["--peer", "http://b:1", "--peer", "http://c:2/", "--advertise-url", "https://a", "--workers", "3"]
    )
    settings = resolve(args, {})
    assert (settings.peers, settings.advertise_url, settings.workers) == (("http://b:1", "http://c:2"), "https://a", 3)
    assert resolve(None, {"REMOTELLM_PEERS": "http://b:1, http://c:2"}).peers == ("http://b:1", "http://c:2")
    assert resolve(None, {"REMOTELLM_WORKER": "ab/1/3"}).identity.siblings == ("ab-0", "ab-2")
    for env in (
        {"REMOTELLM_PEERS": "ftp://b"},
        {"REMOTELLM_ADVERTISE_URL": "http://u:p@a"},
        {"REMOTELLM_WORKERS": "0"},
    ):
        with pytest.raises(ConfigError):
            resolve(None, env)


class _Connected:
    """What the fleet sees of a tunnel with a session: its status and its settings."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.status = Status(connected=True)
        self.settings = settings


def test_a_hostile_broker_cannot_grow_the_fleet_without_bound() -> None:
    """Lists from several tunnels, each within the bound, together name far more brokers:
    the fleet opens no more than MAX_BROKERS tunnels, and none to a cleartext remote host."""

    async def scenario() -> tuple[int, list[str]]:
        settings = connector_resolve(None, {
            "REMOTELLM_BROKER_URL": "https://127.0.0.1:1", "REMOTELLM_CONNECTOR_TOKEN": "t",
            "REMOTELLM_LLM_URL": "http://127.0.0.1:2",
        })  # fmt: skip
        llm = LLMClient(settings.llm_url)
        fleet = Fleet(settings, llm)
        fleet._scout()
        assert len(fleet.health()["tunnels"]) == 1
        many = [(f"h{i}", f"https://127.0.0.1:{1000 + i}") for i in range(MAX_BROKERS)]
        half = MAX_BROKERS // 2
        # Two tunnels with a session (stand-ins), each with a list of its own.
        first, second = _Connected(settings), _Connected(settings)
        fleet.heard(first, [("plain", "http://203.0.113.9:80"), *many[:half]])  # type: ignore[arg-type]
        fleet.heard(second, many[half:])  # type: ignore[arg-type]
        for _ in range(3):
            fleet._reconcile(time.monotonic())
        urls = [t["broker_url"] for t in fleet.health()["tunnels"]]
        await asyncio.wait_for(fleet.drain(), 40)
        await llm.aclose()
        return len(urls), urls

    count, urls = asyncio.run(scenario())
    assert count == MAX_BROKERS
    assert not any(url.startswith("http://203.") for url in urls)


# --- real processes -----------------------------------------------------------------------


def test_static_peers_without_redis(stack: Stack) -> None:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    first = start_broker(stack, ports[0], peers=(urls[1],), name="first")
    second = start_broker(stack, ports[1], peers=(urls[0],), name="second")
    health_port = free_port()
    stack.connector(first.url, "tok-a", stack.llm("m-a"), "m-a", health_port=health_port)
    wait_sessions([first, second], 1)
    assert second.health()["models"] == ["m-a"]
    for broker in (first, second):
        assert chat(broker.url, "m-a").status_code == 200
    tunnels = httpx.get(f"http://127.0.0.1:{health_port}/health").json()["tunnels"]
    assert sorted((t["broker"], t["connected"]) for t in tunnels) == sorted(
        (broker.health()["broker"], True) for broker in (first, second)
    )


def test_a_request_pinned_to_another_broker_is_misdirected(stack: Stack) -> None:
    port = free_port()
    broker = start_broker(stack, port)
    mine = str(broker.health()["broker"])
    for path in (REGISTER_PATH, REPLY_PATH):
        answer = httpx.post(broker.url + path, headers={BROKER_HEADER: "another-one"}, content=b"")
        assert answer.status_code == 421, answer.text  # before the token is even looked at
        assert answer.json()["error"]["code"] == "misdirected"
    assert httpx.get(broker.url + POLL_PATH, headers={BROKER_HEADER: "another-one"}).status_code == 421
    assert httpx.get(broker.url + POLL_PATH, headers={BROKER_HEADER: mine}).status_code == 401


@pytest.mark.slow
def test_workers_share_one_port_and_each_holds_a_session(stack: Stack) -> None:
    broker = stack.broker(CONFIG, via="python", env={"REMOTELLM_WORKERS": "2"})
    stack.connector(broker.url, "tok-a", stack.llm("m-a"), "m-a")

    def workers_ready() -> bool:
        seen: dict[str, int] = {}
        for _ in range(20):  # a new connection each time: the kernel picks a worker each time
            health = httpx.get(broker.url + "/health", timeout=2).json()
            seen[health["broker"]] = health["connectors"]
        return len(seen) == 2 and set(seen.values()) == {1}

    wait_until(workers_ready, timeout=20, what="both workers to hold a session")
    children = _children(broker.proc.pid)
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)  # the parent starts it again, with its slot's id
    wait_until(lambda: children[0] not in _children(broker.proc.pid), timeout=10, what="the worker to go")
    wait_until(workers_ready, timeout=20, what="both workers to hold a session again")
    served: set[str] = set()
    for _ in range(20):
        with httpx.Client(timeout=30) as client:
            health = client.get(broker.url + "/health").json()
            response = client.post(broker.url + "/v1/chat/completions", json=body("m-a"), headers=USER)
            assert response.status_code == 200, response.text
            served.add(health["broker"])
    assert len(served) == 2
    workers = _children(broker.proc.pid)
    os.kill(broker.proc.pid, signal.SIGTERM)  # the parent alone: it passes the signal on
    assert broker.proc.popen.wait(40) == 0  # each worker drained, then the parent left
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@pytest.mark.slow
def test_every_model_through_every_broker_and_a_new_broker_joins(stack: Stack) -> None:
    with fleet_of_three(stack) as fleet:
        brokers, balancer, redis = fleet.brokers, fleet.balancer, fleet.redis
        for broker in brokers:
            assert sorted(broker.health()["models"]) == ["m-a", "m-b"]  # type: ignore[type-var]
            for model in ("m-a", "m-b"):
                assert chat(broker.url, model).status_code == 200
        assert chat(balancer.url, "m-b").status_code == 200
        fourth = start_broker(stack, free_port(), redis=redis, name="broker3")
        wait_sessions([fourth], 2, timeout=10)  # every connector, within 10 s
        assert chat(fourth.url, "m-a").status_code == 200


async def _stream(url: str, first_chunk: asyncio.Event | None, **fake: object) -> str:
    """One streamed completion: "ok", or the error that ended it."""
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(30, read=5)) as client,
            client.stream(
                "POST", url + "/v1/chat/completions", json=body("m-a", stream=True, **fake), headers=USER
            ) as response,
        ):
            if response.status_code != 200:
                return f"status {response.status_code}"
            async for line in response.aiter_lines():
                if first_chunk is not None and line.startswith("data:"):
                    first_chunk.set()
                if line == "data: [DONE]":
                    return "ok"
        return "cut short"
    except httpx.HTTPError as exc:
        return type(exc).__name__


@pytest.mark.slow
def test_kill_one_of_three_brokers(stack: Stack) -> None:
    with fleet_of_three(stack) as fleet:
        brokers, balancer = fleet.brokers, fleet.balancer
        victim, survivors = brokers[0], brokers[1:]
        sessions_before = [_sessions_of(b) for b in survivors]

        async def scenario() -> tuple[list[str], list[str], float]:
            started = [asyncio.Event() for _ in range(KILL_STREAMS)]
            doomed = [asyncio.create_task(_stream(victim.url, e, chunks=2000, delay_ms=50)) for e in started]
            kept = [asyncio.create_task(_stream(b.url, None, chunks=40, delay_ms=50)) for b in survivors * 3]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            victim.proc.kill()
            loop = asyncio.get_running_loop()
            killed = loop.time()
            ends = await asyncio.wait_for(asyncio.gather(*doomed), 5)  # all of them end within 5 s
            recovered = None
            while recovered is None and loop.time() - killed < 10:
                response = await asyncio.to_thread(chat, balancer.url, "m-b")
                recovered = loop.time() - killed if response.status_code == 200 else None
            return ends, await asyncio.gather(*kept), recovered if recovered is not None else 99.0

        ends, kept, recovered = asyncio.run(scenario())
        assert len(ends) == KILL_STREAMS and "ok" not in ends, ends
        assert kept == ["ok"] * len(kept), kept
        assert recovered <= 2.0, recovered
        assert [_sessions_of(b) for b in survivors] == sessions_before  # the very same sessions
        # The dead broker leaves the registry (its key expires), then every connector's fleet.
        ids = {str(b.health()["broker"]) for b in survivors}
        wait_until(lambda: all(b.health()["brokers"] == 2 for b in survivors), timeout=5, what="the registry")
        wait_until(lambda: fleet.connector_tunnels() == [ids, ids], timeout=15, what="the fleets to drop it")


def _sessions_of(broker: BrokerHandle) -> list[tuple[str, str]]:
    """Each connector's session at ``broker``: its name and when it registered."""
    tunnels: list[dict[str, str]] = broker.health()["tunnels"]  # type: ignore[assignment]
    return sorted((t["name"], t["connected_since"]) for t in tunnels)


@pytest.mark.slow
def test_a_rolling_restart_loses_no_request(stack: Stack) -> None:
    with fleet_of_three(stack) as fleet:
        brokers, balancer, redis = fleet.brokers, fleet.balancer, fleet.redis
        results: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    model = ("m-a", "m-b")[len(results) % 2]
                    payload = body(model, chunks=20, delay_ms=20, stream=False)
                    try:
                        status = client.post(balancer.url + "/v1/chat/completions", json=payload, headers=USER)
                        results.append(status.status_code)
                    except httpx.HTTPError:
                        results.append(0)

        clients = [threading.Thread(target=load) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            for index, broker in enumerate(list(brokers)):
                before = len(results)
                port = int(broker.url.rsplit(":", 1)[1])
                assert broker.proc.stop(timeout=40) == 0  # it left within its drain
                brokers[index] = start_broker(stack, port, redis=redis, name=f"broker{index}-again")
                wait_sessions(brokers, 2, timeout=20)
                wait_until(lambda before=before: len(results) > before + 20, timeout=20, what="load to go on")
        finally:
            stop.set()
            for thread in clients:
                thread.join(70)
        failures = [status for status in results if status != 200]
        assert not failures, f"{len(failures)} of {len(results)} failed: {sorted(set(failures))}"


def test_the_readme_commands_use_real_flags() -> None:
    commands = readme_block("Several brokers", "sh")
    brokers = [line.split("python -m broker", 1)[1] for line in commands.splitlines() if "python -m broker" in line]
    assert len(brokers) == 3
    for line in brokers:
        args = parse_cli(line.replace("&", "").split())
        assert args.advertise_url and args.redis_url and args.port


@pytest.mark.slow
def test_workers_that_cannot_start_make_the_parent_give_up(stack: Stack) -> None:
    with socket.socket() as taken:  # the port is someone else's (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        parent = stack.spawn("broker", [sys.executable, "-m", "broker", "--port", str(port), "--workers", "2"])
        assert parent.popen.wait(60) == 1, parent.log()
    assert "giving up" in parent.log()


@pytest.mark.slow
def test_every_broker_replaced_at_once_the_connectors_find_the_new_ones(stack: Stack) -> None:
    """No tunnel left to hear a list from (each is pinned to a broker id that is gone): the
    connectors dial their --broker-url (nginx) again and learn the new brokers there."""
    with fleet_of_three(stack) as fleet:
        ports = [int(b.url.rsplit(":", 1)[1]) for b in fleet.brokers]
        for broker in fleet.brokers:
            broker.proc.kill()
        again = [start_broker(stack, port, redis=fleet.redis, name=f"broker{i}-new") for i, port in enumerate(ports)]
        wait_sessions(again, 2, timeout=30)
        ids = {str(b.health()["broker"]) for b in again}
        wait_until(lambda: fleet.connector_tunnels() == [ids, ids], timeout=20, what="the fleets to hold only those")
        for broker in again:
            assert chat(broker.url, "m-a").status_code == 200
