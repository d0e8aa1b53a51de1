"""Admission: a connector with a free slot for a request, after a short wait when all are busy."""

import asyncio
import contextlib
import time
from collections.abc import Callable

from broker.router import AtCapacity, ModelRouter, RouteError
from broker.tunnel import Session

Accepts = Callable[[Session], bool]


class Admission:
    """The short queue in front of the router: a request waits up to ``queue_timeout`` for a
    slot, then gets 429."""

    def __init__(self, router: ModelRouter[Session], queue_timeout: float) -> None:
        self._router = router
        self.queue_timeout = queue_timeout
        self.queued = 0
        self._slot_freed = asyncio.Event()

    async def route(self, model: str, accepts: Accepts | None = None) -> Session:
        """A connector for the model, waiting briefly for a free slot; raises RouteError."""
        try:
            return self._router.get_route(model, accepts=accepts)
        except AtCapacity:
            pass
        deadline = time.monotonic() + self.queue_timeout
        self.queued += 1
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), deadline - time.monotonic())
                try:
                    return self._router.get_route(model, accepts=accepts)
                except AtCapacity:
                    if time.monotonic() >= deadline:
                        raise
        finally:
            self.queued -= 1

    def alternate(self, model: str, failed: Session, accepts: Accepts) -> Session | None:
        """Another live connector with a free slot for a request that lost its own."""
        try:
            return self._router.get_route(model, exclude=failed, accepts=accepts)
        except RouteError:
            return None

    def freed(self) -> None:
        """A slot came free: every waiting request looks again."""
        event, self._slot_freed = self._slot_freed, asyncio.Event()
        event.set()
