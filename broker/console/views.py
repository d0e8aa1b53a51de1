"""What the console shows, as plain data: live sessions from the hub, traffic from the usage tables.

The same dictionaries feed the pages' templates and the admin JSON API. No prompt or
answer is ever read: the usage tables hold none.
"""

import math
import time
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, case, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.database import usage_hourly, usage_requests
from broker.hub import Hub
from broker.sessions import Event
from broker.tunnel import Session
from broker.usage import HOUR

Range = Literal["hour", "day"]
RANGES: dict[str, tuple[int, int]] = {"hour": (60, 60), "day": (3600, 24)}  # bucket seconds, buckets
FEED_LENGTH = 50
HISTORY_SHOWN = 50
TOP_CONSUMERS = 10
SERIES_SHOWN = 8  # lines in one chart; the rest are summed as "others"
ROUND_TRIP_SHOWN = 3600.0  # a round trip longer than this is a bad clock, not a measurement
UNNAMED = "(unnamed)"  # users of user_api_keys
OTHERS = "(others)"


def when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def transport(protocol: str) -> str:
    """The session's protocol as an operator reads it: HTTP/2, HTTP/1.1, with short polls."""
    names = {"h2": "HTTP/2", "http/1.1": "HTTP/1.1"}
    base, _, short = protocol.partition(" ")
    return names.get(base, "registering") + (" (short polls)" if short else "")


def _last(history: list[Event], predicate: Any) -> Event | None:
    return next((event for event in reversed(history) if predicate(event)), None)


def _session_row(hub: Hub, session: Session, history: list[Event]) -> dict[str, Any]:
    came = _last(history, lambda e: e.connected and e.connector_id == session.hello.connector_id)
    left = _last(history, lambda e: not e.connected and e.name == session.name)
    rtt = session.round_trip
    return {
        "name": session.name,
        "models": sorted(hub.router.models_of(session) or session.offered),
        "transport": transport(session.protocol),
        "proxy": came.detail.partition(" via ")[2] if came else "",
        "round_trip_ms": round(rtt * 1000) if rtt is not None and 0 <= rtt < ROUND_TRIP_SHOWN else None,
        "in_flight": session.in_flight,
        "capacity": session.spec.max_concurrent,  # None: no cap (the LLM server queues by itself)
        "connected_since": when(session.connected_at),
        "last_error": left.detail if left else "",
        "protocol_errors": session.violations,
        "state": "leaving" if session.leaving else ("connected" if session.polling else "reconnecting"),
    }


def connectors(hub: Hub) -> dict[str, Any]:
    history = list(hub.sessions.history)
    live = sorted((_session_row(hub, s, history) for s in hub.sessions), key=lambda row: row["name"])
    enrolled = [
        {
            "name": c.name,
            "state": c.state,
            "models": list(c.models or ()),
            "enrolled": when(c.created_ms / 1000),
            "since": when(c.changed_ms / 1000),
            "rotating": c.rotating,
        }
        for c in hub.enrollment.enrolled.rows
    ]
    events = [
        {"at": when(e.at), "name": e.name, "event": "connected" if e.connected else "disconnected", "detail": e.detail}
        for e in reversed(history[-HISTORY_SHOWN:])
    ]
    return {"connectors": live, "enrolled": enrolled, "history": events}


async def models(hub: Hub, engine: AsyncEngine) -> dict[str, Any]:
    """Each model: the connectors serving it, and its last hour's traffic and latency."""
    serving: dict[str, list[str]] = {model: [] for model in hub.router.models()}
    for session in hub.sessions:
        for model in hub.router.models_of(session):
            serving.setdefault(model, []).append(session.name)
    table = usage_requests.c
    statement = (
        select(
            table.model,
            func.count().label("requests"),
            func.sum(case((table.status >= 400, 1), else_=0)).label("errors"),
            func.avg(table.duration_ms).label("duration"),
            func.avg(table.ttfb_ms).label("ttfb"),
            func.sum(table.prompt_tokens + table.completion_tokens).label("tokens"),
        )
        .where(table.at_ms >= int((time.time() - HOUR) * 1000))
        .group_by(table.model)
    )
    async with engine.connect() as connection:
        traffic = {row.model: row for row in (await connection.execute(statement)).all()}
    rows = []
    for model in sorted(serving.keys() | traffic.keys()):
        row = traffic.get(model)
        rows.append(
            {
                "model": model,
                "connectors": sorted(set(serving.get(model, []))),
                "requests": int(row.requests) if row else 0,
                "errors": int(row.errors or 0) if row else 0,
                "tokens": int(row.tokens or 0) if row else 0,
                "mean_ms": _rounded(row.duration) if row else None,
                "first_byte_ms": _rounded(row.ttfb) if row else None,
            }
        )
    return {"models": rows}


