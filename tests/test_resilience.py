"""Things break: connectors die, users leave, brokers restart, load piles up.

Each test starts its own processes, so it can kill them.
"""

import asyncio
import json
import signal
import socket
import time

import httpx
import openai
import pytest

from tests.support import Stack, fake_state, free_port, llm_received, tunnel_polls, wait_until

USER = {"authorization": "Bearer sk-user"}
CONFIG = """
connectors:
  - name: solo
    token: tok-solo
    max_concurrent: 300
  - name: tight
    token: tok-tight
    models: [tight-model]
    max_concurrent: 1
"""


def start(stack: Stack, *models: str, env: dict[str, str] | None = None, port: int | None = None) -> tuple[str, str]:
    """A broker, a fake LLM and one connector serving ``models``; returns (broker URL, LLM URL)."""
    broker = stack.broker(CONFIG, env=env, port=port)
    llm = stack.llm(*models)
    stack.connector(broker.url, "tok-solo", llm, *models)
    broker.wait_models(*models)
    return broker.url, llm


def body(model: str = "m", stream: bool = False, **fake: object) -> dict[str, object]:
    return {"model": model, "messages": [], "stream": stream, "fake": fake}


def test_user_disconnect_cancels_the_llm_call(stack: Stack) -> None:
    url, llm = start(stack, "m")
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body(stream=True, chunks=200, delay_ms=50), headers=USER
    ) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data:")
    wait_until(lambda: fake_state(llm)["cancelled"] == 1, timeout=5, what="the LLM to see the disconnect")
    assert fake_state(llm)["active_streams"] == 0


def test_user_disconnect_before_the_head_cancels_too(stack: Stack) -> None:
    url, llm = start(stack, "m")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body(hang=True), headers=USER, timeout=1)
    wait_until(lambda: fake_state(llm)["cancelled"] == 1, timeout=5, what="the LLM to see the disconnect")


# A connector's death looks like a lost connection: its session waits this long for a resume.
SHORT_GRACE = {"REMOTELLM_RESUME_GRACE": "1"}


def test_connector_killed_mid_stream_ends_the_stream_once_the_resume_grace_is_over(stack: Stack) -> None:
    broker = stack.broker(CONFIG, env=SHORT_GRACE)
    llm = stack.llm("m")
    connector = stack.connector(broker.url, "tok-solo", llm, "m")
    broker.wait_models("m")
    payload = body(stream=True, chunks=1000, delay_ms=20)
    with httpx.stream("POST", broker.url + "/v1/chat/completions", json=payload, headers=USER, timeout=10) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data:")
        connector.kill()
        killed = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in lines:
                pass
    assert time.monotonic() - killed < 3
    wait_until(lambda: broker.health()["connectors"] == 0, timeout=5, what="the broker to drop the connector")


def test_connector_killed_before_the_head_is_502(stack: Stack) -> None:
    broker = stack.broker(CONFIG, env=SHORT_GRACE)
    llm = stack.llm("m")
    connector = stack.connector(broker.url, "tok-solo", llm, "m")
    broker.wait_models("m")

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as client:
            pending = asyncio.create_task(
                client.post(broker.url + "/v1/chat/completions", json=body(hang=True), headers=USER)
            )
            await llm_received(client, llm, 1)  # routed, and held by the LLM: no head yet
            connector.kill()
            return await pending

    resp = asyncio.run(scenario())
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_unavailable"
    # With the connector gone the model is known but unavailable.
    after = httpx.post(broker.url + "/v1/chat/completions", json=body(), headers=USER)
    assert after.status_code == 503
    assert after.json()["error"]["code"] == "model_unavailable"


def test_llm_down_is_502(stack: Stack) -> None:
    broker = stack.broker(CONFIG)
    stack.connector(broker.url, "tok-solo", f"http://127.0.0.1:{free_port()}", "m")
    broker.wait_models("m")
    resp = httpx.post(broker.url + "/v1/chat/completions", json=body(), headers=USER)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_unavailable"


def test_llm_errors_are_relayed_unchanged(stack: Stack) -> None:
    url, _ = start(stack, "m")
    resp = httpx.post(url + "/v1/chat/completions", json=body(status=422), headers=USER)
    assert resp.status_code == 422
    assert resp.headers["x-fake-llm"] == "llm"
    assert "error" in resp.json()


