"""The usage of every request: recorded off the request path, summed per hour, queried for GET /v1/usage.

``UsageStore.record`` only puts the record on a bounded queue (it never waits, never
raises); a background task writes the queue in batches, each batch one transaction that
inserts the raw rows and adds to the hourly sums. While the database is down the queue
fills up to its bound and what does not fit is dropped and counted: memory stays bounded
and the request path never notices. Raw rows are deleted after the retention period; the
hourly sums, which GET /v1/usage reads, are kept.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, get_args

from sqlalchemy import Integer, delete, func, insert, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.database import (
    MODEL_LENGTH,
    NAME_LENGTH,
    async_url,
    create_tables,
    engine_for,
    usage_hourly,
    usage_requests,
)
from broker.metrics import UNNAMED, Metrics
from wire.frames import UsageSource

log = logging.getLogger("remotellm.usage")

TokenSource = UsageSource  # one definition: the End frame's
TOKEN_SOURCES: tuple[TokenSource, ...] = get_args(TokenSource)  # stored as the index
Group = Literal["user", "model", "connector", "day", "hour"]
GROUPS: tuple[Group, ...] = get_args(Group)  # also the order of a row's keys
COUNTS = ("requests", "prompt_tokens", "completion_tokens")
DEFAULT_GROUP_BY: tuple[Group, ...] = ("user", "model", "day")

HOUR = 3600
HOURS_PER_DAY = 24
QUEUE_LIMIT = 100_000  # records waiting for the database: a few tens of MB at most
BATCH_SIZE = 1000  # records per transaction
# Rows per INSERT statement of a transaction. A statement's rows are prepared in the event
# loop's thread in one go (here and in SQLAlchemy), several microseconds each: a statement
# of a whole batch would hold up every request in flight for milliseconds.
ROWS_PER_STATEMENT = 50
# After the first record of a batch, the flusher waits this long for more: at a low rate each
# request would otherwise be a transaction of its own, its cost landing beside the requests.
BATCH_WINDOW = 0.2
RETENTION_DAYS = 90  # raw rows; the hourly sums are kept for good
EXPIRY_INTERVAL = 3600.0  # how often old raw rows are deleted
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # seconds between attempts while the database is down
INT32_MAX = 2**31 - 1  # the raw rows' integer columns
STATUS_MAX = 999

# Errors that say "the database is not there now": the batch is kept and tried again.
# Anything else (a constraint, a bug) drops the batch, counted, rather than retrying forever.
_TRANSIENT = (OperationalError, InterfaceError, OSError)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request used. ``at``: when it arrived, seconds since the epoch."""

    at: float
    user: str | None  # None: an unnamed user (user_api_keys)
    model: str
    connector: str | None  # None: refused before routing
    status: int
    prompt_tokens: int
    completion_tokens: int
    token_source: TokenSource
    ttfb_ms: int | None
    duration_ms: int


def _count(value: int) -> int:
    return max(0, min(value, INT32_MAX))


def _request_row(record: UsageRecord) -> dict[str, Any]:
    """The raw row: names cut to their columns, counts within them (an LLM's numbers are input)."""
    return {
        "at_ms": int(record.at * 1000),
        "user": None if record.user is None else record.user[:NAME_LENGTH],
        "model": record.model[:MODEL_LENGTH],
        "connector": None if record.connector is None else record.connector[:NAME_LENGTH],
        "status": max(0, min(record.status, STATUS_MAX)),
        "prompt_tokens": _count(record.prompt_tokens),
        "completion_tokens": _count(record.completion_tokens),
        "token_source": TOKEN_SOURCES.index(record.token_source),
        "ttfb_ms": None if record.ttfb_ms is None else _count(record.ttfb_ms),
        "duration_ms": _count(record.duration_ms),
    }


