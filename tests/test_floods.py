"""A hostile holder of a connector token floods the broker; its memory stays bounded (RSS
measured) and it serves its users on.

One broker (``python -m broker``: one process, so its RSS is the broker's), one real
connector serving "m", and a hand-driven hostile connector on its own token.
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.support import BrokerHandle, Stack, rss_kib, wait_until
from wire import (
    DEFAULT_LIMITS,
    FRAMES_CONTENT_TYPE,
    INITIAL_CREDIT,
    POLL_PATH,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    Batch,
    Cancel,
    Chunk,
    Credit,
    Frame,
    FrameDecoder,
    Head,
    Hello,
    Pong,
    Request,
    Welcome,
    encode,
    encode_many,
)

USER = {"authorization": "Bearer sk-user"}
EVIL = "tok-evil"
CONFIG = """
connectors:
  - name: real
    token: tok-real
    models: [m]
  - name: hostile
    token: tok-evil
    models: [evil]
  - name: hostile-too
    token: tok-evil-2
    models: [evil]
"""
GROWTH_LIMIT_KIB = 40 * 1024  # what a flood may add to the broker's RSS
FLOOD_BYTES = 64 * 1024 * 1024  # each flood sends at least this much


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    stack = Stack(tmp_path_factory.mktemp("floods"))
    try:
        handle = stack.broker(CONFIG, via="module", env={"REMOTELLM_PING_INTERVAL": "1"})
        stack.connector(handle.url, "tok-real", stack.llm("m"), "m")
        handle.wait_models("m")
        yield handle
    finally:
        stack.close()


def serves(broker: BrokerHandle) -> bool:
    resp = httpx.post(broker.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=USER)
    return resp.status_code == 200


def headers(session: str = "", token: str = EVIL) -> dict[str, str]:
    found = {"authorization": f"Bearer {token}", "content-type": FRAMES_CONTENT_TYPE}
    if session:
        found[SESSION_HEADER] = session
    return found


def register(broker: BrokerHandle, models: list[str], connector_id: str = "evil", token: str = EVIL) -> httpx.Response:
    hello = encode(Hello(connector_id, "0", models))
    return httpx.post(broker.url + REGISTER_PATH, content=hello, headers=headers(token=token))


def session_of(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    [welcome] = FrameDecoder().feed(resp.content)
    assert isinstance(welcome, Welcome)
    return welcome.session


def repeated(frame: Frame, total: int) -> Iterator[bytes]:
    """``frame`` over and over, numbered from 0, in writes of about 1 MiB."""
    one = encode(frame)
    per_write = max(1, 1024 * 1024 // len(one))
    yield encode(Batch(0, 0))
    for _ in range(max(1, total // (per_write * len(one)))):
        yield one * per_write


def flood(broker: BrokerHandle, send: "Flood") -> int:
    """The broker's RSS growth over the flood, in KiB, checking it serves afterwards."""
    before = rss_kib(broker.proc.pid)
    send(broker)
    growth = rss_kib(broker.proc.pid) - before
    print(f"broker RSS {before} KiB, grew {growth} KiB")  # (figures for the record, with -s)
    assert serves(broker)
    assert broker.proc.alive
    return growth


Flood = Callable[[BrokerHandle], None]


def test_a_pong_flood_queues_no_pings(broker: BrokerHandle) -> None:
    def send(broker: BrokerHandle) -> None:
        session = session_of(register(broker, ["evil"]))
        resp = httpx.post(
            broker.url + REPLY_PATH, content=repeated(Pong(1.0), FLOOD_BYTES), headers=headers(session), timeout=60
        )
        assert resp.status_code == 204

    assert flood(broker, send) < GROWTH_LIMIT_KIB


def test_frames_for_requests_never_sent_cost_nothing(broker: BrokerHandle) -> None:
    def send(broker: BrokerHandle) -> None:
        session = session_of(register(broker, ["evil"]))
        forged = Chunk(7, b"x" * 1000)
        resp = httpx.post(
            broker.url + REPLY_PATH, content=repeated(forged, FLOOD_BYTES), headers=headers(session), timeout=60
        )
        assert resp.status_code == 204

    assert flood(broker, send) < GROWTH_LIMIT_KIB
    assert broker.proc.log().count("broke the protocol") < 1000  # logged, not once per frame


