"""Enrolled connectors: one-time codes, per-connector credentials, approval and revocation.

Codes and credentials are stored as SHA-256 digests only. A code is redeemed by one
conditional UPDATE (``used_ms IS NULL AND expires_ms > now``), so two brokers sharing the
database cannot both redeem it. Each broker keeps the enrolled connectors in memory
(``Enrolled``), read again from the database every ``REFRESH_INTERVAL`` and at once after
its own changes: a revocation on one broker closes the tunnels of every broker sharing it.
"""

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from sqlalchemy import BigInteger, Column, String, Table, Text, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.config import ConnectorSpec
from broker.database import NAME_LENGTH, async_url, create_tables, engine_for, metadata
from broker.keys import bearer

log = logging.getLogger("remotellm.enrollment")

State = Literal["pending", "approved", "revoked"]
CODE_PREFIX = "rle_"  # an enrollment code: shown once, typed or pasted on the LLM box
CREDENTIAL_PREFIX = "rlc_"  # a connector's credential: in its credentials file only
DEFAULT_TTL = 3600  # seconds a code stays valid
MAX_TTL = 30 * 86400
REFRESH_INTERVAL = 1.0  # seconds between reads of the enrolled connectors (revocations of other brokers)
MAX_CODE_LENGTH = 200  # anything longer is not one of ours
MAX_MODELS = 64
# A connector's name becomes a metrics label and a log field: plain text, short.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
MODEL_PATTERN = re.compile(r"[\x21-\x7e]{1,200}")

enrollment_codes = Table(
    "enrollment_codes",
    metadata,
    Column("digest", String(64), primary_key=True),  # SHA-256 of the code, hex
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("models", Text),  # comma-separated; NULL: any model
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("used_ms", BigInteger),  # NULL: not redeemed yet
)