def _hourly_rows(request_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch's sums per hour, user, model and connector, in key order: brokers sharing a
    PostgreSQL database update the same rows in the same order, so they never deadlock."""
    sums: defaultdict[tuple[int, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in request_rows:
        key = (row["at_ms"] // (HOUR * 1000), row["user"] or "", row["model"], row["connector"] or "")
        counts = sums[key]
        counts[0] += 1
        counts[1] += row["prompt_tokens"]
        counts[2] += row["completion_tokens"]
    return [
        {"hour": hour, "user": user, "model": model, "connector": connector, **dict(zip(COUNTS, counts, strict=True))}
        for (hour, user, model, connector), counts in sorted(sums.items())
    ]


def _add_to_hourly(engine: AsyncEngine) -> postgresql.Insert | sqlite.Insert:
    """INSERT ... ON CONFLICT DO UPDATE adding to the sums: one statement, no read-modify-write.
    SQLAlchemy's PostgreSQL and SQLite inserts share this API; only the import differs."""
    statement: postgresql.Insert | sqlite.Insert = (
        postgresql.insert(usage_hourly) if engine.dialect.name == "postgresql" else sqlite.insert(usage_hourly)
    )
    return statement.on_conflict_do_update(
        index_elements=[column for column in usage_hourly.primary_key],
        set_={name: usage_hourly.c[name] + statement.excluded[name] for name in COUNTS},
    )


class UsageStore:
    """Usage records on their way to the database. ``start`` in the running loop, ``aclose`` at the end."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retention_days: int = RETENTION_DAYS,
        queue_limit: int = QUEUE_LIMIT,
        batch_size: int = BATCH_SIZE,
        retry_max: float = RETRY_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_days < 1:
            raise ValueError("the retention must be at least one day")
        self.engine = engine
        self.written = 0  # records in the database
        self.dropped = 0  # records lost: the queue was full, or the database refused a batch
        self._retention = retention_days * 86400
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(queue_limit)
        self._batch_size = batch_size
        self._retry_max = retry_max
        self._clock = clock
        self._next_expiry = 0.0
        self._overflowing = False  # one log line per overflow, not one per record
        self._add_to_hourly = _add_to_hourly(engine)
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, database: str, **options: Any) -> "UsageStore":
        """A started store on ``--database`` (a SQLite path or a postgresql:// URL); call it in
        the running loop. It connects when it first writes: a database down at start-up is
        retried like one that goes down later."""
        store = cls(engine_for(async_url(database)), **options)
        store.start()
        return store

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever())

    def record(self, record: UsageRecord) -> None:
        """Queues ``record``; never waits and never raises."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            if not self._overflowing:
                log.warning("usage queue full (the database is down or slow): dropping records, counted")
                self._overflowing = True

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def flush(self, timeout: float) -> bool:
        """Waits until every record queued so far is written or dropped; False after ``timeout``."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout: float = 10.0) -> None:
        """Writes what is queued (for at most ``timeout``), stops the flusher, closes connections."""
        if self._flusher is not None:
            if not await self.flush(timeout):
                log.warning("usage: %d records not written at shutdown", self._queue.qsize())
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.engine.dispose()

    async def query(self, query: "UsageQuery") -> list[dict[str, object]]:
        return await usage_rows(self.engine, query)

    async def expire(self) -> int:
        """Deletes the raw rows older than the retention period; how many."""
        cutoff_ms = int((self._clock() - self._retention) * 1000)
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(usage_requests).where(usage_requests.c.at_ms < cutoff_ms))
        return int(result.rowcount)

    async def _flush_forever(self) -> None:
        await self._until_done(lambda: create_tables(self.engine), "create the usage tables")
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(BATCH_WINDOW)
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)
            if self._clock() >= self._next_expiry:
                self._next_expiry = self._clock() + EXPIRY_INTERVAL
                await self._until_done(self.expire, "delete old usage rows")
            for _ in batch:  # after the expiry: a flush() returns with the housekeeping done
                self._queue.task_done()

    async def _write(self, batch: list[UsageRecord]) -> None:
        async def transaction() -> None:
            async with self.engine.begin() as connection:
                request_rows: list[dict[str, Any]] = []
                for start in range(0, len(batch), ROWS_PER_STATEMENT):
                    rows = [_request_row(record) for record in batch[start : start + ROWS_PER_STATEMENT]]
                    await connection.execute(insert(usage_requests), rows)
                    request_rows += rows
                await connection.execute(self._add_to_hourly, _hourly_rows(request_rows))

        if await self._until_done(transaction, f"write {len(batch)} usage records"):
            self.written += len(batch)
            self._overflowing = False
        else:
            self.dropped += len(batch)

    async def _until_done(self, operation: Callable[[], Awaitable[object]], what: str) -> bool:
        """Runs ``operation`` until it succeeds while the database is down (backing off);
        False if it failed otherwise. One log line when the database goes, one when it is back."""
        delay, failing = RETRY_FIRST, False
        while True:
            try:
                await operation()
            except _TRANSIENT as exc:
                if not failing:
                    log.warning("usage database unreachable, retrying (%s)", _first_line(exc))
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            except Exception:  # the flusher must outlive any batch: log it, count it, go on
                log.exception("usage: could not %s", what)
                return False
            if failing:
                log.warning("usage database reachable again")
            return True


def _first_line(exc: BaseException) -> str:
    """A database error's first line: the rest may quote the SQL and its parameters."""
    if isinstance(exc, DBAPIError):
        exc = exc.orig or exc
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Everyone(Enum):
    EVERYONE = "everyone"


EVERYONE = Everyone.EVERYONE


@dataclass(frozen=True)
class UsageQuery:
    """What GET /v1/usage and ``python -m broker usage`` ask for.

    ``since``/``until``: an hour counts when it overlaps [since, until) (the sums are hourly).
    ``user``: a name, None (the unnamed users) or EVERYONE.
    """

    group_by: tuple[Group, ...] = DEFAULT_GROUP_BY
    since: datetime | None = None
    until: datetime | None = None
    user: str | Everyone | None = EVERYONE


def parse_group_by(text: str) -> tuple[Group, ...]:
    """``user,model,day`` → the groups, in the order a row shows them."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(GROUPS)
    if unknown:
        raise ValueError(f"group_by takes {', '.join(GROUPS)}; not {', '.join(sorted(unknown))[:200]}")
    return tuple(group for group in GROUPS if group in names)


def parse_time(text: str, name: str) -> datetime:
    """An ISO 8601 time or date; without a zone, UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time, such as 2026-12-01T00:00:00Z") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def usage_query(params: Mapping[str, str], *, caller: str | None, admin: bool) -> UsageQuery:
    """GET /v1/usage's query string. A user key reads its own rows only (the unnamed keys
    share theirs, ``user: null``); an admin key reads everyone's, or ``user=NAME``'s."""
    wanted = params.get("user")
    if not admin and wanted is not None and wanted != caller:
        raise PermissionError("only an admin key reads the usage of other users")
    since, until = params.get("since"), params.get("until")
    return UsageQuery(
        group_by=parse_group_by(params["group_by"]) if "group_by" in params else DEFAULT_GROUP_BY,
        since=None if since is None else parse_time(since, "since"),
        until=None if until is None else parse_time(until, "until"),
        user=(EVERYONE if wanted is None else wanted) if admin else caller,
    )


async def usage_rows(engine: AsyncEngine, query: UsageQuery) -> list[dict[str, object]]:
    """The contract's rows: the keys grouped by, then requests and the three token counts."""
    hourly = usage_hourly.c
    # A literal, not a bound parameter: PostgreSQL matches GROUP BY to SELECT by text.
    day = hourly.hour // literal_column(str(HOURS_PER_DAY), Integer)
    keys = {"user": hourly.user, "model": hourly.model, "connector": hourly.connector, "day": day, "hour": hourly.hour}
    grouped = [keys[group].label(group) for group in query.group_by]
    sums = [func.sum(hourly[name]).label(name) for name in COUNTS]
    statement = select(*grouped, *sums).group_by(*grouped).order_by(*grouped)
    if query.since is not None:
        statement = statement.where(hourly.hour >= math.floor(query.since.timestamp() / HOUR))
    if query.until is not None:
        statement = statement.where(hourly.hour < math.ceil(query.until.timestamp() / HOUR))
    if query.user is not EVERYONE:
        statement = statement.where(hourly.user == (query.user or ""))
    async with engine.connect() as connection:
        result = await connection.execute(statement)
        found = result.mappings().all()
    return [_contract_row(row, query.group_by) for row in found if row["requests"] is not None]


def _contract_row(row: RowMapping, group_by: Sequence[Group]) -> dict[str, object]:
    shown: dict[str, object] = {group: _shown(group, row[group]) for group in group_by}
    counts = {name: int(row[name]) for name in COUNTS}  # PostgreSQL sums bigints as numeric
    return {**shown, **counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]}


def _shown(group: Group, value: Any) -> object:
    if group == "day":
        return datetime.fromtimestamp(int(value) * HOURS_PER_DAY * HOUR, UTC).strftime("%Y-%m-%d")
    if group == "hour":
        return datetime.fromtimestamp(int(value) * HOUR, UTC).strftime("%Y-%m-%dT%H:00:00Z")
    return value or None  # "" stands for NULL in the hourly key


def count_tokens(metrics: Metrics, record: UsageRecord) -> None:
    """Prometheus: the record's tokens by user, model and kind."""
    user = record.user or UNNAMED
    metrics.child(metrics.tokens, user, record.model, "prompt").inc(_count(record.prompt_tokens))
    metrics.child(metrics.tokens, user, record.model, "completion").inc(_count(record.completion_tokens))
