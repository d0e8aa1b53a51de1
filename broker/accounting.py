"""Limits at admission and usage at the end of every request: the relay's one door to both.

The limiter (in memory, or Redis for several brokers) and the usage store (SQLite or
PostgreSQL) live here, started with the app and closed with it.
"""

from dataclasses import dataclass

import msgspec

from broker.limits import Lease, Limiter, MemoryLimiter, Rejection, count_rejection, reservation
from broker.limits_redis import RedisLimiter, redis_client
from broker.metrics import Metrics
from broker.settings import Settings
from broker.usage import TokenSource, UsageRecord, UsageStore, count_tokens
from broker.users import User

STORE_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Tokens:
    """A request's tokens, and where the count comes from."""

    prompt: int = 0
    completion: int = 0
    source: TokenSource = "unknown"

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class Accounting:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.limiter: Limiter | None = None
        self.store: UsageStore | None = None

    def start(self) -> None:
        """In the running loop: the limiter's Redis client and the store's flusher need it."""
        settings = self._settings
        if settings.redis_url:
            self.limiter = RedisLimiter(redis_client(settings.redis_url), on_unreachable=settings.redis_unreachable)
        else:
            self.limiter = MemoryLimiter()
        self.store = UsageStore.open(settings.database, retention_days=settings.usage_retention_days)

    async def aclose(self) -> None:
        if self.limiter is not None:
            await self.limiter.aclose()
        if self.store is not None:
            await self.store.aclose(STORE_CLOSE_TIMEOUT)

    async def admit(self, user: User, reserve: int) -> Lease | Rejection | None:
        """A lease for a limited user's request reserving ``reserve`` tokens (or why not);
        None before the limiter is started."""
        if self.limiter is None:
            return None
        verdict = await self.limiter.admit(user.name or "", user.limits, reserve)
        if isinstance(verdict, Rejection):
            count_rejection(self._metrics, user.name or "", verdict)
        return verdict

    def record(
        self, *, user: User | None, model: str, connector: str | None, status: int, tokens: Tokens,
        started: float, ttfb: float, duration: float,
    ) -> None:  # fmt: skip
        if self.store is None:
            return
        record = UsageRecord(
            at=started,
            user=user.name if user is not None else None,
            model=model,
            connector=connector,
            status=status,
            prompt_tokens=tokens.prompt,
            completion_tokens=tokens.completion,
            token_source=tokens.source,
            ttfb_ms=round(ttfb * 1000) if ttfb else None,
            duration_ms=round(duration * 1000),
        )
        self.store.record(record)
        count_tokens(self._metrics, record)


def reservation_of(body: bytes) -> int:
    """Tokens to reserve for a request body: its prompt estimate plus its max_tokens."""
    try:
        parsed: object = msgspec.json.decode(body)
    except msgspec.MsgspecError:
        parsed = None
    return reservation(parsed)
