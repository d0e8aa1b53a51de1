"""The seven scenarios of the overhead benchmark, each comparing two arms, interleaved.

DIRECT is client -> fake LLM; THROUGH is client -> broker -> tunnel -> connector ->
fake LLM, against the same fake LLM process. Scenarios 1-5 compare DIRECT with
THROUGH; scenario 6 compares two users, both THROUGH; scenario 7 one broker process
with two (``--workers 2``), both THROUGH. Runs alternate A,B / B,A so
that slow drift of the machine hits both arms alike; each metric is the median over
repetitions. Connection setup is never timed: the client connects, then starts.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.client import Job, Mode, Result, build_request
from bench.procs import HOST, LIMITED_CONFIG, LIMITED_KEY, LIMITED_USER, MODEL, USER_KEY, Probe, Stack
from bench.workers import Pool

Via = Literal["DIRECT", "THROUGH"]
VIAS: tuple[Via, Via] = ("DIRECT", "THROUGH")
Arm = str  # one side of a comparison: a Via, or (scenario 6) a user THROUGH
PATH = "/v1/chat/completions"
_GRACE = 20.0  # seconds a run may overstay its plan; slower answers count as failures
_STORE_WAIT = 10.0  # seconds the usage store may take to write the last requests' rows
Summary = dict[str, Any]
Runs = dict[Arm, list[Summary]]  # every run's summary, per arm


@dataclass(frozen=True)
class Plan:
    """Durations and repetitions: the full run and `--quick` differ only here."""

    reps: int = 3
    loop_s: float = 2.0  # one closed-loop measurement
    warm_s: float = 0.5  # unrecorded warm-up per configuration and mode
    paced_reps: int = 3  # scenario 3
    idle_reps: int = 2  # scenario 4: each repetition on a fresh stack
    idle_chunks: int = 5  # scenario 4: content chunks at 1 s apart
    cpu_loads: tuple[str, ...] = ("paced", "flat")  # scenario 5

    @staticmethod
    def quick() -> Plan:
        return Plan(reps=1, loop_s=0.8, warm_s=0.3, paced_reps=1, idle_reps=1, idle_chunks=2)


@dataclass
class Row:
    scenario: str
    metric: str
    direct: float | None
    through: float | None
    delta: bool = False  # print THROUGH - DIRECT (added latency)
    integer: bool = False


@dataclass
class Bench:
    """Everything a scenario needs, plus what it leaves for the JSON report."""

    pool: Pool
    src: Path
    logs: Path
    plan: Plan
    workers: int
    stack: Stack | None = None
    runs: list[Summary] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def shared_stack(self) -> Stack:
        """One stack for scenarios 1, 2, 3 and 5; restarted if a process died."""
        if self.stack is not None:
            try:
                self.stack.check()
            except RuntimeError as exc:
                log(f"restarting the stack: {exc}")
                self.stack.stop()
                self.stack = None
        if self.stack is None:
            self.stack = Stack(self.src, self.logs / "shared").start()
        return self.stack

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def summarize(res: Result, probe: dict[str, object]) -> Summary:
    elapsed = res.elapsed
    return {
        "completed": res.completed,
        "errors": res.errors,
        "failures": res.failures,
        "short": res.short,
        "bad": res.errors + res.failures + res.short,
        "statuses": res.statuses,
        "elapsed_s": elapsed,
        "rps": res.completed / elapsed,
        "lat_p50_ms": _ms(_pct(res.latencies, 0.5)),
        "lat_p99_ms": _ms(_pct(res.latencies, 0.99)),
        "lat_max_ms": _ms(max(res.latencies, default=None)),
        "ttfc_p50_ms": _ms(_pct(res.ttfc, 0.5)),
        "ttfc_p99_ms": _ms(_pct(res.ttfc, 0.99)),
        "events": res.events,
        "events_per_s": res.events / elapsed,
        "overhead_p50_ms": _pct(res.overhead_ms, 0.5),
        **probe,
    }


def _median(runs: list[Summary], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


class Runner:
    """Runs one configuration in both arms and keeps every run's summary.

    An arm is a way in (DIRECT or THROUGH) and the API key it sends; by default the
    arms are DIRECT and THROUGH with the unnamed key.
    """

    def __init__(
        self, bench: Bench, stack: Stack, scenario: str, arms: dict[Arm, tuple[Via, str]] | None = None
    ) -> None:
        self.bench = bench
        self.stack = stack
        self.scenario = scenario
        self.arms = arms or {via: (via, USER_KEY) for via in VIAS}
        self.sent: Counter[Arm] = Counter()  # requests sent per arm, warm-ups included

    def port(self, via: Via) -> int:
        return self.stack.llm_port if via == "DIRECT" else self.stack.broker_port

    def job(self, arm: Arm, body: dict[str, object], connections: int, mode: Mode, **kw: Any) -> Job:
        via, key = self.arms[arm]
        port = self.port(via)
        request = build_request(HOST, port, PATH, body, key)
        return Job(HOST, port, request, connections, mode, **kw)

    def measure(self, label: str, arm: Arm, job: Job, *, rss: bool = False, record: bool = True) -> Summary:
        procs = self.stack.pids()
        procs["client"] = self.bench.pool.pids
        procs["bench"] = [os.getpid()]
        probe = Probe(procs, rss=rss)
        workers = len(self.bench.pool.pids) if job.connections >= 256 else self.bench.workers
        res = self.bench.pool.run(job, workers=workers, before=probe.before, during=probe.during)
        out = summarize(res, probe.after())
        self.sent[arm] += res.completed + res.errors + res.failures
        self.stack.check()
        cpu = out["cpu_s"]
        busy = cpu["client"] / out["wall_s"]
        out.update(scenario=self.scenario, config=label, via=self.arms[arm][0], arm=arm, client_cores=busy)
        if record:
            self.bench.runs.append(out)
        log(
            f"  {self.scenario} {label if record else 'warm-up':<28} {arm:<12} {out['rps']:>8.0f} resp/s"
            f" {out['events_per_s']:>9.0f} ev/s  p50 {out['lat_p50_ms'] or 0:8.2f} ms"
            f"  max {out['lat_max_ms'] or 0:8.0f} ms"
            f"  bad {out['bad']}  client {busy:.2f} cores  other {out['background_cores']:.2f} cores"
        )
        return out

    def interleave(
        self, label: str, make: Callable[[Arm], Job], reps: int, warm: Callable[[Arm], Job] | None = None
    ) -> Runs:
        arms = tuple(self.arms)
        if warm is not None:
            for arm in arms:
                self.measure(label, arm, warm(arm), record=False)
        runs: Runs = {arm: [] for arm in arms}
        for rep in range(reps):
            for arm in arms if rep % 2 == 0 else arms[::-1]:
                runs[arm].append(self.measure(label, arm, make(arm)))
        return runs

    def row(self, runs: Runs, metric: str, key: str, **kw: Any) -> None:
        self.bench.rows.append(
            Row(self.scenario, metric, _median(runs["DIRECT"], key), _median(runs["THROUGH"], key), **kw)
        )

    def through_row(self, runs: Runs, metric: str, key: str, arm: Arm = "THROUGH") -> None:
        """A metric of one arm THROUGH (the broker's and the connector's, or one user's)."""
        self.bench.rows.append(Row(self.scenario, metric, None, _median(runs[arm], key)))

    def bad_row(self, runs: Runs, label: str) -> None:
        """Errors + failures + short streams per way in, summed over repetitions and arms (not a median)."""
        d, t = (self._bad(runs, via) for via in VIAS)
        self.bench.rows.append(Row(self.scenario, f"{label}: errors (sum of reps)", d, t, integer=True))

    def _bad(self, runs: Runs, via: Via) -> float | None:
        arms = [arm for arm in runs if self.arms[arm][0] == via]
        return float(sum(r["bad"] for arm in arms for r in runs[arm])) if arms else None


def _chat(chunks: int = 5) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake": {"chunks": chunks}}


def _stream(chunks: int, delay_ms: float = 0) -> dict[str, object]:
    fake = {"chunks": chunks, "delay_ms": delay_ms}
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "fake": fake}


