"""A bounded soak: 2,000 mixed requests through three connectors while faults land at random.

Every request must end in exactly one clean way — a complete answer, an OpenAI-shaped
error, or (after the response head) a visibly cut stream — and never hang; afterwards
the bridge must heal on its own and the broker's memory must come back down.

Faults (seeded, so a failure replays): kill -9 a connector and start a replacement,
SIGSTOP one past the broker's silence limit, kill and restart a fake LLM on its port,
and — on the connector that reaches the broker through tests/faultrelay.py — reset
its connections, black-hole them, or slow them down.
"""

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest

from tests.faultrelay import FaultRelay
from tests.support import BrokerHandle, Proc, Stack, fake_state, free_port, metric, rss_kib, wait_until

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("REMOTELLM_SOAK_SEED", "20240607"))  # set it to explore other runs
REQUESTS = 2000
CONCURRENCY = 24
PACE = 0.016  # seconds between request starts: the load lasts ~32 s, long enough for the faults
# The last request starts only once every kind of fault has begun (so each meets a load in
# flight, however long the machine takes to restart a process), within this bound.
EVERY_KIND_TIMEOUT = 120.0
REQUEST_DEADLINE = 30.0  # no request may take longer (first byte, idle and retry included)
RSS_GROWTH_LIMIT_KIB = 50 * 1024
USER = {"authorization": "Bearer sk-user"}
ENV = {
    "REMOTELLM_PING_INTERVAL": "0.5",  # a silent connector is dropped after 1.5 s
    "REMOTELLM_IDLE_TIMEOUT": "5",
    "REMOTELLM_FIRST_BYTE_TIMEOUT": "5",
}
SLOTS = 3
RELAYED = 2  # the connector in this slot reaches the broker through the fault relay
CONFIG = "connectors:\n" + "".join(f"  - {{name: c{i}, token: tok-{i}, max_concurrent: 64}}\n" for i in range(SLOTS))
# Errors the broker may answer before the head, by status: the contract's code for each.
CLEAN_ERRORS = {
    429: "capacity_exceeded",
    502: "upstream_unavailable",
    503: "model_unavailable",
    504: "timeout",
}
CUT = (httpx.RemoteProtocolError, httpx.ReadError)
# Shorter than the connector's poll read timeout (3 pings = 1.5 s): it reconnects only
# once the path is back. (A register sent into the black hole would wait out its own
# 30 s read timeout.)
BLACKHOLE_SECONDS = 1.2
FAULT_KINDS = 6


@dataclass
class Plan:
    """One request: what it asks of the fake LLM, and so what it may legitimately end as."""

    stream: bool
    chunks: int
    fake: dict[str, object]

    @property
    def text(self) -> str:
        return " ".join(f"tok{i}" for i in range(self.chunks))

    def payload(self) -> dict[str, object]:
        return {"model": "m", "messages": [], "stream": self.stream, "fake": {"chunks": self.chunks, **self.fake}}


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(REQUESTS):
        stream = rng.random() < 0.5
        chunks = rng.randint(1, 12)
        fake: dict[str, object] = {}
        if stream and rng.random() < 0.08:  # a long stream (~1 s), so faults catch some mid-answer
            chunks = rng.randint(30, 60)
            fake["delay_ms"] = 20
        elif stream and rng.random() < 0.3:
            fake["delay_ms"] = rng.choice([2, 5, 10, 20])
        if rng.random() < 0.2:
            fake["head_delay_ms"] = rng.choice([5, 20, 50])
        steer = rng.random()
        if stream and steer < 0.03:
            fake["die_after"] = rng.randint(0, chunks)  # the LLM breaks the stream before [DONE]
        elif steer < 0.05:
            fake["status"] = 500
        plans.append(Plan(stream, chunks, fake))
    return plans


def classify_body(plan: Plan, status: int, body: bytes) -> str:
    """The outcome of a request whose body arrived whole (no transport error)."""
    if status == 200:
        if plan.stream:
            events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                return "FAIL_stream_complete_without_done"
            text = "".join(
                choice["delta"].get("content") or "" for event in events[:-1] for choice in json.loads(event)["choices"]
            )
            return "ok_stream" if text == plan.text else "FAIL_stream_corrupt"
        reply = json.loads(body)
        return "ok_json" if reply["choices"][0]["message"]["content"] == plan.text else "FAIL_json_corrupt"
    try:
        error = json.loads(body)["error"]
        code, message, kind = error["code"], error["message"], error["type"]
    except (ValueError, KeyError, TypeError):
        return f"FAIL_{status}_not_openai_shaped"
    if not (isinstance(code, str) and isinstance(message, str) and isinstance(kind, str)):
        return f"FAIL_{status}_not_openai_shaped"
    if status == 500 and plan.fake.get("status") == 500:
        return "relayed_500" if code == "fake_status" else f"FAIL_500_{code}"
    if CLEAN_ERRORS.get(status) == code:
        return f"error_{status}_{code}"
    return f"FAIL_{status}_{code}"


