"""``python -m bench [--quick] [--scenarios 1,3] [--reps N] [--workers N] [--src DIR] [--out FILE]``.

Starts a fake LLM, a broker and a connector, measures each scenario DIRECT and
THROUGH, prints a markdown table and writes JSON. Every process it starts is
stopped on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

from bench import report
from bench.procs import StartError
from bench.scenarios import SCENARIOS, Bench, Plan, log
from bench.workers import Pool, WorkerError

HERE = Path(__file__).resolve().parent
_ORDER = (1, 2, 3, 5, 6, 7, 4)
_OWN_STACKS = (6, 7, 4)  # run on stacks of their own: after the shared stack is gone
_FDS = 16384  # 1,000 streams need ~2,000 descriptors in the fake LLM alone


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (one repetition, short runs)")
    every = ",".join(map(str, sorted(SCENARIOS)))
    parser.add_argument("--scenarios", default=every, help=f"comma-separated subset of {every} (default: all)")
    parser.add_argument("--reps", type=int, help="repetitions per configuration (default 3, quick 1)")
    parser.add_argument("--workers", type=int, default=1, help="client processes for closed-loop runs (default 1)")
    parser.add_argument("--src", type=Path, default=HERE.parent, help="tree whose broker/connector/fakellm run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args(argv)
    try:
        args.selected = sorted({int(s) for s in args.scenarios.split(",") if s.strip()})
    except ValueError:
        parser.error("--scenarios takes numbers, e.g. 1,3")
    if not args.selected or not set(args.selected) <= set(SCENARIOS):
        parser.error(f"--scenarios must name scenarios among {every}")
    if args.workers < 1 or (args.reps is not None and args.reps < 1):
        parser.error("--workers and --reps must be at least 1")
    return args


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _FDS if hard == resource.RLIM_INFINITY else min(_FDS, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop processes


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    _raise_fd_limit()
    plan = Plan.quick() if args.quick else Plan()
    if args.reps is not None:
        plan = replace(plan, reps=args.reps, paced_reps=args.reps)
    src = args.src.resolve()
    logs = args.out.parent / "logs"
    started = time.monotonic()
    failed: dict[int, str] = {}
    pool = Pool(max(2, args.workers))
    bench = Bench(pool=pool, src=src, logs=logs, plan=plan, workers=args.workers)
    try:
        for number in (n for n in _ORDER if n in args.selected):
            if number in _OWN_STACKS:
                bench.close()
            log(f"scenario {(SCENARIOS[number].__doc__ or str(number)).splitlines()[0]}")
            try:
                SCENARIOS[number](bench)
            except (StartError, WorkerError) as exc:
                failed[number] = str(exc)
                log(f"scenario {number} FAILED: {exc}")
    finally:
        bench.close()
        pool.close()
    runtime = time.monotonic() - started
    rows = sorted(bench.rows, key=lambda r: r.scenario[0])  # scenario 4 ran last; stable within each
    other_median, other_max = report.background(bench.runs)
    print(report.table(rows))
    print()
    print(report.notes(bench.runs, runtime, failed))
    meta = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "plan": asdict(plan),
        "runtime_s": runtime,
        "failed": failed,
        "background_cores_median": other_median,
        "background_cores_max": other_max,
    }
    report.write_json(args.out, rows=rows, runs=bench.runs, meta=meta, src=src)
    log(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        sys.exit(130)
