"""A connector token in hostile hands: every flood it can send stays bounded in the broker.

Each test drives the tunnel by hand (register, poll, reply) against a real
``python -m broker`` and reads the broker's RSS from /proc.
"""

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import BrokerHandle, Stack, wait_until
from wire import (
    FRAMES_CONTENT_TYPE,
    PARTIAL_HEADER,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    Chunk,
    FrameDecoder,
    Head,
    Hello,
    Ping,
    Pong,
    Request,
    Welcome,
    encode,
)

TOKENS = ("tok-sessions", "tok-names", "tok-pong", "tok-replies", "tok-closed", "tok-listing")
CONFIG = "connectors:\n" + "".join(f"  - name: {t.removeprefix('tok-')}\n    token: {t}\n" for t in TOKENS)
MIB = 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Tunnel:
    """A hand-driven connector session."""

    def __init__(self, broker: BrokerHandle, token: str, models: list[str] | None = None) -> None:
        self.broker = broker
        self.token = token
        self.connector_id = f"{token}-main"  # a new Tunnel of the same token replaces the old session
        # One connection for the poll, one for replies: httpcore lets one reader at a time
        # wait on a connection, so a reply waiting for flow control would wait for the poll.
        self.client = httpx.Client(http1=False, http2=True, timeout=httpx.Timeout(20, read=None))
        self.reply_client = httpx.Client(http1=False, http2=True, timeout=httpx.Timeout(20, read=None))
        self.session = ""
        self.frames: list[object] = []
        resp = self.register(["m"] if models is None else models)
        assert resp.status_code == 200, resp.text

    def register(self, models: list[str], connector_id: str | None = None) -> httpx.Response:
        hello = Hello(connector_id or self.connector_id, "flood", models)
        resp = httpx.post(
            self.broker.url + REGISTER_PATH, content=encode(hello), headers={"authorization": f"Bearer {self.token}"}
        )
        if resp.status_code == 200:
            welcome = FrameDecoder().feed(resp.content)[0]
            assert isinstance(welcome, Welcome)
            self.session = welcome.session
        return resp

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}", SESSION_HEADER: self.session}

    def poll_in_background(self) -> None:
        def poll() -> None:
            with (
                contextlib.suppress(httpx.HTTPError),
                self.client.stream("GET", self.broker.url + POLL_PATH, headers=self.headers) as resp,
            ):
                decoder = FrameDecoder()
                for data in resp.iter_raw():
                    self.frames.extend(decoder.feed(data))

        threading.Thread(target=poll, daemon=True).start()
        wait_until(lambda: self.frames, what="the poll's first frame")

    def reply(self, body: bytes | Iterator[bytes], client: httpx.Client | None = None) -> httpx.Response:
        headers = {**self.headers, PARTIAL_HEADER: "1", "content-type": FRAMES_CONTENT_TYPE}
        return (client or self.reply_client).post(self.broker.url + REPLY_PATH, content=body, headers=headers)

    def close(self) -> None:
        self.client.close()
        self.reply_client.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    stack = Stack(tmp_path_factory.mktemp("floods"))
    env = {"REMOTELLM_MAX_SESSIONS_PER_TOKEN": "4", "REMOTELLM_MAX_REPLIES_PER_SESSION": "3",
           "REMOTELLM_PING_INTERVAL": "30"}  # fmt: skip
    try:
        yield stack.broker(CONFIG, env=env, via="module")
    except BaseException:
        print(stack.logs()[-20000:])
        raise
    finally:
        stack.close()


def test_sessions_per_token_are_bounded(broker: BrokerHandle) -> None:
    tunnels = [Tunnel(broker, "tok-sessions") for _ in range(4)]
    for index, tunnel in enumerate(tunnels[1:]):  # four instances of one connector
        tunnel.connector_id = f"instance-{index}"
        assert tunnel.register(["m"]).status_code == 200
    try:
        extra = tunnels[0].register(["m"], connector_id=uuid.uuid4().hex)
        assert extra.status_code == 429 and extra.json()["error"]["code"] == "too_many_sessions"
        assert tunnels[0].register(["m"]).status_code == 200  # re-registering replaces its own session
    finally:
        for tunnel in tunnels:
            tunnel.close()


