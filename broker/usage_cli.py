"""``python -m broker usage``: the rows of GET /v1/usage, printed as a table."""

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError

from broker.database import DEFAULT_DATABASE, async_url, create_tables, engine_for, shown
from broker.usage import COUNTS, DEFAULT_GROUP_BY, EVERYONE, UsageQuery, parse_group_by, parse_time, usage_rows

DATABASE_ENV = "REMOTELLM_DATABASE"  # the broker's --database, from the environment
NONE_SHOWN = "-"  # an unnamed user, a request that reached no connector


def render_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """Rows as aligned text columns: names to the left, numbers to the right."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row.get(column), int) for row in rows) and rows != [] for column in columns]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), *(line(values) for values in cells)])


def _cell(value: object) -> str:
    return NONE_SHOWN if value is None else str(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker usage", description="Tokens used, from the usage database.")
    add_database_option(parser)
    parser.add_argument("--since", help="ISO 8601 time or date, UTC unless it says otherwise")
    parser.add_argument("--until", help="ISO 8601 time or date (excluded)")
    parser.add_argument(
        "--group-by", default=",".join(DEFAULT_GROUP_BY), help="any of user,model,connector,day,hour (%(default)s)"
    )
    parser.add_argument("--user", help="one user's rows only")
    return parser


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """``--database``, as every command that reads or writes the broker's database takes it."""
    parser.add_argument(
        "--database", help=f"a SQLite path or postgresql:// URL (default: ${DATABASE_ENV}, else {DEFAULT_DATABASE})"
    )


def database_of(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    return str(args.database or environ.get(DATABASE_ENV) or DEFAULT_DATABASE)


def usage_main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    args = _parser().parse_args(argv)
    database = database_of(args, environ)
    try:
        url = async_url(database)
        query = UsageQuery(
            group_by=parse_group_by(args.group_by),
            since=None if args.since is None else parse_time(args.since, "--since"),
            until=None if args.until is None else parse_time(args.until, "--until"),
            user=EVERYONE if args.user is None else args.user,
        )
    except ValueError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return 2
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        print(f"usage: no database at {url.database}", file=sys.stderr)  # and none created by a read
        return 1
    try:
        rows = asyncio.run(_rows(url, query))
    except (SQLAlchemyError, OSError) as exc:
        print(f"usage: cannot read {shown(url)}: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(render_table(rows, [*query.group_by, *COUNTS, "total_tokens"]))
    return 0


async def _rows(url: URL, query: UsageQuery) -> list[dict[str, object]]:
    engine = engine_for(url)
    try:
        await create_tables(engine)  # a database the broker never wrote to reads as empty
        return await usage_rows(engine, query)
    finally:
        await engine.dispose()
