"""Sessions survive a lost path: the connector reaches the broker through a TCP relay that
resets or black-holes its connections, and resumes the same session.

Streams in flight finish byte for byte, the LLM sees each request once, and a request
sent while the connector is away is delivered when it comes back.
"""

import asyncio
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.faultrelay import FaultRelay
from tests.support import BrokerHandle, Stack, expected_stream, fake_state, wait_until

USER = {"authorization": "Bearer sk-user"}
CONFIG = """
connectors:
  - name: solo
    token: tok-solo
    models: [m]
"""
# A lost poll is noticed after 3 pings of silence: quick pings keep these tests short.
FAST = {"REMOTELLM_PING_INTERVAL": "0.5"}


def body(chunks: int, delay_ms: float = 0, **fake: object) -> dict[str, object]:
    return {"model": "m", "messages": [], "stream": True, "fake": {"chunks": chunks, "delay_ms": delay_ms, **fake}}


class Path:
    """A broker, a fake LLM, and a connector that reaches the broker only through a relay."""

    def __init__(self, stack: Stack) -> None:
        self.broker: BrokerHandle = stack.broker(CONFIG, env=FAST)
        self.relay = FaultRelay("127.0.0.1", int(self.broker.url.rsplit(":", 1)[1]))
        self.llm = stack.llm("m")
        self.connector = stack.connector(self.relay.url, "tok-solo", self.llm, "m")
        self.broker.wait_models("m")

    def stream_with(self, fault: "Fault", chunks: int, delay_ms: float) -> bytes:
        """A streamed request whose path suffers ``fault`` after the first event arrived."""
        url = self.broker.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body(chunks, delay_ms), headers=USER, timeout=30) as resp:
            assert resp.status_code == 200
            received = b""
            events = resp.iter_raw()
            received += next(events)
            fault(self.relay)
            for data in events:
                received += data
        return received


Fault = Callable[[FaultRelay], None]


@pytest.fixture
def path(stack: Stack) -> Iterator[Path]:
    tunnel = Path(stack)
    try:
        yield tunnel
    finally:
        tunnel.relay.close()


def _reset(relay: FaultRelay) -> None:
    relay.cut()


def _black_hole_until_noticed(path: Path) -> Fault:
    """Black-hole the path until the connector has noticed (by its own clock), then restore:
    the verdict counts the event, not seconds."""

    def fault(relay: FaultRelay) -> None:
        relay.blackhole()
        wait_until(lambda: "resuming the session" in path.connector.log(), timeout=30, what="the loss noticed")
        relay.restore()

    return fault


def test_a_stream_survives_its_connections_being_reset_byte_for_byte_and_the_llm_saw_it_once(path: Path) -> None:
    received = path.stream_with(_reset, chunks=150, delay_ms=10)
    assert received == expected_stream(received, 150)
    assert fake_state(path.llm)["requests"] == 1
    wait_until(lambda: "resuming the session" in path.connector.log(), timeout=5, what="a resume")
    assert path.broker.proc.log().count("registered from") == 1  # the same session throughout


def test_a_stream_survives_a_black_hole_of_a_few_seconds(path: Path) -> None:
    received = path.stream_with(_black_hole_until_noticed(path), chunks=300, delay_ms=10)
    assert received == expected_stream(received, 300)
    assert fake_state(path.llm)["requests"] == 1
    assert "resuming the session" in path.connector.log()  # the black hole was noticed
    assert path.broker.proc.log().count("registered from") == 1


def test_a_request_sent_while_the_connector_is_reconnecting_completes(path: Path) -> None:
    path.relay.blackhole()

    async def during() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.create_task(
                client.post(path.broker.url + "/v1/chat/completions", json=body(5), headers=USER)
            )
            await asyncio.sleep(1)  # the request frame goes out on the dead poll
            path.relay.cut()  # the dead connections go; the connector's next ones get through
            path.relay.restore()
            return await pending

    resp = asyncio.run(during())
    assert resp.status_code == 200
    assert b"tok4" in resp.content
    assert fake_state(path.llm)["requests"] == 1
    assert "resuming the session" in path.connector.log()


def test_many_resets_during_many_streams_lose_nothing(path: Path) -> None:
    async def streams() -> list[bytes]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one() -> bytes:
                async with client.stream(
                    "POST", path.broker.url + "/v1/chat/completions", json=body(100, 20), headers=USER
                ) as resp:
                    return await resp.aread()

            tasks = [asyncio.create_task(one()) for _ in range(8)]
            for _ in range(3):
                await asyncio.sleep(0.6)
                path.relay.cut()
            return await asyncio.gather(*tasks)

    for received in asyncio.run(streams()):
        assert received == expected_stream(received, 100)
    assert fake_state(path.llm)["requests"] == 8


def test_past_the_grace_period_a_stream_is_cut(stack: Stack) -> None:
    broker = stack.broker(CONFIG, env={**FAST, "REMOTELLM_RESUME_GRACE": "1"})
    relay = FaultRelay("127.0.0.1", int(broker.url.rsplit(":", 1)[1]))
    try:
        stack.connector(relay.url, "tok-solo", stack.llm("m"), "m")
        broker.wait_models("m")
        url = broker.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body(1000, 20), headers=USER, timeout=30) as resp:
            events = resp.iter_raw()
            next(events)
            relay.blackhole()
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in events:
                    pass
        assert "not resumed in time" in broker.proc.log() or "silent" in broker.proc.log()
    finally:
        relay.close()