def test_first_byte_timeout_is_504(stack: Stack) -> None:
    url, llm = start(stack, "m", env={"REMOTELLM_FIRST_BYTE_TIMEOUT": "1"})
    started = time.monotonic()
    resp = httpx.post(url + "/v1/chat/completions", json=body(head_delay_ms=5000), headers=USER, timeout=10)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"
    assert 0.9 < time.monotonic() - started < 3
    wait_until(lambda: fake_state(llm)["cancelled"] == 1, timeout=5, what="the cancel to reach the LLM")


def test_idle_timeout_cuts_a_stalled_stream(stack: Stack) -> None:
    url, _ = start(stack, "m", env={"REMOTELLM_IDLE_TIMEOUT": "1"})
    payload = body(stream=True, chunks=3, delay_ms=3000)
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, headers=USER, timeout=10) as resp:
        assert resp.status_code == 200
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            resp.read()
    assert time.monotonic() - started < 2.5


def test_a_user_who_stops_reading_loses_the_stream_after_the_idle_timeout(stack: Stack) -> None:
    broker = stack.broker(CONFIG, env={"REMOTELLM_IDLE_TIMEOUT": "1"})
    llm = stack.llm("m")
    stack.connector(broker.url, "tok-solo", llm, "m")
    broker.wait_models("m")
    host, port = broker.url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body(stream=True, bytes=50_000_000)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nauthorization: Bearer sk-user\r\n"
    head += b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
    with socket.socket() as user:
        user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        user.connect((host, int(port)))
        user.sendall(head + payload)
        assert user.recv(12) == b"HTTP/1.1 200"  # from now on, this user reads nothing
        wait_until(lambda: "result=user_stalled" in broker.proc.log(), timeout=30, what="the stalled user cut off")
    wait_until(lambda: fake_state(llm)["cancelled"] == 1, timeout=10, what="the LLM call to be cancelled")


def test_a_stream_longer_than_the_idle_timeout_is_not_cut_while_chunks_flow(stack: Stack) -> None:
    """The idle timeout counts from the last chunk written: 60 chunks 50 ms apart outlast a
    2 s idle timeout, and arrive whole (each written chunk, however it is written, counts)."""
    broker = stack.broker(CONFIG, env={"REMOTELLM_IDLE_TIMEOUT": "2"})
    llm = stack.llm("m")
    stack.connector(broker.url, "tok-solo", llm, "m")
    broker.wait_models("m")
    url = broker.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body(stream=True, chunks=60, delay_ms=50), headers=USER, timeout=30) as resp:
        data = resp.read()
    assert data.count(b"data: ") == 62 and data.endswith(b"data: [DONE]\n\n")
    assert "result=timeout" not in broker.proc.log()


def test_capacity_exceeded_is_429_with_retry_after(stack: Stack) -> None:
    broker = stack.broker(CONFIG)
    llm = stack.llm("tight-model")
    stack.connector(broker.url, "tok-tight", llm, "tight-model")
    broker.wait_models("tight-model")

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            url = broker.url + "/v1/chat/completions"
            slow = asyncio.create_task(client.post(url, json=body("tight-model", head_delay_ms=3500), headers=USER))
            await llm_received(client, llm, 1)  # the slow one holds the only slot
            quick = await client.post(url, json=body("tight-model"), headers=USER)
            return [await slow, quick]

    slow, rejected = asyncio.run(scenario())
    assert slow.status_code == 200
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "capacity_exceeded"


def test_a_queued_request_gets_the_freed_slot(stack: Stack) -> None:
    broker = stack.broker(CONFIG)
    llm = stack.llm("tight-model")
    stack.connector(broker.url, "tok-tight", llm, "tight-model")
    broker.wait_models("tight-model")

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(timeout=20) as client:
            url = broker.url + "/v1/chat/completions"
            first = asyncio.create_task(client.post(url, json=body("tight-model", head_delay_ms=500), headers=USER))
            await llm_received(client, llm, 1)  # the first holds the only slot: the second queues
            second = await client.post(url, json=body("tight-model"), headers=USER)
            return [(await first).status_code, second.status_code]

    assert asyncio.run(scenario()) == [200, 200]


def test_broker_restart_is_survived_without_help(stack: Stack) -> None:
    port = free_port()
    broker = stack.broker(CONFIG, port=port)
    llm = stack.llm("m")
    connector = stack.connector(broker.url, "tok-solo", llm, "m")
    broker.wait_models("m")
    broker.proc.kill()
    wait_until(lambda: "tunnel down" in connector.log(), timeout=5, what="the connector to notice")
    again = stack.broker(CONFIG, port=port, name="broker-again")
    again.wait_models("m", timeout=20)
    assert httpx.post(again.url + "/v1/chat/completions", json=body(), headers=USER).status_code == 200


