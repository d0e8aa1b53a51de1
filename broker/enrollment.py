"""Enrolled connectors: one-time codes, per-connector credentials, approval and revocation.

Codes and credentials are stored as SHA-256 digests only. A code is redeemed by one
conditional UPDATE (``used_ms IS NULL AND expires_ms > now``), so two brokers sharing the
database cannot both redeem it. Each broker keeps the enrolled connectors in memory
(``Enrolled``), read again from the database every ``REFRESH_INTERVAL`` and at once after
its own changes: a revocation on one broker closes the tunnels of every broker sharing it.
"""

import asyncio
import contextlib
import hmac
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
from broker.keys import bearer, digest_of
from wire.endpoints import CREDENTIAL_PREFIX

log = logging.getLogger("remotellm.enrollment")

State = Literal["pending", "approved", "revoked"]
CODE_PREFIX = "rle_"  # an enrollment code: shown once, typed or pasted on the LLM box
DEFAULT_TTL = 3600  # seconds a code stays valid
MAX_TTL = 30 * 86400
REFRESH_INTERVAL = 1.0  # seconds between reads of the enrolled connectors (revocations of other brokers)
START_TIMEOUT = 10.0  # how long a starting broker waits for the enrollment tables
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
    Column("rotating", BigInteger),  # when an admin asked for a new credential; NULL: not asked
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
    rotating: bool  # an admin asked for a new credential; the connector has not made it yet


@dataclass(frozen=True, slots=True)
class Redeemed:
    name: str
    credential: str
    state: State


def digest_hex(secret: str) -> str:
    return digest_of(secret).hex()


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
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            live = select(table.name).where(table.name == name, table.state != "revoked")
            if (await connection.execute(live)).first() is not None:
                raise EnrollmentError(409, "name_taken", f"an enrolled connector is called {name!r} already")
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
                    row.rotating is not None,
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
                .values(state=state, changed_ms=_now_ms(), previous=None, rotating=None)
            )
        return bool(result.rowcount == 1)

    async def request_rotation(self, name: str) -> bool:
        """An admin asks for a new credential; False when no approved connector has that name."""
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(enrolled_connectors)
                .where(table.name == name, table.state == "approved")
                .values(rotating=_now_ms(), changed_ms=_now_ms())
            )
        return bool(result.rowcount == 1)

    async def rotate(self, name: str, presented: str, new: str) -> bool:
        """The connector's new credential (``new``, a digest) replaces the one it presented,
        which keeps working until the new one is used; False unless a rotation was asked."""
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(enrolled_connectors)
                .where(table.name == name, table.credential == presented, table.rotating.is_not(None))
                .values(credential=new, previous=presented, rotating=None, changed_ms=_now_ms())
            )
        return bool(result.rowcount == 1)

    async def retire_previous(self, name: str) -> None:
        """The connector presented its new credential: the old one stops working."""
        table = enrolled_connectors.c
        async with self.engine.begin() as connection:
            await connection.execute(update(enrolled_connectors).where(table.name == name).values(previous=None))


@dataclass(frozen=True, slots=True)
class Entry:
    """What one credential digest stands for."""

    spec: ConnectorSpec
    state: State
    current: bool  # this digest is the newest credential (not the one before a rotation)
    rotating: bool  # an admin asked for a new credential
    superseded: bool  # a rotation left an older credential working, until this one is used


def spec_of(connector: EnrolledConnector) -> ConnectorSpec:
    """The ConnectorSpec the broker routes with; its key is the identity, stable across rotations."""
    models = frozenset(connector.models) if connector.models else None
    return ConnectorSpec(connector.name, bytes.fromhex(connector.identity), None, models, None)