async def one_request(client: httpx.AsyncClient, url: str, plan: Plan, served: Counter[str] | None = None) -> str:
    head = False
    try:
        async with asyncio.timeout(REQUEST_DEADLINE):
            async with client.stream("POST", url, json=plan.payload()) as resp:
                head = True
                body = await resp.aread()
            if served is not None and "x-fake-llm" in resp.headers:
                served[resp.headers["x-fake-llm"].split("-")[0]] += 1
        try:
            return classify_body(plan, resp.status_code, body)
        except (ValueError, LookupError, TypeError, AttributeError) as exc:  # a body that is not what it claims
            return f"FAIL_{resp.status_code}_unparseable_{type(exc).__name__}"
    except TimeoutError:
        return "FAIL_hung_after_head" if head else "FAIL_hung_before_head"
    except CUT as exc:
        if head:
            return "cut_stream" if plan.stream else "cut_json"
        return f"FAIL_transport_error_before_head_{type(exc).__name__}"
    except httpx.HTTPError as exc:
        return f"FAIL_{type(exc).__name__}"


@dataclass
class Cluster:
    stack: Stack
    broker: BrokerHandle
    relay: FaultRelay
    llm_ports: list[int]
    llms: list[Proc] = field(default_factory=list)
    connectors: list[Proc] = field(default_factory=list)
    starts: Counter[str] = field(default_factory=Counter)

    def llm_url(self, slot: int) -> str:
        return f"http://127.0.0.1:{self.llm_ports[slot]}"

    def start_llm(self, slot: int) -> None:
        """A fake LLM on this slot's fixed port, so a restarted one is found where the old one was."""
        self.starts[f"llm{slot}"] += 1
        name = f"llm{slot}-{self.starts[f'llm{slot}']}"
        args = [sys.executable, "-m", "fakellm", "--port", str(self.llm_ports[slot]), "--name", name, "--model", "m"]
        proc = self.stack.spawn(name, args)
        wait_until(lambda: "listening on" in proc.log(), timeout=10, what=f"{name} to listen")
        if slot < len(self.llms):
            self.llms[slot] = proc
        else:
            self.llms.append(proc)

    def start_connector(self, slot: int) -> None:
        self.starts[f"connector{slot}"] += 1
        broker_url = self.relay.url if slot == RELAYED else self.broker.url
        name = f"connector{slot}-{self.starts[f'connector{slot}']}"
        proc = self.stack.connector(broker_url, f"tok-{slot}", self.llm_url(slot), "m", name=name)
        if slot < len(self.connectors):
            self.connectors[slot] = proc
        else:
            self.connectors.append(proc)


def in_flight(broker: BrokerHandle) -> float:
    return metric(httpx.get(broker.url + "/metrics").text, "remotellm_requests_in_flight")


def idle(llm: str) -> bool:
    return fake_state(llm)["active_streams"] == 0


async def inject_faults(
    cluster: Cluster,
    rng: random.Random,
    done: asyncio.Event,
    every_kind: asyncio.Event,
    log: list[str],
    injected: Counter[str],
) -> None:
    """Faults at random times until the load is over; every kind at least once (``every_kind``
    is set once each has begun)."""

    async def kill_connector() -> str:
        slot = rng.randrange(SLOTS)
        await asyncio.to_thread(cluster.connectors[slot].kill)
        await asyncio.to_thread(cluster.start_connector, slot)
        return f"kill -9 connector {slot}, replaced"

    async def freeze_connector() -> str:
        slot = rng.randrange(SLOTS)
        proc = cluster.connectors[slot]
        proc.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(2.0)
        finally:
            proc.signal(signal.SIGCONT)
        return f"SIGSTOP connector {slot} for 2 s"

    async def restart_llm() -> str:
        slot = rng.randrange(SLOTS)
        await asyncio.to_thread(cluster.llms[slot].kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.start_llm, slot)
        return f"kill -9 llm {slot}, restarted after 0.5 s"

    async def cut_relay() -> str:
        await asyncio.to_thread(cluster.relay.cut)
        return "reset the relayed connector's connections"

    async def blackhole_relay() -> str:
        await asyncio.to_thread(cluster.relay.blackhole)
        try:
            await asyncio.sleep(BLACKHOLE_SECONDS)
        finally:
            await asyncio.to_thread(cluster.relay.restore)
        return f"black-holed the relayed connector for {BLACKHOLE_SECONDS} s"

    async def slow_relay() -> str:
        await asyncio.to_thread(cluster.relay.delay, 0.05)
        try:
            await asyncio.sleep(3.0)
        finally:
            await asyncio.to_thread(cluster.relay.restore)
        return "50 ms added to the relayed connector's path for 3 s"

    kinds: list[Callable[[], Awaitable[str]]] = [
        kill_connector,
        freeze_connector,
        restart_llm,
        cut_relay,
        blackhole_relay,
        slow_relay,
    ]
    schedule = kinds + [rng.choice(kinds) for _ in range(2)]
    rng.shuffle(schedule)
    started = time.monotonic()
    await asyncio.sleep(1.5)
    for fault in schedule:
        if done.is_set():
            break
        at = time.monotonic() - started
        injected[fault.__name__] += 1
        if len(injected) == FAULT_KINDS:
            every_kind.set()
        what = await fault()
        log.append(f"{at:5.1f} s  {what}")
        with_gap = asyncio.create_task(done.wait())
        await asyncio.wait([with_gap], timeout=rng.uniform(1.5, 3.0))
        with_gap.cancel()