def test_connector_started_before_the_broker(stack: Stack) -> None:
    port = free_port()
    llm = stack.llm("m")
    stack.connector(f"http://127.0.0.1:{port}", "tok-solo", llm, "m")
    time.sleep(2)
    broker = stack.broker(CONFIG, port=port)
    broker.wait_models("m", timeout=20)
    assert httpx.post(broker.url + "/v1/chat/completions", json=body(), headers=USER).status_code == 200


async def _streams(url: str, count: int, chunks: int, delay_ms: float) -> list[str]:
    client = openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="sk-user",
        max_retries=0,
        timeout=60,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=count + 10)),
    )

    async def one() -> str:
        stream = await client.chat.completions.create(
            model="m",
            messages=[],
            stream=True,
            extra_body={"fake": {"chunks": chunks, "delay_ms": delay_ms}},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        async with asyncio.timeout(90):
            return await asyncio.gather(*(one() for _ in range(count)))
    finally:
        await client.close()


@pytest.mark.parametrize("count", [64, pytest.param(250, marks=pytest.mark.slow)])
def test_many_concurrent_streams_through_one_connector(stack: Stack, count: int) -> None:
    """250 is past httpx's 100 streams per connection: the connector must spread replies."""
    url, llm = start(stack, "m")
    texts = asyncio.run(_streams(url, count, chunks=20, delay_ms=20))
    expected = " ".join(f"tok{i}" for i in range(20))
    assert [t.strip() for t in texts] == [expected] * count
    assert fake_state(llm)["requests"] >= count


@pytest.mark.slow
def test_3000_sequential_requests_over_one_tunnel(stack: Stack) -> None:
    """Past hypercorn's default of 1000 requests per connection (then GOAWAY): polls are
    recycled every few milliseconds here, so the tunnel makes thousands of requests too.

    The verdict counts events, not time: requests go on until 3000 of them are answered
    and the tunnel has made more than 1000 polls, however long a slow machine takes for
    that (bounded by a request count, never by a clock)."""
    url, _ = start(stack, "m", env={"REMOTELLM_POLL_LIFETIME": "0.005"})

    def polls() -> int:
        return tunnel_polls(httpx.get(url + "/metrics").text, "solo")

    sent = 0
    with httpx.Client(base_url=url, headers=USER, timeout=10) as client:
        while sent < 3000 or polls() <= 1000:
            assert sent < 30_000, f"only {polls()} polls after {sent} requests"
            for _ in range(100):
                assert client.post("/v1/chat/completions", json=body(chunks=1)).status_code == 200
            sent += 100
    broker_log = stack.procs[0].log()
    assert broker_log.count("registered") == 1, "the connector had to reconnect"
    assert "dropped" not in broker_log


def test_sigterm_stops_the_connector_and_broker_stops_routing(stack: Stack) -> None:
    broker = stack.broker(CONFIG)
    llm = stack.llm("m")
    connector = stack.connector(broker.url, "tok-solo", llm, "m")
    broker.wait_models("m")
    assert connector.stop(timeout=5) == 0
    wait_until(lambda: broker.health()["connectors"] == 0, timeout=5, what="the broker to drop it")
    assert httpx.post(broker.url + "/v1/chat/completions", json=body(), headers=USER).status_code == 503
    broker.proc.signal(signal.SIGTERM)
    assert broker.proc.popen.wait(10) == 0


def test_a_cut_http2_stream_is_reset_and_its_connection_lives_on(stack: Stack) -> None:
    """hypercorn forgets an unfinished h2 stream; broker.hypercorn_fixes makes the cut visible at once."""
    url, _ = start(stack, "m", env={"REMOTELLM_IDLE_TIMEOUT": "1"})
    with httpx.Client(http1=False, http2=True, timeout=10, headers=USER) as client:
        payload = body(stream=True, chunks=3, delay_ms=4000)
        with client.stream("POST", url + "/v1/chat/completions", json=payload) as resp:
            started = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError, match="StreamReset"):
                resp.read()
        assert time.monotonic() - started < 2.5
        after = client.post(url + "/v1/chat/completions", json=body())
        assert after.status_code == 200
        assert after.http_version == "HTTP/2"
