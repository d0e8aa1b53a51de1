"""Console sign-in: an admin key buys a session cookie; every form carries the session's CSRF token.

Sessions live in the database (digests only), so every worker and every broker sharing
it knows them, and logout ends one everywhere. The cookie is HttpOnly and SameSite=Strict,
and Secure when the console is served over TLS. A form post without the session's token
is refused whatever its cookie: SameSite is the first guard, the token the second.
"""

import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, String, Table, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from broker.database import metadata
from broker.enrollment import digest_hex

COOKIE = "remotellm_console"
LOGIN_COOKIE = "remotellm_login"  # the login form's double-submit token (no session yet)
SESSION_LIFETIME = 8 * 3600  # seconds a console session lasts, from sign-in
LOGIN_FORM_LIFETIME = 3600
CSRF_HEADER = "x-csrf-token"  # the token in the live pages' fetches
CSRF_FIELD = "csrf"  # the token in a form
MAX_COOKIE = 200  # longer values are not ours: not even hashed

console_sessions = Table(
    "console_sessions",
    metadata,
    Column("digest", String(64), primary_key=True),  # SHA-256 of the cookie's value, hex
    Column("csrf", String(64), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    csrf: str
    expires_ms: int


def _now_ms() -> int:
    return int(time.time() * 1000)


async def open_session(engine: AsyncEngine) -> tuple[str, ConsoleSession]:
    """A new session (the cookie's value, and what it stands for); expired ones go."""
    value, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session = ConsoleSession(csrf, _now_ms() + SESSION_LIFETIME * 1000)
    async with engine.begin() as connection:
        await connection.execute(delete(console_sessions).where(console_sessions.c.expires_ms < _now_ms()))
        await connection.execute(
            insert(console_sessions).values(digest=digest_hex(value), csrf=csrf, expires_ms=session.expires_ms)
        )
    return value, session


async def find_session(engine: AsyncEngine, request: Request) -> ConsoleSession | None:
    """The live session the request's cookie names; None if none (or expired)."""
    value = request.cookies.get(COOKIE, "")
    if not value or len(value) > MAX_COOKIE:
        return None
    table = console_sessions.c
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(table.csrf, table.expires_ms).where(
                    table.digest == digest_hex(value), table.expires_ms > _now_ms()
                )
            )
        ).one_or_none()
    return None if row is None else ConsoleSession(row.csrf, row.expires_ms)


async def close_session(engine: AsyncEngine, request: Request) -> None:
    value = request.cookies.get(COOKIE, "")
    if value and len(value) <= MAX_COOKIE:
        async with engine.begin() as connection:
            await connection.execute(delete(console_sessions).where(console_sessions.c.digest == digest_hex(value)))


def csrf_ok(expected: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/admin",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(request: Request, response: Response, name: str) -> None:
    set_cookie(request, response, name, "", 0)