def _rounded(value: object) -> int | None:
    return None if value is None else round(float(value))  # type: ignore[arg-type]


async def usage(engine: AsyncEngine, span: Range) -> dict[str, Any]:
    """Charts' data over the last hour (per minute) or day (per hour): tokens per user and
    per model, requests and errors; and the top consumers."""
    step, count = RANGES[span]
    now = time.time()
    first = math.floor(now / step) - count + 1
    buckets = [(first + i) * step for i in range(count)]
    table = usage_requests.c
    bucket = (table.at_ms // literal_column(str(step * 1000), BigInteger)).label("bucket")
    since_ms = first * step * 1000
    tokens = func.sum(table.prompt_tokens + table.completion_tokens)
    hourly = usage_hourly.c
    hourly_tokens = func.sum(hourly.prompt_tokens + hourly.completion_tokens)
    errors = func.sum(case((table.status >= 400, 1), else_=0))
    recent = table.at_ms >= since_ms
    if span == "day":  # the hourly sums: a day of raw rows may be millions
        statements = [
            select(hourly.hour, key, hourly_tokens).where(hourly.hour >= first).group_by(hourly.hour, key)
            for key in (hourly.user, hourly.model)
        ]
    else:
        statements = [
            select(bucket, key, tokens).where(recent).group_by(bucket, key) for key in (table.user, table.model)
        ]
    statements.append(select(bucket, func.count(), errors).where(recent).group_by(bucket))
    top_statement = (
        select(table.user, func.count().label("requests"), errors.label("errors"), tokens.label("tokens"))
        .where(recent)
        .group_by(table.user)
        .order_by(tokens.desc())
        .limit(TOP_CONSUMERS)
    )
    async with engine.connect() as connection:
        by_user, by_model, outcomes, top = [
            (await connection.execute(statement)).all() for statement in [*statements, top_statement]
        ]
    return {
        "range": span,
        "times": buckets,
        "by_user": _series(by_user, first, count, lambda name: name or UNNAMED),
        "by_model": _series(by_model, first, count, str),
        "requests": _column(outcomes, 1, first, count),
        "errors": _column(outcomes, 2, first, count),
        "top": [
            {
                "user": row.user or UNNAMED,
                "requests": int(row.requests),
                "errors": int(row.errors or 0),
                "tokens": int(row.tokens or 0),
            }
            for row in top
        ],
    }


def _series(rows: Any, first: int, count: int, label: Any) -> dict[str, list[int]]:
    """Rows of (bucket, key, value) as one list per key, the biggest keys first, the rest summed."""
    series: dict[str, list[int]] = {}
    for bucket, key, value in rows:
        position = int(bucket) - first
        if 0 <= position < count:
            series.setdefault(label(key), [0] * count)[position] += int(value or 0)
    ranked = sorted(series, key=lambda name: -sum(series[name]))
    shown = {name: series[name] for name in ranked[:SERIES_SHOWN]}
    if len(ranked) > SERIES_SHOWN:
        shown[OTHERS] = [sum(series[name][i] for name in ranked[SERIES_SHOWN:]) for i in range(count)]
    return shown


def _column(rows: Any, column: int, first: int, count: int) -> list[int]:
    values = [0] * count
    for row in rows:
        position = int(row[0]) - first
        if 0 <= position < count:
            values[position] = int(row[column] or 0)
    return values


async def feed(engine: AsyncEngine) -> dict[str, Any]:
    """The latest requests: who, which model, where, how it ended, how long, how many tokens."""
    table = usage_requests.c
    statement = (
        select(
            table.at_ms,
            table.user,
            table.model,
            table.connector,
            table.status,
            table.ttfb_ms,
            table.duration_ms,
            (table.prompt_tokens + table.completion_tokens).label("tokens"),
        )
        .order_by(table.at_ms.desc())
        .limit(FEED_LENGTH)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(statement)).all()
    return {
        "requests": [
            {
                "at": when(row.at_ms / 1000),
                "user": row.user or UNNAMED,
                "model": row.model,
                "connector": row.connector or "",
                "status": row.status,
                "first_byte_ms": row.ttfb_ms,
                "duration_ms": row.duration_ms,
                "tokens": int(row.tokens),
            }
            for row in rows
        ]
    }
