"""Client processes: one asyncio client per process, so the load generator can use both cores.

The parent only orchestrates. Every run has three steps so that processes start
together and connection setup stays outside the measurement: each worker connects
and says "ready"; the parent snapshots the servers and says "go" with a start time
on the shared monotonic clock; each worker runs and sends back its `Result`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

from bench.client import Job, Result, connect, start

_READY_TIMEOUT = 60.0  # connecting ~1,000 sockets takes well under a second
_START_DELAY = 0.02


class WorkerError(RuntimeError):
    pass


def _worker_main(pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    while True:
        msg = pipe.recv()
        if msg[0] == "stop":
            return
        if msg[0] != "job":
            continue
        try:
            result = asyncio.run(_serve(msg[1], pipe))
        except Exception as exc:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            pipe.send(("done", result))


async def _serve(job: Job, pipe: Connection) -> Result:
    run = await connect(job)
    pipe.send(("ready", None))
    if not pipe.poll(_READY_TIMEOUT):
        raise WorkerError("no start signal")
    msg = pipe.recv()
    if msg[0] == "stop":
        raise SystemExit(0)
    if msg[0] != "go":
        raise WorkerError(f"expected go, got {msg[0]}")
    await asyncio.sleep(max(0.0, msg[1] - time.perf_counter()))
    return await start(run)


def _recv(pipe: Connection, timeout: float, what: str) -> object:
    if not pipe.poll(timeout):
        raise WorkerError(f"client worker: no {what} within {timeout:.0f} s")
    kind, payload = pipe.recv()
    if kind == "error":
        raise WorkerError(f"client worker failed: {payload}")
    return payload


class Pool:
    """`size` long-lived client processes; a job's connections are split among them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        self._spawn()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        for i in range(self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), name=f"bench-client-{i}", daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def run(
        self,
        job: Job,
        *,
        workers: int | None = None,
        before: Callable[[], None] | None = None,
        during: Callable[[], None] | None = None,
    ) -> Result:
        """Run `job` on up to `workers` processes; `before` runs just before the start
        signal, `during` about every 0.2 s until every worker has answered."""
        n = max(1, min(workers or len(self.pipes), len(self.pipes), job.connections))
        shares = [job.connections // n + (i < job.connections % n) for i in range(n)]
        pipes = self.pipes[:n]
        try:
            return self._run(job, pipes, shares, before, during)
        except BaseException:
            self.close()  # workers may be mid-run: start afresh rather than resynchronise
            self._spawn()
            raise

    def _run(
        self,
        job: Job,
        pipes: list[Connection],
        shares: list[int],
        before: Callable[[], None] | None,
        during: Callable[[], None] | None,
    ) -> Result:
        for pipe, share in zip(pipes, shares, strict=True):
            pipe.send(("job", replace(job, connections=share)))
        for pipe in pipes:
            _recv(pipe, _READY_TIMEOUT, "ready")
        if before is not None:
            before()
        start_at = time.perf_counter() + _START_DELAY
        for pipe in pipes:
            pipe.send(("go", start_at))
        results: list[Result] = []
        deadline = time.monotonic() + job.timeout + 30
        for pipe in pipes:
            while not pipe.poll(0.2):
                if during is not None:
                    during()
                if time.monotonic() > deadline:
                    raise WorkerError("client worker: no result in time")
            result = _recv(pipe, 0, "result")
            assert isinstance(result, Result)
            results.append(result)
        return Result.merge(results)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop", None))
        for proc in self.procs:
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for pipe in self.pipes:
            pipe.close()
        self.pipes, self.procs = [], []
