"""The markdown table (stdout) and the JSON record (bench/results/latest.json)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.scenarios import Row


def _num(value: float | None, integer: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if integer:
        return f"{value:,.0f}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(row: Row) -> float | None:
    """THROUGH / DIRECT, or None when either side is missing or the row is a count."""
    if row.direct is None or row.through is None or row.integer or row.direct == 0:
        return None
    return row.through / row.direct


def _ratio(row: Row) -> str:
    value = ratio(row)
    return "—" if value is None else f"{value:.2f}x"


def _delta(row: Row) -> str:
    if not row.delta or row.direct is None or row.through is None:
        return ""
    diff = row.through - row.direct
    return f"{diff:+.2f}" if abs(diff) < 100 else f"{diff:+,.0f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | metric | DIRECT | THROUGH | THROUGH/DIRECT | added (T-D) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row.scenario,
            row.metric,
            _num(row.direct, row.integer),
            _num(row.through, row.integer),
            _ratio(row),
            _delta(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git(src: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def background(runs: list[dict[str, Any]]) -> tuple[float, float]:
    """Median and max CPU (in cores) that processes other than ours used during runs."""
    values = [float(r["background_cores"]) for r in runs]
    return (statistics.median(values), max(values)) if values else (0.0, 0.0)


def notes(runs: list[dict[str, Any]], runtime: float, failed: dict[int, str]) -> str:
    """Runtime, how busy the machine was, and every reason to doubt a number."""
    other_median, other_max = background(runs)
    lines = [
        f"runtime {runtime:.0f} s; CPU used by other processes during the runs:"
        f" median {other_median:.2f}, max {other_max:.2f} cores"
    ]
    if other_median > 0.25:
        lines.append(
            "WARNING: other processes kept the machine busy; absolute numbers are low, and THROUGH (three"
            " busy processes) suffers more than DIRECT. Compare results from quiet machines only."
        )
    bound = [
        f"{r['scenario']} {r['config']} {r['via']} ({r['client_cores']:.2f})" for r in runs if r["client_cores"] > 0.85
    ]
    if bound:
        lines.append(f"client process near one full core (the load generator may limit): {'; '.join(bound)}")
    lines += [f"scenario {number} FAILED: {reason}" for number, reason in failed.items()]
    return "\n".join(lines)


def write_json(path: Path, *, rows: list[Row], runs: list[dict[str, Any]], meta: dict[str, Any], src: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    commit = _git(src, "rev-parse", "HEAD")
    meta = {
        **meta,
        "git_commit": commit or None,
        "git_dirty": bool(_git(src, "status", "--porcelain", "--untracked-files=no")) if commit else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    record = {
        "meta": meta,
        "rows": [{**asdict(r), "ratio": ratio(r)} for r in rows],
        "runs": runs,
    }
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
