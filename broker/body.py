"""A user's request body: bounded in size, in time, and in memory across all users at once."""

import asyncio
from collections.abc import Callable

from broker.asgi import ClientGone, Receive


class BodyRefused(Exception):
    """The body cannot be taken; the status, code and message say why, for the user."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, "request_too_large", f"Request body over {limit} bytes.")


def too_slow(timeout: float) -> BodyRefused:
    return BodyRefused(408, "request_timeout", f"The request body did not arrive within {timeout:g} s.")


def too_many() -> BodyRefused:
    return BodyRefused(503, "server_busy", "The broker holds too many request bodies; retry shortly.")


class BodyBudget:
    """Bytes of request bodies held at once by every request together.

    Each body is small next to the limit, but many slow or large uploads at once would
    otherwise add up to an out-of-memory kill; past the limit new bodies get 503.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class HeldBody:
    """A body read whole, holding its share of the budget until ``release`` (idempotent)."""

    __slots__ = ("_budget", "data", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.size = 0
        self.data = b""

    def add(self, chunk: bytes) -> bool:
        """Hold one more chunk; False (nothing held) once every body together would be too much."""
        return self.reserve(len(chunk))

    def reserve(self, size: int) -> bool:
        """Hold ``size`` bytes more of the budget (a chunk, or the window of a streamed body)."""
        if not self._budget.take(size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        self._budget.give_back(self.size)
        self.size = 0


async def read_held(
    receive: Receive,
    held: HeldBody,
    *,
    limit: int,
    timeout: float,
    until: Callable[[bytearray], bool] | None = None,
) -> bool:
    """Read the body into ``held``: whole, or only until ``until(what was read)`` says
    enough. True if more of the body follows; BodyRefused (413, 503, 408) or ClientGone."""
    data = bytearray()  # (one buffer: a body sent a byte at a time is no list of a million)
    more = True
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if held.size + len(chunk) > limit:
                    raise too_large(limit)
                if not held.add(chunk):
                    raise too_many()
                data += chunk
                more = bool(message.get("more_body", False))
                if not more or (until is not None and until(data)):
                    break
    except TimeoutError:
        raise too_slow(timeout) from None
    if until is not None and not more:
        until(data)  # the last piece too, however it came
    held.data = bytes(data)
    return more