def _events(chunks: int) -> int:
    """SSE data events per fake stream: the chunks, a finish chunk and [DONE]."""
    return chunks + 2


def _loop_jobs(
    r: Runner, body: dict[str, object], c: int, plan: Plan, expect_events: int = 0
) -> tuple[Callable[[Arm], Job], Callable[[Arm], Job]]:
    """Closed-loop jobs at concurrency `c`: the measured one and its short warm-up."""

    def make(arm: Arm) -> Job:
        timeout = plan.loop_s + _GRACE
        return r.job(arm, body, c, "loop", duration=plan.loop_s, timeout=timeout, expect_events=expect_events)

    def warm(arm: Arm) -> Job:
        return r.job(arm, body, c, "loop", duration=plan.warm_s, timeout=plan.warm_s + _GRACE)

    return make, warm


_RELAY_CPU = "broker+connector CPU µs/request"


def _relay_cpu(runs: list[Summary]) -> None:
    """Adds the broker's and the connector's CPU per request to each THROUGH run."""
    for summary in runs:
        relay_s = summary["cpu_s"]["broker"] + summary["cpu_s"]["connector"]
        summary["relay_us_per_request"] = relay_s * 1e6 / max(1, summary["completed"])


def chat(bench: Bench) -> None:
    """1: non-streaming chat, closed loop at concurrency 1, 4, 16, 64."""
    r = Runner(bench, bench.shared_stack(), "1 chat")
    plan = bench.plan
    for c in (1, 4, 16, 64):
        label = f"c={c}"
        make, warm = _loop_jobs(r, _chat(), c, plan)
        runs = r.interleave(label, make, plan.reps, warm)
        r.row(runs, f"{label} latency p50 (ms)", "lat_p50_ms", delta=True)
        r.row(runs, f"{label} latency p99 (ms)", "lat_p99_ms", delta=True)
        r.row(runs, f"{label} requests/s", "rps")
        r.row(runs, f"{label} X-Remotellm-Overhead-Ms p50", "overhead_p50_ms")
        _relay_cpu(runs["THROUGH"])
        r.through_row(runs, f"{label} {_RELAY_CPU}", "relay_us_per_request")
        r.bad_row(runs, label)