def test_an_oversize_reply_frame_is_refused_before_it_is_buffered(broker: BrokerHandle) -> None:
    def send(broker: BrokerHandle) -> None:
        session = session_of(register(broker, ["evil"]))
        huge = encode_many([Batch(0, 0), Chunk(1, b"x" * (32 * 1024 * 1024))])
        resp = httpx.post(broker.url + REPLY_PATH, content=huge, headers=headers(session), timeout=60)
        assert resp.status_code == 400

    assert flood(broker, send) < GROWTH_LIMIT_KIB


def test_a_reply_beyond_its_credit_fails_that_request_and_holds_nothing(broker: BrokerHandle) -> None:
    """The hostile connector polls, takes a real user request, and pours a reply far past
    its credit: the user's stream is cut, the broker holds no more than the window."""

    async def scenario(broker: BrokerHandle) -> None:
        session = session_of(register(broker, ["evil"]))
        async with httpx.AsyncClient(timeout=60) as client:
            requests: asyncio.Queue[Request] = asyncio.Queue()

            async def poll() -> None:
                async with client.stream("GET", broker.url + POLL_PATH, headers=headers(session)) as resp:
                    decoder = FrameDecoder()
                    async for data in resp.aiter_raw():
                        for frame in decoder.feed(data):
                            if isinstance(frame, Request):
                                requests.put_nowait(frame)

            polling = asyncio.create_task(poll())
            # Routed once its poll is attached: wait for that, not for a length of time.
            async with asyncio.timeout(10):
                while "evil" not in (await client.get(broker.url + "/health")).json()["models"]:
                    await asyncio.sleep(0.02)

            async def user() -> int:
                async with client.stream(
                    "POST", broker.url + "/v1/chat/completions", json={"model": "evil"}, headers=USER
                ) as resp:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await resp.aread()
                    return resp.status_code

            answered = asyncio.create_task(user())
            request = await asyncio.wait_for(requests.get(), 10)

            async def pour() -> AsyncIterator[bytes]:
                yield encode_many([Batch(0, 0), Head(request.id, 200, [])])
                chunk = encode(Chunk(request.id, b"x" * (INITIAL_CREDIT // 2)))
                for _ in range(FLOOD_BYTES // len(chunk)):
                    yield chunk

            resp = await client.post(broker.url + REPLY_PATH, content=pour(), headers=headers(session))
            assert resp.status_code == 204
            assert await asyncio.wait_for(answered, 10) == 200
            polling.cancel()

    assert flood(broker, lambda b: asyncio.run(scenario(b))) < GROWTH_LIMIT_KIB


def test_sessions_per_token_are_bounded(broker: BrokerHandle) -> None:
    statuses = [register(broker, ["evil"], connector_id=f"evil-{i}").status_code for i in range(40)]
    assert statuses.count(200) <= 16
    assert statuses[-1] == 429


@pytest.mark.parametrize(
    ("models", "why"),
    [(["x" * 300], "not 1-256 characters"), (["a b"], "not 1-256"), ([f"m{i}" for i in range(5000)], "at most 1024")],
)
def test_model_lists_are_bounded(broker: BrokerHandle, models: list[str], why: str) -> None:
    resp = register(broker, models)
    assert resp.status_code == 400
    assert why in resp.json()["error"]["message"]


OTHER = "tok-evil-2"  # a token of its own: the sessions test leaves tok-evil at its limit


def _registered(broker: BrokerHandle, connector_id: str) -> str:
    return session_of(register(broker, ["evil"], connector_id, OTHER))


def test_uplink_bodies_open_at_once_are_bounded(broker: BrokerHandle) -> None:
    session = _registered(broker, "evil-uplinks")
    release = threading.Event()
    statuses: list[int] = []

    def held() -> Iterator[bytes]:
        yield encode(Batch(0, 0))
        release.wait(30)

    def open_one() -> None:
        with httpx.Client(http1=False, http2=True, timeout=40) as client:
            statuses.append(
                client.post(broker.url + REPLY_PATH, content=held(), headers=headers(session, OTHER)).status_code
            )

    threads = [threading.Thread(target=open_one, daemon=True) for _ in range(DEFAULT_LIMITS.max_uplinks)]
    try:
        for thread in threads:
            thread.start()
        probe = encode(Batch(0, 0))
        refused = wait_until(
            lambda: (
                (r := httpx.post(broker.url + REPLY_PATH, content=probe, headers=headers(session, OTHER))).status_code
                == 429
                and r
            ),
            what="one uplink too many refused",
        )
        assert refused.json()["error"]["code"] == "too_many_uplinks"
    finally:
        release.set()
        for thread in threads:
            thread.join(40)
    assert len(statuses) == DEFAULT_LIMITS.max_uplinks and 429 not in statuses


def test_an_uplink_of_a_session_that_is_over_counts_for_nothing(broker: BrokerHandle) -> None:
    session = _registered(broker, "evil-replaced")
    replaced = threading.Event()
    sent_after = 0

    def body() -> Iterator[bytes]:
        nonlocal sent_after
        yield encode(Batch(0, 0))
        replaced.wait(30)
        for _ in range(20):
            sent_after += 1
            yield encode(Pong(1.0))

    result: list[httpx.Response] = []

    def upload() -> None:
        with httpx.Client(http1=False, http2=True, timeout=40) as client:
            result.append(client.post(broker.url + REPLY_PATH, content=body(), headers=headers(session, OTHER)))

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    wait_until(lambda: sent_after == 0 and thread.is_alive(), what="the upload to start")
    assert register(broker, ["evil"], "evil-replaced", OTHER).status_code == 200  # the old session is dropped
    replaced.set()
    thread.join(40)
    assert result and result[0].status_code == 401, result
    assert result[0].json()["error"]["code"] == "unknown_session"


def test_an_endless_model_listing_is_cut_at_its_bound_and_serves_nothing(broker: BrokerHandle) -> None:
    """A connector without models: the broker lists them through the tunnel. This one answers
    with a listing that never ends, sent as the broker's credit allows: the broker stops
    reading at its bound, cancels, and routes nothing from it."""

    async def scenario(broker: BrokerHandle) -> None:
        session = _registered_with(broker, "evil-listing", [])
        frames: asyncio.Queue[Frame] = asyncio.Queue()
        async with httpx.AsyncClient(timeout=60) as client:

            async def poll() -> None:
                async with client.stream("GET", broker.url + POLL_PATH, headers=headers(session, OTHER)) as resp:
                    decoder = FrameDecoder()
                    async for data in resp.aiter_raw():
                        for frame in decoder.feed(data):
                            frames.put_nowait(frame)

            polling = asyncio.create_task(poll())
            request = await _next_of(frames, Request)
            credit = INITIAL_CREDIT
            cancelled = asyncio.Event()

            async def listing() -> AsyncIterator[bytes]:
                nonlocal credit
                yield encode_many([Batch(0, 0), Head(request.id, 200, []), Chunk(request.id, b'{"data": [')])
                piece = b'{"id": "m"},' * 5000  # 60 KB of an endless list
                for _ in range(FLOOD_BYTES // len(piece)):
                    while credit < len(piece) and not cancelled.is_set():
                        frame = await asyncio.wait_for(frames.get(), 10)
                        if isinstance(frame, Credit) and frame.id == request.id:
                            credit += frame.bytes
                        elif isinstance(frame, Cancel) and frame.id == request.id:
                            cancelled.set()
                    if cancelled.is_set():
                        return
                    credit -= len(piece)
                    yield encode(Chunk(request.id, piece))

            resp = await client.post(broker.url + REPLY_PATH, content=listing(), headers=headers(session, OTHER))
            assert resp.status_code == 204
            assert cancelled.is_set(), "the broker read on past its bound"
            polling.cancel()

    assert flood(broker, lambda b: asyncio.run(scenario(b))) < GROWTH_LIMIT_KIB
    assert "listing the LLM's models failed" in broker.proc.log()
    tunnels = {t["name"]: t["models"] for t in broker.health()["tunnels"]}  # type: ignore[index, union-attr]
    assert tunnels.get("hostile-too", []) == []


def _registered_with(broker: BrokerHandle, connector_id: str, models: list[str]) -> str:
    return session_of(register(broker, models, connector_id, OTHER))


async def _next_of(frames: "asyncio.Queue[Frame]", kind: type[Request]) -> Request:
    while True:
        frame = await asyncio.wait_for(frames.get(), 10)
        if isinstance(frame, kind):
            return frame
