"""New requests start a few per turn of the event loop, so a burst does not hold back the replies.

asyncio runs what is ready first in, first out. When a poll brings 256 requests at once,
256 tasks start in one turn of the loop, each spending a fifth of a millisecond before it
waits for the LLM; the first LLM answers, which arrived meanwhile, are read only after the
last request went out, and every reply of the burst waits for all of the burst's starts.
Started a few per turn, the first answers are read, framed and uploaded between the starts
of the later requests: the burst moves through the connector like a pipeline, and its
first chunks reach users sooner (scenario 3 of ``python -m bench``), for the same work.
"""

import asyncio
from collections import deque

# Requests that start in one turn of the loop: a millisecond or two of work, about the
# uplink's coalescing window. Measured with scenario 3 (first chunk p50, three bench runs
# each): 4 per turn 102 ms, 8 90 ms, 16 91 ms, 32 105 ms; unpaced, 116-142 ms.
STARTS_PER_TURN = 8


class StartPacer:
    """Lets at most ``per_turn`` callers of ``turn()`` through per turn of the event loop;
    the others wait, first come first served. A caller cancelled while waiting leaves."""

    def __init__(self, per_turn: int = STARTS_PER_TURN) -> None:
        self._per_turn = per_turn
        self._passed = 0  # callers let through since the last tick
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._tick_scheduled = False

    async def turn(self) -> None:
        """Return once the caller may start (at once when the turn has room)."""
        if self._passed < self._per_turn and not self._waiting:
            self._passed += 1
            self._schedule_tick()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._schedule_tick()
        await waiter

    def _schedule_tick(self) -> None:
        if not self._tick_scheduled:
            self._tick_scheduled = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        """A new turn: the next callers in line go (they run in the turn after this one)."""
        self._tick_scheduled = False
        self._passed = 0
        waiting = self._waiting
        while waiting and self._passed < self._per_turn:
            waiter = waiting.popleft()
            if not waiter.done():  # (done: cancelled while it waited)
                waiter.set_result(None)
                self._passed += 1
        if self._passed:  # the turn they run in counts them; the next tick starts afresh
            self._schedule_tick()
