"""The usage store on a real SQLite file and a real PostgreSQL server (started here, killed by PID)."""

import asyncio
import inspect
import itertools
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select

from broker.database import async_url, shown, usage_requests
from broker.metrics import Metrics, Snapshot
from broker.usage import (
    EVERYONE,
    GROUPS,
    RETENTION_DAYS,
    Group,
    UsageQuery,
    UsageRecord,
    UsageStore,
    count_tokens,
    parse_group_by,
    usage_query,
)
from broker.usage_cli import render_table, usage_main
from tests.servers import PostgresServer, postgres_workdir, start_postgres
from tests.support import Stack

DAY0 = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
HOUR = 3600
FLUSH_TIMEOUT = 30.0


_databases = itertools.count()


def fresh_postgres_database(server: PostgresServer) -> str:
    name = f"usage_{next(_databases)}"
    with psycopg.connect(server.url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")  # a name of our own making: no injection
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The --database value of one test: a SQLite path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "remotellm.db")
    return fresh_postgres_database(request.getfixturevalue("postgres"))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))  # type: ignore[arg-type]


def make_record(at: float, user: str | None = "alice", model: str = "llama3", **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "connector": "gpu1",
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "token_source": "reported",
        "ttfb_ms": 120,
        "duration_ms": 900,
        **fields,
    }
    return UsageRecord(at=at, user=user, model=model, **values)  # type: ignore[arg-type]


async def record_all(store: UsageStore, records: list[UsageRecord]) -> None:
    for record in records:
        store.record(record)
    assert await store.flush(FLUSH_TIMEOUT)


