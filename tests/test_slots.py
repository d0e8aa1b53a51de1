"""connector.slots: one count of requests against the smallest cap any broker gave."""

from connector.slots import SlotCounter


class Session:
    """A session as the counter sees it: a holder told of every change."""

    def __init__(self, slots: SlotCounter) -> None:
        self.told = 0
        slots.watch(self, self.changed)

    def changed(self) -> None:
        self.told += 1


def test_without_a_cap_every_request_gets_a_slot_and_nobody_is_told() -> None:
    slots = SlotCounter()
    session = Session(slots)
    assert all(slots.take() for _ in range(100))
    assert slots.free is None and slots.limit is None
    for _ in range(100):
        slots.give_back()
    assert slots.taken == 0 and session.told == 0


def test_the_cap_holds_over_every_session_together() -> None:
    slots = SlotCounter()
    a, b = Session(slots), Session(slots)
    slots.cap(a, 3)
    slots.cap(b, 3)
    assert [slots.take() for _ in range(4)] == [True, True, True, False]  # whichever session asks
    assert slots.free == 0
    slots.give_back()
    assert slots.free == 1 and slots.take()
    assert a.told == b.told > 0


def test_the_smallest_cap_holds_and_goes_with_its_session() -> None:
    slots = SlotCounter()
    a, b = Session(slots), Session(slots)
    slots.cap(a, 4)
    slots.cap(b, 2)
    assert slots.limit == 2
    told = a.told
    slots.forget(b)
    assert slots.limit == 4 and a.told == told + 1
    assert not slots.capped_by(b) and slots.capped_by(a)
    slots.cap(a, 0)  # a reload took the cap away
    assert slots.limit is None


def test_a_cap_lowered_under_the_running_requests_refuses_until_they_end() -> None:
    slots = SlotCounter()
    a = Session(slots)
    slots.cap(a, 4)
    assert all(slots.take() for _ in range(4))
    slots.cap(a, 2)
    assert slots.free == 0 and not slots.take()
    slots.give_back()
    slots.give_back()
    assert slots.free == 0 and not slots.take()
    slots.give_back()
    assert slots.free == 1 and slots.take()


def test_a_forgotten_session_is_told_nothing_more() -> None:
    slots = SlotCounter()
    a, b = Session(slots), Session(slots)
    slots.cap(a, 2)
    slots.forget(b)
    told = b.told
    slots.take()
    slots.give_back()
    assert b.told == told