def stream(bench: Bench) -> None:
    """2: streams of 200 chunks with no delay, closed loop at concurrency 1 and 32."""
    r = Runner(bench, bench.shared_stack(), "2 stream")
    plan = bench.plan
    for c in (1, 32):
        label = f"200 chunks c={c}"
        make, warm = _loop_jobs(r, _stream(200), c, plan, expect_events=_events(200))
        runs = r.interleave(label, make, plan.reps, warm)
        r.row(runs, f"{label} first chunk p50 (ms)", "ttfc_p50_ms", delta=True)
        r.row(runs, f"{label} first chunk p99 (ms)", "ttfc_p99_ms", delta=True)
        r.row(runs, f"{label} chunks/s", "events_per_s")
        r.bad_row(runs, label)


_PACED_CHUNKS, _PACED_DELAY_MS, _PACED_STREAMS = 50, 20.0, 256
_PACED_LABEL = "256 x 50 @20ms"


def _paced_jobs(r: Runner) -> tuple[Callable[[Arm], Job], Callable[[Arm], Job]]:
    """Scenario 3's load: the measured job and its warm-up."""
    chunks, n = _PACED_CHUNKS, _PACED_STREAMS
    ideal_s = (_events(chunks) - 1) * _PACED_DELAY_MS / 1000

    def make(arm: Arm) -> Job:
        body = _stream(chunks, _PACED_DELAY_MS)
        return r.job(arm, body, n, "once", timeout=ideal_s + _GRACE, expect_events=_events(chunks))

    def warm(arm: Arm) -> Job:
        return r.job(arm, _stream(2), n, "once", timeout=_GRACE)

    return make, warm


def paced(bench: Bench) -> None:
    """3: 256 concurrent streams of 50 chunks 20 ms apart, like real decoding."""
    r = Runner(bench, bench.shared_stack(), "3 paced")
    n = _PACED_STREAMS
    ideal_s = (_events(_PACED_CHUNKS) - 1) * _PACED_DELAY_MS / 1000
    make, warm = _paced_jobs(r)
    runs = r.interleave(_PACED_LABEL, make, bench.plan.paced_reps, warm=warm)
    r.row(runs, "first chunk p50 (ms)", "ttfc_p50_ms", delta=True)
    r.row(runs, "first chunk p99 (ms)", "ttfc_p99_ms", delta=True)
    r.row(runs, f"stream duration p50 (ms; ideal {ideal_s * 1000:.0f})", "lat_p50_ms", delta=True)
    r.row(runs, "stream duration p99 (ms)", "lat_p99_ms", delta=True)
    r.row(runs, "stream duration max (ms)", "lat_max_ms", delta=True)
    r.row(runs, f"streams complete (of {n})", "completed", integer=True)
    r.bad_row(runs, "256 streams")