enrolled_connectors = Table(
    "enrolled_connectors",
    metadata,
    Column("name", String(NAME_LENGTH), primary_key=True),
    # Stable for the connector's life (the sessions' key); the credential may be rotated.
    Column("identity", String(64), nullable=False, unique=True),
    Column("credential", String(64), nullable=False, unique=True),  # SHA-256 of the credential, hex
    Column("previous", String(64)),  # the credential before a rotation, until the connector uses the new one
    Column("models", Text),
    Column("state", String(16), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("changed_ms", BigInteger, nullable=False),
)


class EnrollmentError(Exception):
    """A refusal whose message is safe to show; ``code`` is the error body's ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class EnrolledConnector:
    """One row of enrolled_connectors, as the console shows it (no digests)."""

    name: str
    identity: str
    models: tuple[str, ...] | None
    state: State
    created_ms: int
    changed_ms: int
    rotating: bool  # a new credential is issued and the old one still works


@dataclass(frozen=True, slots=True)
class Redeemed:
    name: str
    credential: str
    state: State


def digest_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise EnrollmentError(400, "invalid_name", "a connector name is 1-64 letters, digits or ._@+-")
    return name


def parse_models(text: str) -> tuple[str, ...] | None:
    """``a,b`` → the models; empty: None (any model)."""
    models = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if len(models) > MAX_MODELS or not all(MODEL_PATTERN.fullmatch(m) for m in models):
        raise EnrollmentError(400, "invalid_models", f"models: at most {MAX_MODELS} names of visible characters")
    return models or None


def check_ttl(ttl: float) -> int:
    if not 0 < ttl <= MAX_TTL:
        raise EnrollmentError(400, "invalid_ttl", f"the code's lifetime must be 1 to {MAX_TTL} seconds")
    return int(ttl)


def _models_text(models: tuple[str, ...] | None) -> str | None:
    return ",".join(models) if models else None


def _models_of(text: str | None) -> tuple[str, ...] | None:
    return tuple(text.split(",")) if text else None


def _now_ms() -> int:
    return int(time.time() * 1000)


class EnrollmentStore:
    """The enrollment tables: every read and write of them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, database: str) -> "EnrollmentStore":
        return cls(engine_for(async_url(database)))

    async def aclose(self) -> None:
        await self.engine.dispose()

    async def prepare(self) -> None:
        await create_tables(self.engine)

    async def create_code(self, name: str, models: tuple[str, ...] | None, ttl: int) -> str:
        """A new one-time code for a connector called ``name``; only its digest is stored."""
        check_name(name)
        code = CODE_PREFIX + secrets.token_urlsafe(24)
        now = _now_ms()
        row = {"digest": digest_hex(code), "name": name, "models": _models_text(models), "created_ms": now}
        async with self.engine.begin() as connection:
            await connection.execute(delete(enrollment_codes).where(enrollment_codes.c.expires_ms < now))
            await connection.execute(insert(enrollment_codes).values(**row, expires_ms=now + ttl * 1000))
        return code

    async def redeem(self, code: str, *, require_approval: bool, taken: Callable[[str], bool]) -> Redeemed:
        """Exchanges a valid, unused code for a credential, in one transaction; ``taken``:
        whether a configured (YAML) connector has the name already."""
        now = _now_ms()
        credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
        state: State = "pending" if require_approval else "approved"
        codes = enrollment_codes.c
        try:
            async with self.engine.begin() as connection:
                used = await connection.execute(
                    update(enrollment_codes)
                    .where(codes.digest == digest_hex(code), codes.used_ms.is_(None), codes.expires_ms > now)
                    .values(used_ms=now)
                )
                if used.rowcount != 1:
                    raise EnrollmentError(401, "invalid_code", "This enrollment code is unknown, used or expired.")
                found = (
                    await connection.execute(select(codes.name, codes.models).where(codes.digest == digest_hex(code)))
                ).one()
                if taken(found.name):
                    raise EnrollmentError(409, "name_taken", f"a configured connector is called {found.name!r}")
                table = enrolled_connectors.c
                # A revoked connector's name may be enrolled again; a live one's may not.
                await connection.execute(
                    delete(enrolled_connectors).where(table.name == found.name, table.state == "revoked")
                )
                row = {
                    "name": found.name,
                    "identity": secrets.token_hex(32),
                    "credential": digest_hex(credential),
                    "models": found.models,
                    "state": state,
                    "created_ms": now,
                    "changed_ms": now,
                }
                await connection.execute(insert(enrolled_connectors).values(**row))
        except IntegrityError:
            raise EnrollmentError(409, "name_taken", "an enrolled connector has this name already") from None
        return Redeemed(found.name, credential, state)

    async def connectors(self) -> list[tuple[EnrolledConnector, str, str | None]]:
        """Every enrolled connector with its credential digest and the previous one."""
        table = enrolled_connectors.c
        async with self.engine.connect() as connection:
            rows = (await connection.execute(select(enrolled_connectors).order_by(table.name))).all()
        return [
            (
                EnrolledConnector(
                    row.name,
                    row.identity,
                    _models_of(row.models),
                    row.state,
                    row.created_ms,
                    row.changed_ms,
                    row.previous is not None,
                ),
                row.credential,
                row.previous,
            )
            for row in rows
        ]

    async def set_state(self, name: str, state: State, *, only_from: Iterable[State]) -> bool:
        """Approve or revoke; False when no connector of that name was in one of ``only_from``."""
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(enrolled_connectors)
                .where(table.name == name, table.state.in_(list(only_from)))
                .values(state=state, changed_ms=_now_ms(), previous=None)
            )
        return bool(result.rowcount == 1)

    async def rotate(self, name: str) -> str:
        """A new credential for ``name``; the old one keeps working until the connector
        presents the new one (its live tunnels stay up meanwhile)."""
        credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            current = (
                await connection.execute(
                    select(table.credential, table.previous).where(table.name == name, table.state != "revoked")
                )
            ).one_or_none()
            if current is None:
                raise EnrollmentError(404, "not_found", f"no live enrolled connector is called {name!r}")
            await connection.execute(
                update(enrolled_connectors)
                .where(table.name == name)
                .values(
                    credential=digest_hex(credential),
                    previous=current.previous or current.credential,
                    changed_ms=_now_ms(),
                )
            )
        return credential

    async def retire_previous(self, name: str) -> None:
        """The connector presented its new credential: the old one stops working."""
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            await connection.execute(update(enrolled_connectors).where(table.name == name).values(previous=None))


