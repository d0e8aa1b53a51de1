"""A connector's max_concurrent over all its brokers: the connector's own count, its busy
refusal, its reports of free slots, and the broker routing by them."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from broker.config import ConnectorSpec
from broker.tunnel import Session as BrokerSession
from connector.llm import LLMClient
from connector.path import PathProfile
from connector.session import Session, Status
from connector.settings import Settings
from connector.slots import SlotCounter
from fakellm.server import serve
from tests import fleets
from tests.fleets import free_slots, two_brokers
from tests.support import BrokerHandle, Stack, fake_state, wait_until
from wire import (
    DEFAULT_LIMITS,
    BrokerConnection,
    Capacity,
    ConnectorConnection,
    Drain,
    End,
    Frame,
    Hello,
    Request,
    Slots,
    Welcome,
)

CAP = 2
HANG = json.dumps({"model": "m", "stream": True, "messages": [], "fake": {"hang": True}}).encode()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))  # type: ignore[arg-type]


class Link:
    """One broker (its side of the protocol, in memory) and the connector's session with it."""

    def __init__(self, llm_url: str, slots: SlotCounter) -> None:
        settings = Settings(broker_url="http://127.0.0.1:9", token="t", llm_url=llm_url)
        self.llm = LLMClient(llm_url)
        self.broker = BrokerConnection()
        self.session = Session(settings, self.llm, Status(), PathProfile(settings), {}, Welcome("s", 15.0), slots)
        self.heard: list[Frame] = []

    def to_connector(self) -> None:
        self.session._feed(self.session.conn.inbound(), self.broker.data_to_send())

    def to_broker(self) -> list[Frame]:
        frames = self.broker.inbound().feed(self.session.ready_now())  # (what the uplink writes)
        self.heard += frames
        return frames

    def open(self) -> int:
        request_id = self.broker.open("POST", "/v1/chat/completions", "", [], HANG)
        self.to_connector()
        return request_id

    async def close(self) -> None:
        await self.session.abort()
        await self.llm.aclose()


def last_report(link: Link) -> Slots | None:
    """The free slots this broker heard last (a report may come just before an End)."""
    return next((f for f in reversed(link.heard) if isinstance(f, Slots)), None)


async def settle(links: list[Link], until: Callable[[], bool]) -> None:
    """Let the connector's tasks and reports run, moving frames both ways, until ``until()``."""
    for _ in range(500):
        for link in links:
            link.to_connector()
            link.to_broker()
        if until():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the connector did not get there")


def test_the_connector_refuses_past_its_cap_over_two_brokers_and_gets_every_slot_back() -> None:
    async def scenario() -> None:
        server, llm = await serve(models=["m"])
        slots = SlotCounter()
        a, b = Link(llm.url, slots), Link(llm.url, slots)
        links = [a, b]
        for link in links:
            link.broker.capacity(CAP)
            link.to_connector()
        await settle(links, lambda: all(Slots(CAP) in link.heard for link in links))

        held = [a.open(), b.open()]  # the cap, one from each broker
        await settle(links, lambda: llm.active_streams == CAP)
        refused = [a.open(), b.open()]  # each broker thinks it has room: the connector says no
        await settle(links, lambda: all(any(isinstance(f, End) for f in link.heard) for link in links))
        ends = [f for link in links for f in link.heard if isinstance(f, End)]
        assert sorted(e.id for e in ends) == sorted(refused) and {e.error for e in ends} == {"busy"}
        assert all(Slots(0) in link.heard for link in links)  # each broker heard it is full
        assert llm.peak_streams == CAP

        for link, request_id in zip(links, held, strict=True):
            link.broker.cancel(request_id)
        await settle(links, lambda: slots.taken == 0 and llm.active_streams == 0)
        await settle(links, lambda: all(last_report(link) == Slots(CAP) for link in links))
        assert slots.free == CAP and a.broker.in_flight == b.broker.in_flight == 0

        for link in links:
            await link.close()
        server.close()
        await llm.close()

    run(scenario)