def idle_streams(bench: Bench) -> None:
    """4: 1,000 concurrent streams of one chunk per second: memory per open stream.

    Each repetition gets a fresh stack, so that memory a previous scenario left
    in the allocators does not hide the cost of a stream.
    """
    n, chunks = 1000, bench.plan.idle_chunks
    duration_s = _events(chunks) - 1
    runs: Runs = {"DIRECT": [], "THROUGH": []}
    r: Runner | None = None
    for rep in range(bench.plan.idle_reps):
        stack = Stack(bench.src, bench.logs / f"idle-{rep}").start()
        try:
            r = Runner(bench, stack, "4 idle")
            for via in VIAS:  # wake up lazy paths (imports, pools) before the baseline
                r.measure("warm", via, r.job(via, _stream(2), 16, "once", timeout=_GRACE), record=False)
            for via in VIAS if rep % 2 == 0 else VIAS[::-1]:
                job = r.job(
                    via, _stream(chunks, 1000), n, "once", timeout=duration_s + _GRACE, expect_events=_events(chunks)
                )
                out = r.measure(f"{n} x 1 chunk/s", via, job, rss=True)
                for name in ("fakellm", "broker", "connector"):
                    out[f"rss_kib_{name}"] = (out["rss_peak"][name] - out["rss_base"][name]) / n / 1024
                runs[via].append(out)
        finally:
            stack.stop()
    if r is None:
        return
    r.through_row(runs, "broker RSS per stream (KiB)", "rss_kib_broker")
    r.through_row(runs, "connector RSS per stream (KiB)", "rss_kib_connector")
    r.row(runs, "first chunk p50 (ms)", "ttfc_p50_ms", delta=True)
    r.row(runs, "first chunk p99 (ms)", "ttfc_p99_ms", delta=True)
    r.row(runs, f"stream duration max (ms; ideal {duration_s * 1000})", "lat_max_ms", delta=True)
    r.row(runs, f"streams complete (of {n})", "completed", integer=True)
    r.bad_row(runs, "1000 streams")


def cpu(bench: Bench) -> None:
    """5: CPU microseconds per relayed chunk, per process, paced and flat out."""
    r = Runner(bench, bench.shared_stack(), "5 cpu")
    plan = bench.plan
    chunks = max(10, int(plan.loop_s * 50))  # paced streams last about as long as a loop run

    def paced_job(via: Arm) -> Job:
        # 100 streams x 50 chunks/s, like the notes' "99 streams x 50 frames/s"
        return r.job(via, _stream(chunks, 20), 100, "once", timeout=plan.loop_s + _GRACE, expect_events=_events(chunks))

    def paced_warm(via: Arm) -> Job:
        return r.job(via, _stream(2), 100, "once", timeout=_GRACE)

    flat_job, flat_warm = _loop_jobs(r, _stream(200), 32, plan, expect_events=_events(200))
    loads = {
        "paced": ("paced 100 streams x 50 chunks/s", paced_job, paced_warm),
        "flat": ("flat out c=32 x 200 chunks", flat_job, flat_warm),
    }
    for name in plan.cpu_loads:
        label, make, warm = loads[name]
        runs = r.interleave(label, make, plan.reps, warm)
        for summary in runs["DIRECT"] + runs["THROUGH"]:
            relay = ("broker", "connector") if summary["via"] == "THROUGH" else ()
            per = {p: summary["cpu_s"][p] * 1e6 / max(1, summary["events"]) for p in ("fakellm", "client", *relay)}
            summary.update({f"us_{p}": v for p, v in per.items()}, us_total=sum(per.values()))
        for proc in ("fakellm", "client"):
            r.row(runs, f"{label}: {proc} µs/chunk", f"us_{proc}")
        for proc in ("broker", "connector"):
            r.through_row(runs, f"{label}: {proc} µs/chunk", f"us_{proc}")
        r.row(runs, f"{label}: all processes µs/chunk", "us_total")
        r.row(runs, f"{label}: chunks/s", "events_per_s")
        r.bad_row(runs, label)


