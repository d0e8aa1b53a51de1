"""broker.tunnel.Events in process: a reply's events in order, chunks to the relay's sink while it waits."""

import asyncio

from broker.tunnel import Events
from wire import Chunk, End


def test_chunks_that_come_while_the_relay_waits_go_to_the_sink_and_wake_nobody() -> None:
    async def main() -> None:
        events, taken = Events(), []
        events.deliver_to(lambda chunk: taken.append(chunk.data) is None)
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)  # the relay waits
        events.put_nowait(Chunk(1, b"a"))
        events.put_nowait(Chunk(1, b"b"))
        await asyncio.sleep(0)
        assert taken == [b"a", b"b"] and not relay.done()
        events.put_nowait(End(1))  # not a chunk: the relay's own
        assert await asyncio.wait_for(relay, 5) == End(1)

    asyncio.run(main())


def test_a_chunk_the_sink_declines_wakes_the_relay_and_what_follows_queues_behind_it() -> None:
    async def main() -> None:
        events, taken = Events(), []
        events.deliver_to(lambda chunk: chunk.data != b"slow" and taken.append(chunk.data) is None)
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        events.put_nowait(Chunk(1, b"slow"))  # (the user's connection is full, say)
        events.put_nowait(Chunk(1, b"next"))  # the relay is awake, not waiting: in order, behind it
        assert await asyncio.wait_for(relay, 5) == Chunk(1, b"slow")
        assert events.get_nowait() == Chunk(1, b"next") and events.empty() and taken == []

    asyncio.run(main())


def test_while_the_relay_is_busy_every_event_is_queued_in_order_sink_or_not() -> None:
    async def main() -> None:
        events = Events()
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        for data in (b"a", b"b"):
            events.put_nowait(Chunk(1, data))
        assert await asyncio.wait_for(relay, 5) == Chunk(1, b"a")
        events.deliver_to(lambda chunk: True)  # the relay is busy: nothing may overtake b"b"
        events.put_nowait(Chunk(1, b"c"))
        assert [events.get_nowait(), events.get_nowait()] == [Chunk(1, b"b"), Chunk(1, b"c")]

    asyncio.run(main())


def test_a_sink_that_fails_leaves_the_chunk_to_the_relay() -> None:
    """The sink runs in the uplink's dispatch: a bug in it must not lose the chunk, nor
    reach the other frames of the same read."""

    def broken(chunk: Chunk) -> bool:
        raise ValueError("a bug")

    async def main() -> None:
        events = Events()
        events.deliver_to(broken)
        relay = asyncio.ensure_future(events.get())
        await asyncio.sleep(0)
        events.put_nowait(Chunk(1, b"a"))
        assert await asyncio.wait_for(relay, 5) == Chunk(1, b"a")

    asyncio.run(main())
