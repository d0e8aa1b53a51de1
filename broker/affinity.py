"""Which connector created a stored object (a Responses API response): its by-id routes go there.

One small interface, so that several brokers can later share it (through Redis) without the
relay knowing; this one keeps the map in memory, bounded in size and age.
"""

import re
import time
from collections import OrderedDict
from typing import Protocol

# The first "id" of a Responses body or stream: the top-level id of a JSON response, the
# response's own id inside the first SSE event (response.created).
_FIRST_ID = re.compile(rb'"id"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{1,256})"')
SNIFF_LIMIT = 64 * 1024  # the id comes within the first bytes; nobody scans further
MAX_ENTRIES = 100_000


class Affinity(Protocol):
    def remember(self, object_id: str, connector: str) -> None: ...
    def connector_of(self, object_id: str) -> str | None: ...


class MemoryAffinity:
    """object id → connector name, forgotten after ``ttl`` seconds or when the oldest of
    ``max_entries`` makes room (least recently used first)."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def remember(self, object_id: str, connector: str) -> None:
        self._entries[object_id] = (connector, time.monotonic() + self.ttl)
        self._entries.move_to_end(object_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def connector_of(self, object_id: str) -> str | None:
        entry = self._entries.get(object_id)
        if entry is None:
            return None
        connector, expires = entry
        if expires < time.monotonic():
            del self._entries[object_id]
            return None
        self._entries.move_to_end(object_id)
        return connector


class IdSniffer:
    """Fed a response body as it is relayed; ``found`` is the first id in it (or None)."""

    __slots__ = ("_head", "done", "found")

    def __init__(self) -> None:
        self._head = b""
        self.found: str | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._head += data[: SNIFF_LIMIT - len(self._head)]
        match = _FIRST_ID.search(self._head)
        if match:
            self.found = match.group(1).decode("ascii")
        self.done = match is not None or len(self._head) >= SNIFF_LIMIT