def broker_processes(bench: Bench) -> None:
    """7: scenario 3's paced streams THROUGH one broker process and two (--workers 2).

    Each arm is a stack of its own (both up at once, runs interleaved); the connector holds
    a session to each worker, and the kernel spreads the users' connections over them.
    """
    counts = (1, 2)
    stacks = {
        f"{n} broker process(es)": Stack(bench.src, bench.logs / f"workers-{n}", broker_workers=n) for n in counts
    }
    try:
        runners: dict[Arm, Runner] = {}
        for arm, stack in stacks.items():
            runners[arm] = Runner(bench, stack.start(), "7 brokers", {arm: ("THROUGH", USER_KEY)})
        jobs = {arm: _paced_jobs(r) for arm, r in runners.items()}
        for arm, (_, warm) in jobs.items():
            runners[arm].measure(_PACED_LABEL, arm, warm(arm), record=False)
        runs: Runs = {arm: [] for arm in runners}
        arms = tuple(runners)
        for rep in range(bench.plan.paced_reps):
            for arm in arms if rep % 2 == 0 else arms[::-1]:
                runs[arm].append(runners[arm].measure(_PACED_LABEL, arm, jobs[arm][0](arm)))
        for metric, key in (
            ("chunks/s", "events_per_s"),
            ("first chunk p50 (ms)", "ttfc_p50_ms"),
            ("first chunk p99 (ms)", "ttfc_p99_ms"),
            (f"streams complete (of {_PACED_STREAMS})", "completed"),
        ):
            for arm in arms:
                bench.rows.append(Row("7 brokers", f"{metric}: {arm}", None, _median(runs[arm], key)))
    finally:
        for stack in stacks.values():
            stack.stop()


# Scenario 6's arms, both THROUGH: the unnamed key (no limits) and the named user whose
# limits are all set; each with its key and the user its usage is recorded under.
_USERS: dict[Arm, tuple[str, str | None]] = {
    "unlimited key": (USER_KEY, None),
    "limited user": (LIMITED_KEY, LIMITED_USER),
}
_LOOP_METRICS = (
    ("latency p50 (ms)", "lat_p50_ms"),
    ("latency p99 (ms)", "lat_p99_ms"),
    ("requests/s", "rps"),
    (_RELAY_CPU, "relay_us_per_request"),
)


def accounting(bench: Bench) -> None:
    """6: limits and usage: small chats THROUGH at c=1 and 32, an unlimited key vs a limited user.

    Both users' requests are recorded by the usage store; the limited user's are also
    admitted and settled by the limiter (every limit set, none ever reached). It runs on
    a stack of its own, so that the store holds its requests only: every one must be there.
    """
    stack = Stack(bench.src, bench.logs / "accounting", LIMITED_CONFIG).start()
    try:
        r = Runner(bench, stack, "6 accounting", {arm: ("THROUGH", key) for arm, (key, _) in _USERS.items()})
        for c in (1, 32):
            label = f"c={c}"
            make, warm = _loop_jobs(r, _chat(), c, bench.plan)
            runs = r.interleave(label, make, bench.plan.reps, warm)
            for arm_runs in runs.values():
                _relay_cpu(arm_runs)
            for metric, key in _LOOP_METRICS:
                _compare(r, runs, f"{label} {metric}", key)
            r.bad_row(runs, label)
        _stored(r, stack)
    finally:
        stack.stop()


def _compare(r: Runner, runs: Runs, metric: str, key: str) -> None:
    """A row per user, then the limited user's value minus the unlimited key's."""
    for arm in _USERS:
        r.through_row(runs, f"{metric}: {arm}", key, arm)
    unlimited, limited = (_median(runs[arm], key) for arm in _USERS)
    change = None if unlimited is None or limited is None else limited - unlimited
    r.bench.rows.append(Row(r.scenario, f"{metric}: limited - unlimited", None, change))


def _stored(r: Runner, stack: Stack) -> None:
    """Requests sent and usage rows written, per user, once the store has caught up (a bounded wait)."""
    sent = {user: r.sent[arm] for arm, (_, user) in _USERS.items()}
    deadline = time.monotonic() + _STORE_WAIT
    stored = stack.usage_rows()
    while any(stored.get(user, 0) < n for user, n in sent.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
        stored = stack.usage_rows()
    for arm, (_, user) in _USERS.items():
        log(f"  {r.scenario} {arm}: {stored.get(user, 0)} usage rows for {sent[user]} requests sent")
        r.bench.rows.append(Row(r.scenario, f"requests sent, warm-ups included: {arm}", None, sent[user], integer=True))
        r.bench.rows.append(Row(r.scenario, f"usage rows stored: {arm}", None, stored.get(user, 0), integer=True))


SCENARIOS: dict[int, Callable[[Bench], None]] = {
    1: chat,
    2: stream,
    3: paced,
    4: idle_streams,
    5: cpu,
    6: accounting,
    7: broker_processes,
}