def varied_records() -> list[UsageRecord]:
    """Three users (one unnamed), two models, two connectors, over three days and several hours."""
    records = []
    for i in range(240):
        at = DAY0 + (i % 3) * 86400 + (i % 5) * HOUR + (i % 7) * 60
        user = ("alice", "bob", None)[i % 3 if i % 2 else (i // 2) % 3]
        records.append(
            make_record(
                at,
                user,
                ("llama3", "qwen")[i % 4 // 3],
                connector=("gpu1", "gpu2", None)[i % 11 % 3],
                prompt_tokens=i,
                completion_tokens=2 * i + 1,
            )
        )
    return records


def expected_rows(records: list[UsageRecord], group_by: tuple[Group, ...]) -> list[dict[str, object]]:
    """The contract's rows, computed the plain way."""
    sums: defaultdict[tuple[object, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
    for record in records:
        moment = datetime.fromtimestamp(record.at, UTC)
        keys = {
            "user": record.user,
            "model": record.model,
            "connector": record.connector,
            "day": moment.strftime("%Y-%m-%d"),
            "hour": moment.strftime("%Y-%m-%dT%H:00:00Z"),
        }
        sum_of_key = sums[tuple(keys[group] for group in group_by)]
        sum_of_key[0] += 1
        sum_of_key[1] += record.prompt_tokens
        sum_of_key[2] += record.completion_tokens
    rows = []
    for key, (requests, prompt, completion) in sums.items():
        counts = {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}
        rows.append({**dict(zip(group_by, key, strict=True)), **counts, "total_tokens": prompt + completion})
    return sorted(rows, key=lambda row: tuple((row[g] is not None, row[g] or "") for g in group_by))


def test_every_group_by_combination_returns_the_contract_rows(database: str) -> None:
    records = varied_records()

    async def scenario() -> None:
        store = UsageStore.open(database, batch_size=50)
        await record_all(store, records)
        assert (store.written, store.dropped) == (240, 0)
        for size in range(len(GROUPS) + 1):
            for group_by in itertools.combinations(GROUPS, size):
                found = await store.query(UsageQuery(group_by=group_by))
                assert found == expected_rows(records, group_by), group_by
        await store.aclose()

    run(scenario)


def test_since_until_and_user_filters(database: str) -> None:
    records = varied_records()

    async def scenario() -> None:
        store = UsageStore.open(database)
        await record_all(store, records)
        since = datetime.fromtimestamp(DAY0 + 86400 + 2 * HOUR + 30, UTC)  # inside an hour: that hour counts
        until = datetime.fromtimestamp(DAY0 + 2 * 86400 + HOUR, UTC)  # an hour's start: excluded
        window = UsageQuery(group_by=("user", "hour"), since=since, until=until)
        inside = [r for r in records if DAY0 + 86400 + 2 * HOUR <= r.at < DAY0 + 2 * 86400 + HOUR]
        assert await store.query(window) == expected_rows(inside, ("user", "hour"))
        for user in ("alice", None):
            mine = UsageQuery(group_by=("user", "model", "day"), user=user)
            assert await store.query(mine) == expected_rows([r for r in records if r.user == user], mine.group_by)
        assert await store.query(UsageQuery(user="nobody")) == []
        await store.aclose()

    run(scenario)


def test_a_new_store_on_the_same_database_keeps_and_adds_to_the_data(database: str) -> None:
    first_half, second_half = varied_records()[:100], varied_records()[100:]

    async def scenario() -> None:
        store = UsageStore.open(database)
        await record_all(store, first_half)
        await store.aclose()
        restarted = UsageStore.open(database)
        assert await restarted.query(UsageQuery(group_by=("day",))) == expected_rows(first_half, ("day",))
        await record_all(restarted, second_half)
        everything = UsageQuery(group_by=("user", "connector", "hour"))
        assert await restarted.query(everything) == expected_rows(first_half + second_half, everything.group_by)
        await restarted.aclose()

    run(scenario)


def test_retention_deletes_old_raw_rows_and_keeps_the_hourly_sums(database: str) -> None:
    now = DAY0 + 100 * 86400
    clock = [now]
    old = [make_record(now - (RETENTION_DAYS + 1) * 86400 + i) for i in range(30)]
    recent = [make_record(now - (RETENTION_DAYS - 1) * 86400 + i) for i in range(20)]

    async def raw_rows(store: UsageStore) -> int:
        async with store.engine.connect() as connection:
            return int((await connection.execute(select(func.count()).select_from(usage_requests))).scalar_one())

    async def scenario() -> None:
        store = UsageStore.open(database, clock=lambda: clock[0])
        await record_all(store, recent)  # the first batch deletes what has expired: nothing yet
        await record_all(store, old)  # late records: the next expiry is an hour away
        assert await raw_rows(store) == 50
        clock[0] += 3600  # the hourly expiry is due: the next batch triggers it
        await record_all(store, [make_record(now)])
        assert await raw_rows(store) == 21
        assert await store.query(UsageQuery(group_by=())) == expected_rows([*old, *recent, make_record(now)], ())
        await store.aclose()

    run(scenario)


@pytest.mark.slow  # (heavy: once per tox run keeps CI under 25 minutes)
def test_two_brokers_writing_the_same_hours_at_once_sum_exactly(postgres: PostgresServer) -> None:
    database = fresh_postgres_database(postgres)
    records = varied_records()

    async def scenario() -> None:
        brokers = [UsageStore.open(database, batch_size=7) for _ in range(2)]
        for i, record in enumerate(records * 4):
            brokers[i % 2].record(record)
        assert all(await asyncio.gather(*(broker.flush(FLUSH_TIMEOUT) for broker in brokers)))
        assert await brokers[0].query(UsageQuery(group_by=("user", "model", "connector", "hour"))) == expected_rows(
            records * 4, ("user", "model", "connector", "hour")
        )
        for broker in brokers:
            await broker.aclose()

    run(scenario)


def test_database_down_recording_never_waits_and_counts_what_it_drops(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """PostgreSQL stopped under load, then back: nothing blocks, memory stays bounded,
    and every record is either in the database or counted as dropped."""
    stack = Stack(tmp_path_factory.mktemp("postgres-down-logs"))
    with postgres_workdir() as workdir:
        server = start_postgres(stack, workdir)
        database = fresh_postgres_database(server)

        async def scenario() -> None:
            store = UsageStore.open(database, queue_limit=500, batch_size=100, retry_max=0.2)
            await record_all(store, [make_record(DAY0)] * 50)
            server.stop()
            # record() is a plain call that only queues: it cannot wait on the database.
            assert not inspect.iscoroutinefunction(store.record)
            for i in range(5000):
                store.record(make_record(DAY0 + i))
                if i % 100 == 0:
                    await asyncio.sleep(0.01)  # the flusher tries, and fails
            assert store.queued <= 500 and store.dropped >= 5000 - 500 - 100
            restarted = start_postgres(stack, workdir, port=server.port)
            assert await store.flush(FLUSH_TIMEOUT)
            assert store.written + store.dropped == 5050
            total = await store.query(UsageQuery(group_by=()))
            assert total[0]["requests"] == store.written
            await store.aclose()
            restarted.stop()

        try:
            run(scenario)
        finally:
            stack.close()


def test_hostile_values_are_cut_to_their_columns(database: str) -> None:
    async def scenario() -> None:
        store = UsageStore.open(database)
        weird = make_record(
            DAY0,
            user="x'); DROP TABLE usage_requests; --",
            model="m" * 1000,
            prompt_tokens=-5,
            completion_tokens=10**12,
            status=70000,
            ttfb_ms=None,
        )
        await record_all(store, [weird])
        rows = await store.query(UsageQuery(group_by=("user", "model")))
        assert rows == [
            {
                "user": "x'); DROP TABLE usage_requests; --",
                "model": "m" * 200,
                "requests": 1,
                "prompt_tokens": 0,
                "completion_tokens": 2**31 - 1,
                "total_tokens": 2**31 - 1,
            }
        ]
        await store.aclose()

    run(scenario)


def test_usage_query_from_the_query_string() -> None:
    params = {"group_by": "day,user", "since": "2026-12-01", "until": "2026-12-02T10:00:00+02:00", "user": "bob"}
    admin = usage_query(params, caller=None, admin=True)
    assert admin.group_by == ("user", "day")  # the contract's key order, whatever the asked order
    assert admin.since == datetime(2026, 12, 1, tzinfo=UTC)
    assert admin.until is not None and admin.until.timestamp() == datetime(2026, 12, 2, 8, tzinfo=UTC).timestamp()
    assert admin.user == "bob"
    assert usage_query({}, caller=None, admin=True).user is EVERYONE
    assert usage_query({}, caller="alice", admin=False).user == "alice"
    assert usage_query({"user": "alice"}, caller="alice", admin=False).user == "alice"
    assert usage_query({}, caller=None, admin=False).user is None  # the unnamed keys: user null
    assert usage_query({}, caller=None, admin=False).group_by == ("user", "model", "day")
    with pytest.raises(PermissionError):
        usage_query({"user": "bob"}, caller="alice", admin=False)
    with pytest.raises(ValueError, match="group_by takes"):
        parse_group_by("user,password")
    with pytest.raises(ValueError, match="since must be an ISO 8601 time"):
        usage_query({"since": "yesterday"}, caller=None, admin=True)


def test_the_database_url_gets_its_async_driver_and_hides_its_password() -> None:
    assert str(async_url("usage.db")) == "sqlite+aiosqlite:///usage.db"
    url = async_url("postgresql://remotellm:s3cret@db.example:5432/usage?sslmode=require")
    assert url.drivername == "postgresql+psycopg" and url.query == {"sslmode": "require"}
    assert "s3cret" not in shown(url)
    assert async_url("postgres://db/usage").drivername == "postgresql+psycopg"
    with pytest.raises(ValueError, match="SQLite path or a postgresql"):
        async_url("mysql://db/usage")


def test_the_cli_prints_the_rows_as_a_table(database: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def fill() -> None:
        store = UsageStore.open(database)
        await record_all(store, [make_record(DAY0), make_record(DAY0 + 60, None, prompt_tokens=1000)])
        await store.aclose()

    run(fill)
    assert usage_main(["--database", database, "--since", "2026-12-01", "--group-by", "user,day"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "user   day         requests  prompt_tokens  completion_tokens  total_tokens",
        "-      2026-12-01         1           1000                  4          1004",
        "alice  2026-12-01         1             10                  4            14",
    ]
    assert usage_main(["--group-by", "model"], environ={"REMOTELLM_DATABASE": database}) == 0
    assert "llama3" in capsys.readouterr().out
    assert usage_main(["--database", database, "--group-by", "colour"]) == 2
    assert "group_by takes" in capsys.readouterr().err


def test_the_cli_creates_no_database_where_there_is_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.db"
    assert usage_main(["--database", str(missing)]) == 1
    assert "no database at" in capsys.readouterr().err
    assert not missing.exists()


def test_render_table_aligns_names_left_and_numbers_right() -> None:
    rows = [{"model": "a", "requests": 5}, {"model": "longer", "requests": 12345}]
    assert render_table(rows, ["model", "requests"]).splitlines() == [
        "model   requests",
        "a              5",
        "longer     12345",
    ]
    assert render_table([], ["model"]) == "model"


def test_prometheus_counts_tokens_by_user_model_and_kind() -> None:
    metrics = Metrics(Snapshot)
    count_tokens(metrics, make_record(DAY0, None, prompt_tokens=7, completion_tokens=3))
    count_tokens(metrics, make_record(DAY0, "alice", prompt_tokens=1, completion_tokens=2))
    text = metrics.render().decode()
    assert 'remotellm_tokens_total{kind="prompt",model="llama3",user="_unnamed"} 7.0' in text
    assert 'remotellm_tokens_total{kind="completion",model="llama3",user="alice"} 2.0' in text


def test_a_database_missing_at_start_up_is_waited_for(tmp_path: Path) -> None:
    later = tmp_path / "later"

    async def scenario() -> None:
        store = UsageStore.open(str(later / "remotellm.db"), retry_max=0.05)
        store.record(make_record(DAY0))  # accepted at once, whatever the database does
        assert not await store.flush(0.3)  # SQLite cannot open a file in a missing directory
        later.mkdir()
        assert await store.flush(FLUSH_TIMEOUT)
        assert (store.written, store.dropped) == (1, 0)
        await store.aclose()

    run(scenario)