def test_a_request_cancelled_with_its_arrival_ends_and_gives_its_slot_back() -> None:
    """The Cancel in the same read as its Request: the task never ran, and still the End goes out."""

    async def scenario() -> None:
        server, llm = await serve(models=["m"])
        slots = SlotCounter()
        link = Link(llm.url, slots)
        link.broker.capacity(CAP)
        request_id = link.broker.open("POST", "/v1/chat/completions", "", [], HANG)
        link.broker.cancel(request_id)
        link.to_connector()
        await settle([link], lambda: any(isinstance(f, End) for f in link.heard))
        assert End(request_id, "cancelled") in link.heard
        assert slots.taken == 0 and link.broker.in_flight == 0
        await link.close()
        server.close()
        await llm.close()

    run(scenario)


def test_a_burst_through_one_broker_stays_within_the_cap_and_cancels_leak_no_slot(stack: Stack, tmp_path: Path) -> None:
    llm = stack.llm("m")
    broker = stack.broker(fleets.CONFIG)
    stack.connector(broker.url, "tok-box", llm, "m")
    broker.wait_models("m")
    wait_until(lambda: free_slots(broker) == [fleets.CAP], what="the connector's first report")
    headers = {"authorization": "Bearer sk-user"}
    url = broker.url + "/v1/chat/completions"

    async def burst() -> list[httpx.Response]:
        body = {"model": "m", "stream": True, "messages": [], "fake": {"chunks": 5, "delay_ms": 20}}
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(url, json=body, headers=headers) for _ in range(12)))

    answers = asyncio.run(burst())
    for answer in answers:
        assert answer.status_code in (200, 429), answer.text
        if answer.status_code == 429:
            assert answer.json()["error"]["code"] == "capacity_exceeded" and answer.headers["retry-after"]
    assert fake_state(llm)["peak_streams"] <= fleets.CAP

    async def cut() -> None:
        body = {"model": "m", "stream": True, "messages": [], "fake": {"chunks": 1000, "delay_ms": 10}}
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(6):
                async with client.stream("POST", url, json=body, headers=headers) as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_raw():
                        break  # the first bytes, then gone

    asyncio.run(cut())
    wait_until(lambda: free_slots(broker) == [fleets.CAP], what="every slot back")
    assert fake_state(llm)["active_streams"] == 0


# --- two brokers, one connector (its fleet holds a session with each) ----------------------


def all_free(brokers: list[BrokerHandle]) -> bool:
    return all(free_slots(broker) == [fleets.CAP] for broker in brokers)


@pytest.mark.slow  # (heavy: once per tox run keeps CI under 25 minutes)
def test_a_burst_through_two_brokers_never_has_more_than_the_cap_at_the_llm(stack: Stack, tmp_path: Path) -> None:
    brokers = two_brokers(stack, tmp_path)
    llm = stack.llm("m")
    stack.connector(brokers[0].url, "tok-box", llm, "m")  # it learns of broker b from a
    wait_until(lambda: all_free(brokers), what="a session with each broker, every slot free")
    headers = {"authorization": "Bearer sk-user"}

    async def burst() -> list[httpx.Response]:
        body = {"model": "m", "stream": True, "messages": [], "fake": {"chunks": 5, "delay_ms": 40}}
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(brokers[i % 2].url + "/v1/chat/completions", json=body, headers=headers)
                    for i in range(24)
                )
            )

    answers = asyncio.run(burst())
    for answer in answers:
        assert answer.status_code in (200, 429), answer.text
        if answer.status_code == 429:
            assert answer.json()["error"]["code"] == "capacity_exceeded" and answer.headers["retry-after"]
    assert sum(a.status_code == 200 for a in answers) >= fleets.CAP
    assert fake_state(llm)["peak_streams"] <= fleets.CAP  # each broker alone would allow it

    async def cut(url: str) -> None:
        body = {"model": "m", "stream": True, "messages": [], "fake": {"chunks": 1000, "delay_ms": 10}}
        async with httpx.AsyncClient(timeout=30) as client, client.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                break  # the first bytes, then gone

    for i in range(6):
        asyncio.run(cut(brokers[i % 2].url + "/v1/chat/completions"))
    wait_until(lambda: all_free(brokers), what="every slot back, as both brokers hear")
    assert fake_state(llm)["active_streams"] == 0


