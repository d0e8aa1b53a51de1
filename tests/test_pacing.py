"""connector.pacing: a burst of starts spreads over loop turns, in order, none lost."""

import asyncio
from collections import Counter

import pytest

from connector.pacing import StartPacer


class Turns:
    """Counts turns of the running event loop (a callback that schedules itself runs once per turn)."""

    def __init__(self) -> None:
        self.now = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def _burst(pacer: StartPacer, count: int, cancel: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """``count`` tasks ask for their turn at once; returns (task, turn it passed) in passing order."""
    turns, passed = Turns(), []

    async def start(index: int) -> None:
        await pacer.turn()
        passed.append((index, turns.now))

    tasks = [asyncio.create_task(start(index)) for index in range(count)]
    await asyncio.sleep(0)  # every task asks once
    for index in cancel:
        tasks[index].cancel()
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks, return_exceptions=True)
    turns.stop()
    return passed


def test_a_burst_passes_a_few_per_turn_in_order() -> None:
    passed = asyncio.run(_burst(StartPacer(per_turn=4), 30))
    assert [index for index, _ in passed] == list(range(30))  # first come, first served; none lost
    per_turn = Counter(turn for _, turn in passed)
    assert max(per_turn.values()) == 4
    assert len(per_turn) == 8  # 30 starts: eight turns, not one


def test_callers_cancelled_while_waiting_leave_without_taking_a_place() -> None:
    passed = asyncio.run(_burst(StartPacer(per_turn=2), 10, cancel=frozenset({3, 4, 9})))
    assert [index for index, _ in passed] == [0, 1, 2, 5, 6, 7, 8]
    per_turn = Counter(turn for _, turn in passed)
    assert max(per_turn.values()) == 2
    assert len(per_turn) == 4  # seven starts, two a turn: the cancelled took no place


@pytest.mark.parametrize("per_turn", [1, 4])
def test_a_lone_caller_passes_without_waiting_a_turn(per_turn: int) -> None:
    async def main() -> tuple[int, int]:
        pacer, turns = StartPacer(per_turn), Turns()
        await asyncio.sleep(0)
        before = turns.now
        await pacer.turn()
        after = turns.now
        await asyncio.sleep(0)  # the next turn: a fresh allowance
        await pacer.turn()
        turns.stop()
        return before, after

    before, after = asyncio.run(main())
    assert before == after  # no suspension: a single request is not slowed at all


def test_a_burst_after_a_quiet_spell_gets_a_full_turn_again() -> None:
    async def main() -> list[int]:
        pacer = StartPacer(per_turn=3)
        first = await _burst(pacer, 7)
        second = await _burst(pacer, 7)
        return [len(first), len(second), max(Counter(t for _, t in second).values())]

    assert asyncio.run(main()) == [7, 7, 3]
