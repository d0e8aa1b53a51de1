"""The broker's database: its tables (one MetaData, which later tables join) and its engine.

SQLAlchemy 2's asyncio engine serves SQLite (aiosqlite) and PostgreSQL (psycopg 3) through
one code path. Times are integers (milliseconds or hours since the epoch, UTC) so that
grouping by hour or day is integer arithmetic every database does alike.
"""

from pathlib import Path

from sqlalchemy import BigInteger, Column, Integer, MetaData, SmallInteger, String, Table
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

DEFAULT_DATABASE = "remotellm.db"
NAME_LENGTH = 100  # user and connector names, from the configuration
MODEL_LENGTH = 200  # model names, as connectors announce them

# The async driver for each URL scheme an operator writes. psycopg 3 rather than asyncpg:
# it hands the URL to libpq, so every libpq option (sslmode, sslrootcert, host=/socket/dir,
# service files, PG* variables) means what PostgreSQL's documentation says.
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",  # Heroku's and others' spelling
    "sqlite": "sqlite+aiosqlite",
}

metadata = MetaData()

# One row per request: compact (integers, short strings), deleted after the retention period.
usage_requests = Table(
    "usage_requests",
    metadata,
    Column("at_ms", BigInteger, nullable=False, index=True),  # when the request arrived
    Column("user", String(NAME_LENGTH)),  # NULL: an unnamed user (user_api_keys)
    Column("model", String(MODEL_LENGTH), nullable=False),
    Column("connector", String(NAME_LENGTH)),  # NULL: refused before routing
    Column("status", SmallInteger, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("token_source", SmallInteger, nullable=False),  # broker.usage.TOKEN_SOURCES
    Column("ttfb_ms", Integer),  # NULL: no response head came
    Column("duration_ms", Integer, nullable=False),
)

# The sums per hour, kept for good: what GET /v1/usage reads. "" stands for NULL in the key
# (a NULL never equals another NULL, so it could not be the target of an upsert).
usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("hour", Integer, primary_key=True),  # hours since the epoch, UTC
    Column("user", String(NAME_LENGTH), primary_key=True),
    Column("model", String(MODEL_LENGTH), primary_key=True),
    Column("connector", String(NAME_LENGTH), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
)


def async_url(database: str) -> URL:
    """``--database``: a SQLite path, ``sqlite:///PATH`` or ``postgresql://...``, with its
    async driver; an explicit ``scheme+driver://`` URL is taken as it is."""
    if "://" not in database:
        return URL.create("sqlite+aiosqlite", database=str(Path(database).expanduser()))
    url = make_url(database)
    if "+" in url.drivername and url.get_backend_name() in _ASYNC_DRIVERS:
        return url
    if url.drivername not in _ASYNC_DRIVERS:
        raise ValueError("the database must be a SQLite path or a postgresql:// URL")
    return url.set(drivername=_ASYNC_DRIVERS[url.drivername])


def shown(url: URL) -> str:
    """The URL for a log line or a message: never its password."""
    return url.render_as_string(hide_password=True)


def engine_for(url: URL) -> AsyncEngine:
    """An engine on ``url`` (from ``async_url``); it connects when first used."""
    # pool_pre_ping: a pooled connection that a database restart broke is replaced, not used.
    return create_async_engine(url, pool_pre_ping=True)


async def create_tables(engine: AsyncEngine) -> None:
    """Creates the tables that are missing."""
    try:
        await _create_missing(engine)
    except DBAPIError:
        # Brokers of a fleet starting together race to create the tables: the loser's
        # second look finds them. Anything else fails again, and raises.
        await _create_missing(engine)


async def _create_missing(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
