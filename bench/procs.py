"""The processes under test: fake LLM, broker and connector, plus /proc accounting.

Each server runs in its own session so that one killpg stops it with anything it
spawned, on success, on an exception and on Ctrl-C alike. Every wait is bounded.
Each broker writes its usage database into its stack's log directory, never into
the source tree it runs from.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
MODEL = "m"
USER_KEY = "sk-bench"
TOKEN = "tok-bench"
_CONFIG = f"connectors:\n  - name: bench\n    token: {TOKEN}\n    max_concurrent: 2000\n"
LIMITED_USER = "bench-limited"
LIMITED_KEY = "sk-bench-limited"
# Adds a named user with every limit set, far above what the benchmark reaches: each of its
# requests is admitted and settled, none is refused.
LIMITED_CONFIG = _CONFIG + (
    f"users:\n  - name: {LIMITED_USER}\n    key: {LIMITED_KEY}\n    limits:\n"
    "      requests_per_minute: 1000000000\n      tokens_per_minute: 1000000000000\n"
    "      max_parallel: 1000000\n      tokens_per_day: 1000000000000000\n"
)
_DATABASE = "usage.db"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_START_TIMEOUT = 20.0


class StartError(RuntimeError):
    pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (fields 14 and 15 of stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        code = self.popen.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise StartError(f"{self.name} exited with {code}; log {self.log}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group may outlive its leader
            os.killpg(self.popen.pid, signal.SIGKILL)


def _spawn(name: str, args: list[str], src: Path, logs: Path, env: dict[str, str] | None = None) -> Proc:
    log = logs / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=src,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def _wait(what: str, proc: Proc, ready: object, timeout: float = _START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        if callable(ready) and ready():
            return
        time.sleep(0.05)
    raise StartError(f"{what} not ready within {timeout:.0f} s (log {proc.log})")


def _health(port: int) -> dict[str, object] | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


@dataclass
class Stack:
    """fake LLM + broker + connector on loopback; `stop` tears all of it down."""

    src: Path
    logs: Path
    config: str = _CONFIG  # connectors.yaml
    broker_workers: int = 1  # python -m broker --workers (one port, that many broker processes)
    procs: dict[str, Proc] = field(default_factory=dict)
    llm_port: int = 0
    broker_port: int = 0

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        llm = self.procs["fakellm"] = _spawn(
            "fakellm", ["-m", "fakellm", "--port", "0", "--model", MODEL], self.src, self.logs
        )
        found: list[int] = []

        def listening() -> bool:
            m = re.search(rb"fakellm listening on http://[^:]+:(\d+)", llm.log.read_bytes())
            if m:
                found.append(int(m.group(1)))
            return bool(m)

        _wait("fakellm", llm, listening)
        self.llm_port = found[0]
        config = self.logs / "connectors.yaml"
        config.write_text(self.config)
        for stale in self.logs.glob(f"{_DATABASE}*"):  # a previous run's rows, journal and WAL
            stale.unlink()
        self.broker_port = free_port()
        broker = self.procs["broker"] = _spawn(
            "broker",
            [
                "-m",
                "broker",
                "--host",
                HOST,
                "--port",
                str(self.broker_port),
                "--user-api-key",
                USER_KEY,
                "--connector-config",
                str(config),
                "--workers",
                str(self.broker_workers),
            ],
            self.src,
            self.logs,
            {"REMOTELLM_DATABASE": str(self.database)},
        )
        _wait("broker", broker, lambda: _health(self.broker_port) is not None)
        connector = self.procs["connector"] = _spawn(
            "connector",
            [
                "-m",
                "connector",
                "--broker-url",
                f"http://{HOST}:{self.broker_port}",
                "--token",
                TOKEN,
                "--llm-url",
                f"http://{HOST}:{self.llm_port}",
                "--model",
                MODEL,
            ],
            self.src,
            self.logs,
        )

        def serving() -> bool:
            broker.check()
            return len(self._serving_workers()) == self.broker_workers

        _wait("connector (via broker /health)", connector, serving)

    def _serving_workers(self) -> set[object]:
        """The broker processes seen routing MODEL, over a few new connections (the kernel
        puts each on any worker)."""
        seen = set()
        for _ in range(4 * self.broker_workers):
            health = _health(self.broker_port) or {}
            models = health.get("models")
            if isinstance(models, list) and MODEL in models:
                seen.add(health.get("broker"))
        return seen

    @property
    def database(self) -> Path:
        """The broker's usage database (SQLite)."""
        return self.logs / _DATABASE

    def usage_rows(self) -> dict[str | None, int]:
        """Rows the broker's usage store has written so far, by user (None: unnamed keys)."""
        if not self.database.exists():
            return {}
        with contextlib.closing(sqlite3.connect(f"{self.database.as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            try:
                rows = db.execute('SELECT "user", count(*) FROM usage_requests GROUP BY "user"').fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # the store creates it before its first write
                    return {}
                raise
        return dict(rows)

    def pids(self) -> dict[str, list[int]]:
        """Each process's pid, with its children's (the workers of a broker with --workers)."""
        return {name: [p.pid, *_children(p.pid)] for name, p in self.procs.items()}

    def check(self) -> None:
        for proc in self.procs.values():
            proc.check()

    def stop(self) -> None:
        for name in ("connector", "broker", "fakellm"):
            if name in self.procs:
                self.procs.pop(name).stop()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def _system_busy() -> tuple[float, float]:
    """Busy CPU seconds of the machine so far: (task time, irq + softirq time).

    Loopback TCP work runs largely in softirq context, which the kernel does not
    charge to any process: it is ours, not other processes' load.
    """
    with open("/proc/stat", "rb") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = (int(v) for v in f.readline().split()[1:])
    return (user + nice + system + steal) / _CLK_TCK, (irq + softirq) / _CLK_TCK


class Probe:
    """CPU and RSS of named process groups over one run, plus the machine's other load.

    `background_cores` is CPU used by processes that are not ours during the run:
    other work on a shared machine makes every number here noisier. `irq_cores` is
    the machine's interrupt time, mostly our own loopback traffic.
    """

    def __init__(self, procs: dict[str, list[int]], rss: bool = False) -> None:
        self.procs = procs
        self.track_rss = rss
        self.t0 = self.busy0 = self.irq0 = 0.0
        self.cpu0: dict[str, float] = {}
        # The RSS baseline is taken now, before the client connects: a stream's cost
        # includes its user connection.
        self.rss0: dict[str, int] = self._rss() if rss else {}
        self.peak: dict[str, int] = dict(self.rss0)

    def _cpu(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.procs.items()}

    def _rss(self) -> dict[str, int]:
        return {name: sum(rss_bytes(p) for p in pids) for name, pids in self.procs.items()}

    def before(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.irq0 = _system_busy()
        self.cpu0 = self._cpu()

    def during(self) -> None:
        if self.track_rss:
            for name, value in self._rss().items():
                self.peak[name] = max(self.peak[name], value)

    def after(self) -> dict[str, object]:
        cpu = {name: value - self.cpu0[name] for name, value in self._cpu().items()}
        wall = max(time.monotonic() - self.t0, 1e-9)
        busy, irq = _system_busy()
        other = busy - self.busy0 - sum(cpu.values())
        out: dict[str, object] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "background_cores": max(0.0, other / wall),
            "irq_cores": (irq - self.irq0) / wall,
        }
        if self.track_rss:
            self.during()
            out["rss_base"] = self.rss0
            out["rss_peak"] = self.peak
        return out