def test_a_broker_counts_a_connector_full_from_its_reports_and_its_refusals() -> None:
    async def scenario() -> None:  # (a session's exchanges belong to a running loop)
        spec = ConnectorSpec("box", b"\x00" * 32, None, None, CAP)
        session = BrokerSession(spec, Hello("c.1", "1", ["m"]), DEFAULT_LIMITS)
        connector = ConnectorConnection()
        assert connector.inbound().feed(session.conn.data_to_send()) == [Capacity(CAP)]  # first of all
        uplink = session.inbound()
        assert uplink is not None

        def report(free: int) -> list[Drain | Slots]:
            connector.slots(free)
            return session.receive(uplink, connector.data_to_send())

        assert report(0) == [] and session.occupied == CAP  # full with another broker's requests
        assert report(1) == [Slots(1)] and session.occupied == CAP - 1  # room: the queue looks again
        exchange = session.open("POST", "/v1/chat/completions", "", [], b"{}")
        assert session.occupied == CAP  # this broker's request, not yet in any report
        [request] = connector.inbound().feed(session.conn.data_to_send())
        assert isinstance(request, Request)
        assert report(2) == [Slots(2)] and session.occupied == 1  # a report never hides this broker's own request
        connector.end(request.id, "busy", "full")
        session.receive(uplink, connector.data_to_send())
        assert session.occupied == CAP  # refused: full, whatever the reports said, until the next one
        assert exchange.events.get_nowait() == End(request.id, "busy", "full")
        session.renew(replace(spec, max_concurrent=CAP + 1))  # a reload changed the cap
        session.renew(replace(spec, max_concurrent=CAP + 1))  # (and one that did not)
        session.renew(replace(spec, max_concurrent=None))
        assert connector.inbound().feed(session.conn.data_to_send()) == [Capacity(CAP + 1), Capacity(0)]
        assert session.free_slots is None and session.occupied == session.in_flight  # no cap: its own count alone

    run(scenario)


def test_requests_that_end_before_any_report_do_not_count_for_ever() -> None:
    """The connector reports only changes: a request served whole between two writes changes
    nothing it reports, and the broker must not go on counting it."""

    async def scenario() -> None:
        spec = ConnectorSpec("box", b"\x00" * 32, None, None, CAP)
        session = BrokerSession(spec, Hello("c.1", "1", ["m"]), DEFAULT_LIMITS)
        connector = ConnectorConnection()
        connector.inbound().feed(session.conn.data_to_send())
        uplink = session.inbound()
        assert uplink is not None
        connector.slots(CAP)
        session.receive(uplink, connector.data_to_send())
        for _ in range(3 * CAP):
            session.finish(session.open("POST", "/v1/chat/completions", "", [], b"{}"), cancel=False)
        assert session.occupied == 0

    run(scenario)


def test_a_busy_refusal_goes_on_to_another_connector_or_ends_in_a_clean_429(stack: Stack, tmp_path: Path) -> None:
    """Broker b has no cap for box, broker a has 1 (the connector holds the smallest): b learns
    that box is full only from its refusal, and must take the request elsewhere."""
    uncapped = fleets.CONFIG.replace("    max_concurrent: 3\n", "")
    a, b = two_brokers(stack, tmp_path, (fleets.CONFIG.replace("max_concurrent: 3", "max_concurrent: 1"), uncapped))
    box_llm, other_llm = stack.llm("m", "solo", name="llm-box"), stack.llm("m", name="llm-other")
    stack.connector(a.url, "tok-box", box_llm, "m", "solo", name="connector-box")
    stack.connector(a.url, "tok-other", other_llm, "m", name="connector-other")
    wait_until(lambda: all(len(free_slots(broker)) == 2 for broker in (a, b)), what="both connectors on both brokers")
    headers = {"authorization": "Bearer sk-user"}
    hold = {"model": "solo", "stream": True, "messages": [], "fake": {"chunks": 1000, "delay_ms": 50}}
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=hold, headers=headers, timeout=30):
        wait_until(lambda: fake_state(box_llm)["active_streams"] == 1, what="box full")
        for _ in range(4):  # b picks box or other in turn: box refuses, other answers
            answer = httpx.post(b.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers)
            assert answer.status_code == 200, answer.text
        assert "retrying on other" in b.proc.log()
        only_box = httpx.post(b.url + "/v1/chat/completions", json={"model": "solo", "messages": []}, headers=headers)
        assert only_box.status_code == 429 and only_box.headers["retry-after"] == "1"
        assert only_box.json()["error"]["code"] == "capacity_exceeded"
        assert "retrying on box" not in b.proc.log()  # a connector that refused is not asked again
        assert fake_state(box_llm)["peak_streams"] == 1