@dataclass(frozen=True, slots=True)
class _Entry:
    spec: ConnectorSpec
    state: State
    current: bool  # this digest is the newest credential (not the one before a rotation)


def spec_of(connector: EnrolledConnector) -> ConnectorSpec:
    """The ConnectorSpec the broker routes with; its key is the identity, stable across rotations."""
    models = frozenset(connector.models) if connector.models else None
    return ConnectorSpec(connector.name, bytes.fromhex(connector.identity), None, models, None)


class Enrolled:
    """This broker's copy of the enrolled connectors, keyed by credential digest."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, _Entry] = {}
        self.rows: list[EnrolledConnector] = []

    def replace(self, rows: list[tuple[EnrolledConnector, str, str | None]]) -> set[bytes]:
        """The database's rows; returns the identities no longer approved (their sessions end)."""
        before = {entry.spec.token_digest for entry in self._by_digest.values() if entry.state == "approved"}
        entries: dict[bytes, _Entry] = {}
        for connector, credential, previous in rows:
            spec = spec_of(connector)
            entries[bytes.fromhex(credential)] = _Entry(spec, connector.state, True)
            if previous is not None:
                entries[bytes.fromhex(previous)] = _Entry(spec, connector.state, False)
        self._by_digest = entries
        self.rows = [connector for connector, _, _ in rows]
        after = {entry.spec.token_digest for entry in entries.values() if entry.state == "approved"}
        return before - after

    def lookup(self, authorization: str | None) -> _Entry | None:
        # A dict lookup by digest: the timing tells at most about a SHA-256 digest, never the secret.
        token = bearer(authorization)
        return None if token is None else self._by_digest.get(hashlib.sha256(token.encode()).digest())

    def approved(self, authorization: str | None) -> ConnectorSpec | None:
        entry = self.lookup(authorization)
        return entry.spec if entry is not None and entry.state == "approved" else None

    def pending(self, authorization: str | None) -> bool:
        entry = self.lookup(authorization)
        return entry is not None and entry.state == "pending"

    def by_identity(self, identity: bytes) -> ConnectorSpec | None:
        for entry in self._by_digest.values():
            if entry.spec.token_digest == identity and entry.state == "approved":
                return entry.spec
        return None


class _Configured(Protocol):
    @property
    def connectors(self) -> tuple[ConnectorSpec, ...]: ...
    @property
    def require_approval(self) -> bool: ...


class Enrollment:
    """The store and this broker's copy of it, kept in step; ``revoke`` ends the sessions of
    connectors no longer approved."""

    def __init__(self, database: str, revoke: Callable[[set[bytes]], None]) -> None:
        self.database = database
        self.enrolled = Enrolled()
        self.store: EnrollmentStore | None = None
        self._revoke = revoke
        self._task: asyncio.Task[None] | None = None
        self.redeeming = 0  # redemptions in progress (the endpoint bounds them)

    def start(self) -> None:
        self.store = EnrollmentStore.open(self.database)
        self._task = asyncio.create_task(self._watch())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.store is not None:
            await self.store.aclose()

    async def redeem(self, code: str, settings: "_Configured") -> Redeemed:
        """A code for a credential; this broker knows the new connector at once."""
        assert self.store is not None  # started with the app
        names = {spec.name for spec in settings.connectors}
        self.redeeming += 1
        try:
            redeemed = await self.store.redeem(
                code, require_approval=settings.require_approval, taken=names.__contains__
            )
        finally:
            self.redeeming -= 1
        await self.refresh()
        return redeemed

    async def refresh(self) -> None:
        assert self.store is not None  # started with the app
        gone = self.enrolled.replace(await self.store.connectors())
        if gone:
            self._revoke(gone)

    async def _watch(self) -> None:
        assert self.store is not None
        prepared = failing = False
        while True:
            try:
                if not prepared:
                    await self.store.prepare()
                    prepared = True
                await self.refresh()
                if failing:
                    log.warning("enrollment database reachable again")
                failing = False
            except (SQLAlchemyError, OSError) as exc:
                if not failing:
                    log.warning("enrollment database unreachable, retrying (%s)", type(exc).__name__)
                failing = True
            await asyncio.sleep(REFRESH_INTERVAL)