async def run_load(
    cluster: Cluster, plans: list[Plan], fault_rng: random.Random, log: list[str], injected: Counter[str]
) -> Counter[str]:
    url = cluster.broker.url + "/v1/chat/completions"
    tally: Counter[str] = Counter()
    by_plan: Counter[str] = Counter()
    served: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY + 8)
    async with httpx.AsyncClient(headers=USER, timeout=REQUEST_DEADLINE * 2, limits=limits) as client:
        slots = asyncio.Semaphore(CONCURRENCY)
        done, every_kind = asyncio.Event(), asyncio.Event()
        faults = asyncio.create_task(inject_faults(cluster, fault_rng, done, every_kind, log, injected))

        async def run(plan: Plan) -> None:
            try:
                outcome = await one_request(client, url, plan, served)
            finally:
                slots.release()
            tally[outcome] += 1
            if "die_after" in plan.fake:
                by_plan[f"die_after->{outcome}"] += 1

        tasks = []
        started = time.monotonic()
        for i, plan in enumerate(plans):
            await asyncio.sleep(max(0.0, started + i * PACE - time.monotonic()))
            if i == len(plans) - 1:  # (on a timeout, the count of kinds injected says so below)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(every_kind.wait(), EVERY_KIND_TIMEOUT)
            await slots.acquire()
            tasks.append(asyncio.create_task(run(plan)))
        await asyncio.gather(*tasks)
        done.set()
        await faults
    log.append(f"steered die_after outcomes: {dict(sorted(by_plan.items()))}")
    log.append(f"answered by: {dict(sorted(served.items()))}; relay forwarded {cluster.relay.forwarded_bytes} bytes")
    return tally


def test_soak_with_random_faults(stack: Stack) -> None:
    rng = random.Random(SEED)
    broker = stack.broker(CONFIG, via="module", env=ENV)  # one process: its RSS is the broker's
    relay = FaultRelay("127.0.0.1", int(broker.url.rsplit(":", 1)[1]))
    try:
        cluster = Cluster(stack, broker, relay, [free_port() for _ in range(SLOTS)])
        for slot in range(SLOTS):
            cluster.start_llm(slot)
            cluster.start_connector(slot)
        broker.wait_models("m", connectors=SLOTS)

        # Warm up every code path before the baseline, so the baseline is not a cold process.
        warm = asyncio.run(run_warmup(broker.url))
        assert warm == Counter({"ok_json": 50, "ok_stream": 50}), warm
        rss_before = rss_kib(broker.proc.pid)

        log: list[str] = []
        injected: Counter[str] = Counter()
        started = time.monotonic()
        tally = asyncio.run(run_load(cluster, make_plans(rng), rng, log, injected))
        load_seconds = time.monotonic() - started

        # The bridge heals by itself: every connector back, nothing left in flight anywhere.
        broker.wait_models("m", connectors=SLOTS, timeout=20)
        wait_until(lambda: in_flight(broker) == 0, timeout=10, what="no request in flight at the broker")
        for url in map(cluster.llm_url, range(SLOTS)):
            wait_until(partial(idle, url), timeout=10, what=f"the LLM at {url} to finish its streams")
        after = asyncio.run(run_warmup(broker.url))
        time.sleep(2)
        rss_after = rss_kib(broker.proc.pid)
    finally:
        relay.close()

    failures = {k: v for k, v in tally.items() if k.startswith("FAIL")}
    report = (
        f"soak (seed {SEED}): {sum(tally.values())} requests in {load_seconds:.1f} s; "
        f"tally {dict(sorted(tally.items()))}; "
        f"broker RSS {rss_before // 1024} MiB -> {rss_after // 1024} MiB "
        f"({(rss_after - rss_before) / 1024:+.1f} MiB); faults:\n  " + "\n  ".join(log)
    )
    print("\n" + report)
    assert sum(tally.values()) == REQUESTS, report
    assert len(injected) == FAULT_KINDS, f"not every kind of fault was injected: {dict(injected)}\n{report}"
    assert not failures, report
    assert tally["ok_stream"] + tally["ok_json"] > 0.8 * REQUESTS, report
    assert after == Counter({"ok_json": 50, "ok_stream": 50}), f"after the soak: {after}\n{report}"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, report


async def run_warmup(broker_url: str) -> Counter[str]:
    """100 plain requests (half streamed), 10 at a time: all must succeed."""
    url = broker_url + "/v1/chat/completions"
    plans = [Plan(stream=i % 2 == 0, chunks=5, fake={}) for i in range(100)]
    async with httpx.AsyncClient(headers=USER, timeout=REQUEST_DEADLINE) as client:
        outcomes: list[str] = []
        for start in range(0, len(plans), 10):
            outcomes += await asyncio.gather(*(one_request(client, url, p) for p in plans[start : start + 10]))
    return Counter(outcomes)
