"""``python -m broker enroll``: a one-time code with which a new connector enrolls itself."""

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from sqlalchemy.exc import SQLAlchemyError

from broker.database import async_url, shown
from broker.enrollment import DEFAULT_TTL, EnrollmentError, EnrollmentStore, check_name, check_ttl, parse_models
from broker.usage_cli import add_database_option, database_of


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker enroll",
        description="Prints a one-time enrollment code (its last line) for python -m connector --enroll CODE.",
    )
    parser.add_argument("--name", required=True, help="the new connector's name")
    parser.add_argument("--models", default="", help="models it may serve, comma-separated (default: any)")
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL, help="seconds the code stays valid (%(default)s)")
    add_database_option(parser)
    return parser


def enroll_main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    args = _parser().parse_args(argv)
    database = database_of(args, environ)
    try:
        url = async_url(database)
        name, models, ttl = check_name(args.name), parse_models(args.models), check_ttl(args.ttl)
    except (ValueError, EnrollmentError) as exc:
        print(f"enroll: {exc}", file=sys.stderr)
        return 2
    try:
        code = asyncio.run(_create(database, name, models, ttl))
    except (SQLAlchemyError, OSError) as exc:
        print(f"enroll: cannot write {shown(url)}: {type(exc).__name__}", file=sys.stderr)
        return 1
    except EnrollmentError as exc:
        print(f"enroll: {exc}", file=sys.stderr)
        return 1
    print(f"enrollment code for connector {name!r}, valid {ttl} s, for one use:")
    print(code)
    return 0


async def _create(database: str, name: str, models: tuple[str, ...] | None, ttl: int) -> str:
    store = EnrollmentStore.open(database)
    try:
        await store.prepare()
        return await store.create_code(name, models, ttl)
    finally:
        await store.aclose()