@pytest.mark.parametrize(
    "models",
    [["x" * 257], ["has space"], ["tab\tname"], ["é"], [""], [f"m{i}" for i in range(1025)]],
    ids=["too-long", "space", "tab", "non-ascii", "empty", "too-many"],
)
def test_model_names_are_bounded_in_length_characters_and_count(broker: BrokerHandle, models: list[str]) -> None:
    tunnel = Tunnel(broker, "tok-names")
    try:
        resp = tunnel.register(models, connector_id=uuid.uuid4().hex)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_models"
        assert tunnel.register(["hf.co/org/Llama-3.2-1B:Q4_K_M", "x" * 256]).status_code == 200
    finally:
        tunnel.close()


def test_a_pong_flood_queues_one_echo_not_one_per_pong(broker: BrokerHandle) -> None:
    tunnel = Tunnel(broker, "tok-pong")
    try:
        tunnel.poll_in_background()
        before = rss_kib(broker.proc.pid)
        flood = encode(Pong(1.0)) * 300_000
        assert tunnel.reply(flood).status_code == 204
        assert tunnel.reply(encode(Pong(2.0))).status_code == 204
        wait_until(lambda: any(isinstance(f, Ping) and f.pong == 2.0 for f in tunnel.frames), what="the last echo")
        pings = sum(isinstance(f, Ping) for f in tunnel.frames)
        grown = (rss_kib(broker.proc.pid) - before) / MIB
    finally:
        tunnel.close()
    assert pings < 100, f"{pings} pings queued for 300,000 pongs"
    assert grown < 16, f"the broker grew by {grown:.1f} MiB"


def test_reply_streams_per_session_are_bounded(broker: BrokerHandle) -> None:
    tunnel = Tunnel(broker, "tok-replies")
    release = threading.Event()
    results: list[int] = []

    def held_body() -> Iterator[bytes]:
        yield encode(Pong(1.0))
        release.wait(20)

    def open_one() -> None:
        with httpx.Client(http1=False, http2=True, timeout=30) as client:
            results.append(tunnel.reply(held_body(), client).status_code)

    threads = [threading.Thread(target=open_one, daemon=True) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        # Once the three are open at the broker, a fourth is refused.
        extra = wait_until(
            lambda: (resp := tunnel.reply(encode(Pong(1.0)))).status_code == 429 and resp, what="a refused fourth"
        )
        assert extra.json()["error"]["code"] == "too_many_replies"
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
        tunnel.close()
    assert results == [204, 204, 204]


def test_a_reply_to_a_closed_session_counts_for_nothing(broker: BrokerHandle) -> None:
    tunnel = Tunnel(broker, "tok-closed")
    replaced = threading.Event()
    sent_after = 0

    def body() -> Iterator[bytes]:
        nonlocal sent_after
        yield encode(Pong(1.0))
        replaced.wait(20)
        for _ in range(50):
            sent_after += 1
            yield encode(Pong(1.0))
            time.sleep(0.01)

    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(tunnel.reply(body())), daemon=True)
    try:
        thread.start()
        wait_until(lambda: "registered" in broker.proc.log(), what="the registration")
        assert tunnel.register(["m"]).status_code == 200  # same connector id: the old session is dropped
        replaced.set()
        thread.join(30)
    finally:
        tunnel.close()
    assert result and result[0].status_code == 401, result
    assert result[0].json()["error"]["code"] == "unknown_session"
    assert sent_after == 50


def test_an_endless_model_listing_is_cut_and_serves_nothing(broker: BrokerHandle) -> None:
    tunnel = Tunnel(broker, "tok-listing", models=[])  # discovery: the broker lists the LLM's models
    try:
        tunnel.poll_in_background()
        request = wait_until(
            lambda: next((f for f in tunnel.frames if isinstance(f, Request)), None), what="the listing request"
        )
        before = rss_kib(broker.proc.pid)
        chunk = encode(Chunk(request.id, b'{"id": "' + b"x" * 65000 + b'"},'))

        def endless() -> Iterator[bytes]:
            yield encode(Head(request.id, 200, [("content-type", "application/json")]))
            yield encode(Chunk(request.id, b'{"data": ['))
            for _ in range(512):  # 32 MiB of listing, far past any real one (the bound is 4 MiB)
                yield chunk

        with contextlib.suppress(httpx.HTTPError):
            tunnel.reply(endless())
        grown = (rss_kib(broker.proc.pid) - before) / MIB
        wait_until(lambda: "listing" in broker.proc.log(), what="the listing to be cut")
        tunnels = {t["name"]: t["models"] for t in broker.health()["tunnels"]}  # type: ignore[index, union-attr]
    finally:
        tunnel.close()
    assert grown < 24, f"the broker grew by {grown:.1f} MiB"
    assert tunnels.get("listing", []) == []
