"""Slows down token guessing: failed tunnel logins from one address cost more and more time."""

import time

FREE_FAILURES = 5  # failures in the window before any delay
WINDOW = 300.0
MAX_DELAY = 10.0
MAX_ADDRESSES = 10_000  # bounded memory whatever the traffic


class AuthThrottle:
    def __init__(self) -> None:
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str) -> float:
        """Record a failure; the delay to impose before answering it."""
        now = time.monotonic()
        count, since = self._failures.get(address, (0, now))
        if now - since > WINDOW:
            count, since = 0, now
        count += 1
        if address not in self._failures and len(self._failures) >= MAX_ADDRESSES:
            self._forget_stale(now)
        self._failures[address] = (count, since)
        if count <= FREE_FAILURES:
            return 0.0
        return float(min(MAX_DELAY, 2 ** (count - FREE_FAILURES - 1) * 0.25))

    def _forget_stale(self, now: float) -> None:
        stale = [a for a, (_, since) in self._failures.items() if now - since > WINDOW]
        for address in stale or list(self._failures)[: MAX_ADDRESSES // 10]:
            del self._failures[address]
