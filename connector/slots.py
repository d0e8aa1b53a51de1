"""The connector's request slots over all its brokers: one count against one max_concurrent.

Each broker sees only its own share of a connector's work, so only the connector can hold
``max_concurrent`` over several brokers. Each broker states its cap (wire.Capacity); the
smallest one holds, over the requests of every session together. Sans-IO: sessions take
and give back slots, and each hears through its callback when the number free changed.
"""

from collections.abc import Callable, Hashable


class SlotCounter:
    """Requests running now, against the smallest cap a broker gave (none given: no cap)."""

    def __init__(self) -> None:
        self.taken = 0
        self._caps: dict[Hashable, int] = {}  # session -> the cap its broker gave
        self._watchers: dict[Hashable, Callable[[], None]] = {}  # session -> told of every change

    @property
    def limit(self) -> int | None:
        return min(self._caps.values()) if self._caps else None

    @property
    def free(self) -> int | None:
        """Slots free now (None: no cap); 0 while over a cap lowered under the running requests."""
        limit = self.limit
        return None if limit is None else max(0, limit - self.taken)

    def capped_by(self, holder: Hashable) -> bool:
        """Whether this session's broker gave a cap (it wants to hear the free slots)."""
        return holder in self._caps

    def watch(self, holder: Hashable, changed: Callable[[], None]) -> None:
        self._watchers[holder] = changed

    def cap(self, holder: Hashable, max_concurrent: int) -> None:
        """The session's broker gives this cap (0: none)."""
        if max_concurrent:
            self._caps[holder] = max_concurrent
        else:
            self._caps.pop(holder, None)
        self._changed()

    def forget(self, holder: Hashable) -> None:
        """The session ended: its cap no longer counts (its requests give their slots back)."""
        self._watchers.pop(holder, None)
        if self._caps.pop(holder, None) is not None:
            self._changed()

    def take(self) -> bool:
        """A slot for a new request; False when the connector is full."""
        limit = self.limit
        if limit is not None and self.taken >= limit:
            return False
        self.taken += 1
        if limit is not None:
            self._changed()
        return True

    def give_back(self) -> None:
        self.taken -= 1
        if self._caps:
            self._changed()

    def _changed(self) -> None:
        for changed in list(self._watchers.values()):
            changed()