class Enrolled:
    """This broker's copy of the enrolled connectors, keyed by credential digest."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, Entry] = {}
        self.rows: list[EnrolledConnector] = []

    def replace(self, rows: list[tuple[EnrolledConnector, str, str | None]]) -> set[bytes]:
        """The database's rows; returns the identities no longer approved (their sessions end)."""
        before = {entry.spec.token_digest for entry in self._by_digest.values() if entry.state == "approved"}
        entries: dict[bytes, Entry] = {}
        for connector, credential, previous in rows:
            spec = spec_of(connector)
            rotating, superseded = connector.rotating, previous is not None
            entries[bytes.fromhex(credential)] = Entry(spec, connector.state, True, rotating, superseded)
            if previous is not None:
                entries[bytes.fromhex(previous)] = Entry(spec, connector.state, False, rotating, superseded)
        self._by_digest = entries
        self.rows = [connector for connector, _, _ in rows]
        after = {entry.spec.token_digest for entry in entries.values() if entry.state == "approved"}
        return before - after

    def lookup(self, authorization: str | None) -> Entry | None:
        # A dict lookup by digest: the timing tells at most about a SHA-256 digest, never the secret.
        token = bearer(authorization)
        return None if token is None else self._by_digest.get(digest_of(token))

    def pending(self, authorization: str | None) -> bool:
        entry = self.lookup(authorization)
        return entry is not None and entry.state == "pending"

    def by_identity(self, identity: bytes) -> ConnectorSpec | None:
        for entry in self._by_digest.values():
            if entry.spec.token_digest == identity and entry.state == "approved":
                return entry.spec
        return None

    def rotating(self, identity: bytes) -> bool:
        """Whether an admin asked the connector with this identity for a new credential."""
        return any(entry.rotating for entry in self._by_digest.values() if entry.spec.token_digest == identity)


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
        self._retiring: set[str] = set()  # names whose old credential is being retired
        self._ready = asyncio.Event()  # the tables exist and this broker has read them once

    def start(self) -> None:
        self.store = EnrollmentStore.open(self.database)
        self._task = asyncio.create_task(self._watch())

    async def started(self) -> None:
        """Until the tables exist and were read once, so that no request meets a database
        without them; bounded, as an unreachable database must not keep the rest from serving."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_TIMEOUT):
                await self._ready.wait()

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

    async def rotate(self, authorization: str | None, new: str) -> str:
        """The connector behind ``authorization`` replaces its credential with ``new`` (asked
        for by an admin), then confirms by presenting ``new`` itself, which retires the old
        one; returns its name. Its live sessions go on throughout."""
        assert self.store is not None
        token = bearer(authorization)
        if token is not None and hmac.compare_digest(token.encode(), new.encode()):
            spec = self.approved(authorization)  # (its first use retires the old credential)
            if spec is None:
                raise EnrollmentError(401, "invalid_token", "Unknown connector credential.")
            return spec.name
        entry = self.enrolled.lookup(authorization)
        if token is None or entry is None or entry.state != "approved" or not entry.current:
            raise EnrollmentError(401, "invalid_token", "Unknown connector credential.")
        if not await self.store.rotate(entry.spec.name, digest_hex(token), digest_hex(new)):
            raise EnrollmentError(409, "not_rotating", "No new credential was asked for.")
        await self.refresh()
        return entry.spec.name

    def approved(self, authorization: str | None) -> ConnectorSpec | None:
        """The spec of the approved connector presenting this credential, else None. The first
        use of a rotated credential retires the one before it."""
        entry = self.enrolled.lookup(authorization)
        if entry is None or entry.state != "approved":
            return None
        if entry.current and entry.superseded and entry.spec.name not in self._retiring:
            self._retiring.add(entry.spec.name)
            task = asyncio.ensure_future(self._retire(entry.spec.name))
            task.add_done_callback(lambda _: self._retiring.discard(entry.spec.name))
        return entry.spec

    async def _retire(self, name: str) -> None:
        assert self.store is not None
        try:
            await self.store.retire_previous(name)
            await self.refresh()
        except (SQLAlchemyError, OSError) as exc:  # tried again at the next use
            log.warning("enrollment: the old credential of %s is not retired yet (%s)", name, type(exc).__name__)
        else:
            log.info("connector %s uses its new credential; the old one no longer works", name)

    async def refresh(self) -> set[bytes]:
        """This broker's copy read anew; the identities that are no longer valid (their
        sessions ended)."""
        assert self.store is not None  # started with the app
        gone = self.enrolled.replace(await self.store.connectors())
        if gone:
            self._revoke(gone)
        return gone

    async def _watch(self) -> None:
        assert self.store is not None
        prepared = failing = False
        while True:
            try:
                if not prepared:
                    await self.store.prepare()
                    prepared = True
                await self.refresh()
                self._ready.set()
                if failing:
                    log.warning("enrollment database reachable again")
                failing = False
            except (SQLAlchemyError, OSError) as exc:
                if not failing:
                    log.warning("enrollment database unreachable, retrying (%s)", type(exc).__name__)
                failing = True
            await asyncio.sleep(REFRESH_INTERVAL)
