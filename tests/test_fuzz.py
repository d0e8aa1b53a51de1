"""Fuzzing the tunnel endpoints of a running broker: whatever a connector (or an impostor)
sends, the broker answers with a clean HTTP status and keeps serving its users.

One broker for the module, with one real connector and fake LLM serving "m", and
connector tokens of the tests' own:

- ``tok-fuzz``: sessions whose replies are fuzzed (they never poll, so serve nothing);
- ``tok-live``: a hand-driven connector that polls, serves "fuzz-only", and answers
  real user requests with fuzzed reply streams.

Bad tokens are few on purpose: the broker slows down an address after 5 failures.
"""

import contextlib
import itertools
import json
import queue
import string
import threading
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.support import BrokerHandle, Stack, metric
from wire import (
    DEFAULT_LIMITS,
    FRAMES_CONTENT_TYPE,
    MAX_FRAME_SIZE,
    POLL_PATH,
    PROTOCOL_VERSION,
    REGISTER_PATH,
    REPLY_PATH,
    SESSION_HEADER,
    Batch,
    Cancel,
    Chunk,
    Credit,
    Drain,
    End,
    ErrorKind,
    Frame,
    FrameDecoder,
    FrameError,
    Head,
    Hello,
    Models,
    Ping,
    Pong,
    Request,
    Welcome,
    check_models,
    encode,
    encode_many,
)
from wire.headers import valid_header, valid_status

USER = {"authorization": "Bearer sk-user"}
FUZZ_TOKEN = "tok-fuzz"
FUZZ_MODELS = ["fuzz-a", "fuzz-b"]
CONFIG = f"""
connectors:
  - name: real
    token: tok-real
  - name: fuzz
    token: tok-fuzz
    models: [{", ".join(FUZZ_MODELS)}]
  - name: live
    token: tok-live
    models: [fuzz-only]
"""
CHECK_EVERY = 20  # examples between two checks that the broker still serves "m"
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
# What an uplink may carry; a frame of any other kind ends the session.
REPLY_KINDS = (Head, Chunk, End, Pong, Drain, Credit)
ERROR_KINDS = [None, *typing.get_args(ErrorKind), "bogus"]  # the last one is not a kind


# --- the broker under test ----------------------------------------------------------


@dataclass
class Fuzzed:
    stack: Stack
    broker: BrokerHandle
    h1: httpx.Client
    h2: httpx.Client
    examples: int = 0

    def serves(self) -> None:
        resp = self.h1.post(self.broker.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=USER)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]

    def after_example(self) -> None:
        self.examples += 1
        if self.examples % CHECK_EVERY == 0:
            self.serves()

    def register(self, hello: Hello, token: str = FUZZ_TOKEN) -> str:
        resp = self.h1.post(self.broker.url + REGISTER_PATH, content=encode(hello), headers=_auth(token))
        assert resp.status_code == 200, resp.text
        frames = FrameDecoder().feed(resp.content)
        assert len(frames) == 1 and isinstance(frames[0], Welcome)
        return frames[0].session


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    stack = Stack(tmp_path_factory.mktemp("fuzz"))
    # Fuzzed registrations pile up sessions on one token (each waits out its resume grace).
    env = {"REMOTELLM_FIRST_BYTE_TIMEOUT": "5", "REMOTELLM_IDLE_TIMEOUT": "5", "REMOTELLM_SESSIONS_PER_TOKEN": "100000"}
    h1 = httpx.Client(timeout=10)
    h2 = httpx.Client(http1=False, http2=True, timeout=10)
    try:
        # python -m broker: plain hypercorn ends an HTTP/2 connection after 1000 requests,
        # and the fuzzing clients send more than that on one connection when examples grow.
        broker = stack.broker(CONFIG, env=env, via="module")
        stack.connector(broker.url, "tok-real", stack.llm("m"), "m", name="connector-real")
        broker.wait_models("m")
        yield Fuzzed(stack, broker, h1, h2)
    finally:
        h1.close()
        h2.close()
        stack.close()


def _auth(token: str, session: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {token}", "content-type": FRAMES_CONTENT_TYPE}
    if session is not None:
        headers[SESSION_HEADER] = session
    return headers


def assert_clean(resp: httpx.Response, allowed: set[int]) -> None:
    """An expected status; a 4xx carries an OpenAI-shaped JSON error."""
    assert resp.status_code in allowed, f"{resp.status_code}: {resp.text[:300]}"
    if 400 <= resp.status_code < 500:
        error = resp.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), error
        assert resp.headers["content-type"].startswith("application/json")


# --- strategies ---------------------------------------------------------------------

ids = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(max_size=12)
models = st.lists(st.sampled_from([*FUZZ_MODELS, "m", "evil"]) | texts, max_size=3)
header_lists = st.lists(st.tuples(texts, texts), max_size=3)
floats = st.floats(allow_nan=True, allow_infinity=True)

frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, connector_id=texts, version=texts, models=models, protocol=st.integers(-3, 3)),
    st.builds(Welcome, session=texts, ping_interval=floats),
    st.builds(
        Request,
        id=ids,
        method=texts,
        path=texts,
        query=texts,
        headers=header_lists,
        body=st.binary(max_size=32),
        llm_api_key=st.none() | texts,
    ),
    st.builds(Head, id=ids, status=st.integers(-1, 1000), headers=header_lists, llm_ms=floats),
    st.builds(Chunk, id=ids, data=st.binary(max_size=64)),
    st.builds(End, id=ids, error=st.sampled_from(ERROR_KINDS), detail=texts),
    st.builds(Cancel, id=ids),
    st.builds(Ping, sent=floats),
    st.builds(Drain, reason=texts),
    st.builds(Models, models=models),
    st.builds(Credit, id=ids, bytes=st.integers(-(2**31), 2**31)),
    st.builds(Pong, ping_sent=floats),
)
# Replies mostly made of what replies carry (for unknown request ids), with strays.
reply_frames = st.one_of(
    st.builds(Head, id=ids, status=st.integers(100, 599), headers=header_lists),
    st.builds(Chunk, id=ids, data=st.binary(max_size=64)),
    st.builds(End, id=ids, error=st.sampled_from(ERROR_KINDS), detail=texts),
    st.builds(Pong, ping_sent=floats),
    frames,
)


@st.composite
def frame_streams(draw: st.DrawFn, of: st.SearchStrategy[Frame] = frames) -> bytes:
    """Valid frames, then maybe broken: truncated, garbage around them, a bit flipped, a huge prefix."""
    data = encode_many(draw(st.lists(of, max_size=5)))
    mutation = draw(st.sampled_from(["none", "none", "truncate", "prefix", "suffix", "flip", "huge", "random"]))
    if mutation == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "prefix":
        data = draw(st.binary(min_size=1, max_size=16)) + data
    elif mutation == "suffix":
        data += draw(st.binary(min_size=1, max_size=16))
    elif mutation == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    elif mutation == "huge":
        data += draw(st.sampled_from([MAX_FRAME_SIZE + 1, 2**32 - 1, MAX_FRAME_SIZE])).to_bytes(4, "big") + b"\x93"
    elif mutation == "random":
        data = draw(st.binary(max_size=256))
    return data


@st.composite
def pieces(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """The body cut at random points: frames straddle the broker's reads."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _only_cut_short(data: bytes) -> bool:
    """Whether the body is valid frames followed by the start of one more (a cut uplink)."""
    decoder = FrameDecoder(DEFAULT_LIMITS.max_reply_frame)
    try:
        decoder.feed(data)
        decoder.feed(b"")  # raises what the decoder found after the frames it returned
    except FrameError:
        return False
    return True


def broker_view(data: bytes) -> tuple[list[Frame], bool]:
    """The frames the broker takes from a whole body, and whether the body is faulty
    (invalid somewhere, or ending inside a frame): the valid frames before a fault count."""
    decoder = FrameDecoder(DEFAULT_LIMITS.max_reply_frame)
    try:
        frames = decoder.feed(data)
    except FrameError:
        return [], True
    try:
        decoder.finish()
    except FrameError:
        return frames, True
    return frames, False


# --- register -----------------------------------------------------------------------


@given(body=frame_streams(), split=st.data(), h2=st.booleans())
@example(body=b"", split=None, h2=False)
@example(body=encode(Hello("x", "1", ["m"])), split=None, h2=False)  # outside the allowlist: 403
@example(body=encode_many([Hello("x", "1", []), Hello("y", "1", [])]), split=None, h2=True)
@example(body=encode(Welcome("s", 1.0)), split=None, h2=True)
@FUZZ
def test_register_answers_cleanly(fuzzed: Fuzzed, body: bytes, split: st.DataObject | None, h2: bool) -> None:
    frames_in, faulty = broker_view(body)
    if (
        faulty
        or len(frames_in) != 1
        or not isinstance(frames_in[0], Hello)
        or check_models(frames_in[0].models) is not None
    ):
        expected = 400
    elif frames_in[0].protocol != PROTOCOL_VERSION:
        expected = 400  # the version is checked before anything the Hello asks for
    elif set(frames_in[0].models) - set(FUZZ_MODELS):
        expected = 403
    else:
        expected = 200
    content = split.draw(pieces(body)) if split is not None else body
    client = fuzzed.h2 if h2 else fuzzed.h1
    resp = client.post(fuzzed.broker.url + REGISTER_PATH, content=content, headers=_auth(FUZZ_TOKEN))
    assert_clean(resp, {expected})
    if resp.status_code == 200:
        welcome = FrameDecoder().feed(resp.content)
        assert len(welcome) == 1 and isinstance(welcome[0], Welcome), welcome
    fuzzed.after_example()


def test_register_fuzz_left_the_broker_serving(fuzzed: Fuzzed) -> None:
    fuzzed.serves()
    assert fuzzed.broker.proc.alive


# --- reply --------------------------------------------------------------------------


class ReplySession:
    """A tok-fuzz session for reply fuzzing; registered again when a fuzzed Drain ended it."""

    def __init__(self, fuzzed: Fuzzed) -> None:
        self.fuzzed = fuzzed
        self.connector_id = f"reply-fuzzer-{uuid.uuid4().hex}"
        self.session = ""
        self.renew()

    def renew(self) -> None:
        self.session = self.fuzzed.register(Hello(self.connector_id, "fuzz", []))

    def post(self, content: list[bytes], h2: bool) -> httpx.Response:
        """A fresh session's first uplink body (the same connector id: the last one goes)."""
        self.renew()
        client = self.fuzzed.h2 if h2 else self.fuzzed.h1
        url = self.fuzzed.broker.url + REPLY_PATH
        return client.post(url, content=content, headers=_auth(FUZZ_TOKEN, self.session))


@pytest.fixture(scope="module")
def reply_session(fuzzed: Fuzzed) -> ReplySession:
    return ReplySession(fuzzed)


@given(body=frame_streams(reply_frames), split=st.data(), h2=st.booleans())
@example(body=encode(Request(1, "POST", "/v1/x", "", [], b"")), split=None, h2=True)  # wrong direction
@example(body=encode(Hello("x", "1", [])), split=None, h2=False)
@example(body=encode_many([Head(987654321, 200, []), Chunk(987654321, b"x"), End(987654321)]), split=None, h2=True)
@example(body=encode(End(2**64 - 1, "internal"))[:-1], split=None, h2=False)  # truncated: 400
@example(body=b"\xff\xff\xff\xff", split=None, h2=True)  # a 4 GiB frame announced
@example(body=encode(Pong(0.0)) + b"\x00\x00\x00\x00", split=None, h2=False)  # an empty frame after a valid one
@FUZZ
def test_reply_answers_cleanly(
    fuzzed: Fuzzed, reply_session: ReplySession, body: bytes, split: st.DataObject | None, h2: bool
) -> None:
    frames_in, faulty = broker_view(body)
    wrong_kind = any(not isinstance(f, REPLY_KINDS) for f in frames_in)
    # A body cut inside a frame is no fault: that frame comes again on the next uplink.
    expected = 400 if (faulty and not _only_cut_short(body)) or wrong_kind else 204
    content = split.draw(pieces(body)) if split is not None else [body]
    resp = reply_session.post([encode(Batch(0, 0)), *content], h2)
    # A Drain ends the session once it has nothing in flight: what follows it counts for nothing.
    drained = any(isinstance(f, Drain) for f in frames_in)
    assert_clean(resp, {expected, 401} if drained else {expected})
    if resp.status_code == 204:
        assert resp.content == b""
    fuzzed.after_example()


session_ids = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=30)


@given(session=session_ids, body=frame_streams(reply_frames), poll=st.booleans())
@settings(FUZZ, max_examples=30)
def test_a_valid_token_with_a_forged_session_is_refused(fuzzed: Fuzzed, session: str, body: bytes, poll: bool) -> None:
    """Not throttled (the token is right), but never accepted: 401 unknown_session."""
    headers = _auth(FUZZ_TOKEN, session)
    if poll:
        resp = fuzzed.h1.get(fuzzed.broker.url + POLL_PATH, headers=headers)
    else:
        resp = fuzzed.h2.post(fuzzed.broker.url + REPLY_PATH, content=body, headers=headers)
    assert_clean(resp, {401})
    assert resp.json()["error"]["code"] == "unknown_session"
    fuzzed.after_example()


BAD_AUTH = [
    None,
    "Bearer",
    "Bearer tok-fuzz-not",
    "Bearer sk-user",  # a user key is no connector token
    "Basic dG9rLWZ1eno=",
]


@pytest.mark.parametrize("auth", BAD_AUTH)
@given(body=frame_streams())
@settings(FUZZ, max_examples=1)  # five calls in all: the broker's throttle starts delaying after five failures
def test_bad_tokens_are_refused_on_every_endpoint(fuzzed: Fuzzed, auth: str | None, body: bytes) -> None:
    headers = {"content-type": FRAMES_CONTENT_TYPE, SESSION_HEADER: "whatever"}
    if auth is not None:
        headers["authorization"] = auth
    endpoint = BAD_AUTH.index(auth) % 3
    url = fuzzed.broker.url
    if endpoint == 0:
        resp = fuzzed.h1.post(url + REGISTER_PATH, content=body, headers=headers)
    elif endpoint == 1:
        resp = fuzzed.h2.post(url + REPLY_PATH, content=body, headers=headers)
    else:
        resp = fuzzed.h1.get(url + POLL_PATH, headers=headers)
    assert_clean(resp, {401})
    assert resp.json()["error"]["code"] == "invalid_token"
    fuzzed.serves()


def test_reply_fuzz_left_the_broker_serving(fuzzed: Fuzzed) -> None:
    fuzzed.serves()
    assert fuzzed.broker.health()["connectors"] == 1  # the real one: fuzzing never routed anything else


# --- fuzzed replies to real requests --------------------------------------------------


class LiveConnector:
    """A connector driven by hand: it polls, queues each Request, and replies as told,
    numbering its frames as the protocol wants; registered again when a bad reply ended
    its session."""

    def __init__(self, fuzzed: Fuzzed) -> None:
        self.fuzzed = fuzzed
        self.connector_id = f"live-{uuid.uuid4().hex}"
        self.requests: queue.Queue[Request] = queue.Queue()
        self.client = httpx.Client(http1=False, http2=True, timeout=httpx.Timeout(10, read=None))
        self.session = ""
        self.sent = 0  # frames of this session the broker has taken
        self.thread: threading.Thread | None = None
        self.renew()

    def renew(self) -> None:
        if self.thread is not None:
            self.thread.join(10)  # the broker ended the old session's poll
        self.session = self.fuzzed.register(Hello(self.connector_id, "fuzz", ["fuzz-only"]), "tok-live")
        self.sent = 0
        self.thread = threading.Thread(target=self._poll, args=(self.session,), daemon=True)
        self.thread.start()
        self.fuzzed.broker.wait_models("fuzz-only")

    def _poll(self, session: str) -> None:
        url = self.fuzzed.broker.url + POLL_PATH
        headers = _auth("tok-live", session)
        with contextlib.suppress(httpx.HTTPError), self.client.stream("GET", url, headers=headers) as resp:
            decoder = FrameDecoder()
            for data in resp.iter_raw():
                for frame in decoder.feed(data):
                    if isinstance(frame, Request):
                        self.requests.put(frame)

    def reply(self, content: list[bytes]) -> httpx.Response:
        """One uplink body of these bytes, behind the Batch that numbers them."""
        body = b"".join(content)
        headers = _auth("tok-live", self.session)
        resp = self.fuzzed.h2.post(
            self.fuzzed.broker.url + REPLY_PATH, content=[encode(Batch(self.sent, 0)), *content], headers=headers
        )
        if resp.status_code == 204:
            self.sent += len(FrameDecoder(DEFAULT_LIMITS.max_reply_frame).feed(body))
        else:
            self.renew()
        return resp

    def close(self) -> None:
        """Say goodbye (the broker then ends the poll), then stop polling."""
        with contextlib.suppress(httpx.HTTPError):
            self.reply([encode(Drain("fuzzing over"))])
        if self.thread is not None:
            self.thread.join(5)
        self.client.close()


@pytest.fixture(scope="module")
def live(fuzzed: Fuzzed) -> Iterator[LiveConnector]:
    connector = LiveConnector(fuzzed)
    yield connector
    connector.close()


OURS = -1  # the id of the request being answered, filled in once it is known


@dataclass
class Step:
    """One piece of a fuzzed reply: a frame for the request (or another id), or poison."""

    frame: Frame | None = None
    poison: bytes = b""  # bytes that are no valid reply frame: the broker stops reading there

    def encoded(self, request_id: int) -> bytes:
        if self.frame is None:
            return self.poison
        if getattr(self.frame, "id", None) == OURS:
            return encode(msgspec.structs.replace(self.frame, id=request_id))
        return encode(self.frame)


# Mostly valid heads; some with a status or a header no user may be sent (a 502 instead),
# and some with headers that are valid but never relayed (set-cookie, alt-svc).
heads = st.builds(
    Head,
    id=st.just(OURS),
    status=st.sampled_from([200, 201, 400, 404, 418, 500, 502]) | st.sampled_from([-1, 99, 101, 600, 999]),
    headers=st.lists(
        st.tuples(
            st.sampled_from(["content-type", "x-fuzz", "X-Other", "set-cookie", "alt-svc"])
            | st.sampled_from(["bad name", "x\r\ny", ":status", ""]),
            st.text(string.ascii_letters) | st.sampled_from(["a\r\nx-injected: 1", "nul\x00", " padded "]),
        ),
        max_size=2,
    ),
)
chunks = st.builds(Chunk, id=st.just(OURS), data=st.binary(min_size=1, max_size=40))
ends = st.builds(End, id=st.just(OURS), error=st.sampled_from(ERROR_KINDS[:-1]))
strays = st.one_of(
    st.builds(Chunk, id=st.integers(10**15, 2**63), data=st.binary(max_size=8)),
    st.builds(Pong, ping_sent=floats),
)
poisons = st.sampled_from(
    [
        b"\x00\x00\x00\x01\xc1",  # 0xc1 is no msgpack value: undecodable
        b"\xff\xff\xff\xff",  # a 4 GiB frame announced
        encode(Ping(1.0)),  # a valid frame of the wrong kind
        encode(Request(7, "GET", "/", "", [], b"")),
    ]
)
any_step = st.one_of(
    st.one_of(heads, chunks, ends).map(lambda f: Step(frame=f)),
    strays.map(lambda f: Step(frame=f)),
    poisons.map(lambda p: Step(poison=p)),
)


@st.composite
def reply_scripts(draw: st.DrawFn) -> list[Step]:
    """Either anything at all, or a well-formed reply (Head, Chunks, End) with a few steps meddled in."""
    if draw(st.booleans()):
        return draw(st.lists(any_step, max_size=6))
    script = [Step(draw(heads)), *(Step(c) for c in draw(st.lists(chunks, max_size=4))), Step(draw(ends))]
    for _ in range(draw(st.integers(0, 2))):
        script.insert(draw(st.integers(0, len(script))), draw(any_step))
    return script


@dataclass
class Expected:
    kind: str  # "complete", "cut" (after the head), "error" (a 502 before it) or "busy" (a 429)
    status: int
    body: bytes = b""
    left_open: bool = False  # nothing ended the request yet: a later reply body must


def expected_outcome(steps: list[Step], truncated: bool) -> Expected:
    """What the user must see, from the frames the broker takes (those before any fault).

    A poison ends the session, and with it the request (a frame cut short at the end
    of a body does not: it would come again on the next uplink).
    """
    delivered: list[Frame] = []
    for step in steps[:-1] if truncated else steps:
        if step.frame is None:
            break  # the broker stops at the poison: what came before counts
        if getattr(step.frame, "id", None) == OURS:
            delivered.append(step.frame)
    interrupted = any(step.frame is None for step in steps)
    if not delivered:
        return Expected("error", 502, left_open=not interrupted)
    if isinstance(delivered[0], End) and delivered[0].error == "busy":
        return Expected("busy", 429)  # the connector is full, and it is the only one serving the model
    if not isinstance(delivered[0], Head):
        return Expected("error", 502)  # the reply did not start with a head: the broker answers for it
    if not _relayable(delivered[0]):
        return Expected("error", 502)  # a head no user may be sent: the broker answers for it
    head, body = delivered[0], b""
    for frame in delivered[1:]:
        if isinstance(frame, Chunk):
            body += frame.data
        elif isinstance(frame, End) and frame.error is None:
            return Expected("complete", head.status, body)
        else:
            return Expected("cut", head.status)  # a failed End, or a second Head
    return Expected("cut", head.status, left_open=not interrupted)


def _relayable(head: Head) -> bool:
    return valid_status(head.status) and all(valid_header(k.lower(), v.strip(" \t")) for k, v in head.headers)


@given(steps=reply_scripts(), truncated=st.booleans(), cuts=st.lists(st.integers(0, 10_000), max_size=4))
@example(steps=[Step(Head(OURS, 200, [])), Step(Chunk(OURS, b"hi")), Step(End(OURS))], truncated=False, cuts=[])
@example(steps=[Step(Head(OURS, 200, [])), Step(poison=b"\xff\xff\xff\xff")], truncated=False, cuts=[])
@example(steps=[Step(End(OURS, "busy"))], truncated=False, cuts=[])
@settings(FUZZ, max_examples=100)
def test_fuzzed_replies_to_real_requests_end_cleanly(
    fuzzed: Fuzzed, live: LiveConnector, steps: list[Step], truncated: bool, cuts: list[int]
) -> None:
    """Whatever the connector streams back, the user gets a whole answer, a 502, or a visible cut.

    Everything is drawn before the request starts: an example hypothesis abandons
    half-way would leave a request waiting for the first-byte timeout.
    """
    truncated = truncated and bool(steps) and steps[-1].frame is not None
    while not live.requests.empty():
        live.requests.get_nowait()
    outcome: dict[str, object] = {}

    def user() -> None:
        try:
            with fuzzed.h1.stream(
                "POST", fuzzed.broker.url + "/v1/chat/completions", json={"model": "fuzz-only"}, headers=USER
            ) as resp:
                outcome["status"] = resp.status_code
                outcome["headers"] = resp.headers
                outcome["body"] = resp.read()
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=user, daemon=True)
    caller.start()
    request = live.requests.get(timeout=5)
    expected = expected_outcome(steps, truncated)
    event(f"user sees: {expected.kind}{' (after a later End)' if expected.left_open else ''}")
    try:
        body = b"".join(step.encoded(request.id) for step in steps)
        if truncated:
            body = body[:-1]
        bounds = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
        resp = live.reply([body[a:b] for a, b in itertools.pairwise(bounds)])
        faulty = any(step.frame is None for step in steps)
        assert resp.status_code == (400 if faulty else 204), resp.text
        if expected.left_open:
            assert live.reply([encode(End(request.id, "internal"))]).status_code == 204
        caller.join(2)  # the broker's own timeouts are 5 s: the outcome must not come from them
        assert not caller.is_alive(), "the user request was left hanging"
    finally:
        if caller.is_alive():
            live.reply([encode(End(request.id, "internal"))])
            caller.join(10)

    relayed = typing.cast(httpx.Headers, outcome.get("headers", httpx.Headers()))
    assert not {"set-cookie", "alt-svc", "x-injected"} & set(relayed.keys()), relayed
    if expected.kind == "complete":
        assert outcome.get("status") == expected.status and outcome.get("body") == expected.body, outcome
    elif expected.kind == "cut":
        assert outcome.get("status") == expected.status, outcome
        assert isinstance(outcome.get("error"), httpx.RemoteProtocolError), outcome
    elif expected.kind == "busy":
        assert outcome.get("status") == 429, outcome
        answer = outcome["body"]
        assert isinstance(answer, bytes) and json.loads(answer)["error"]["code"] == "capacity_exceeded", outcome
    else:
        assert outcome.get("status") == 502, outcome
        answer = outcome["body"]
        assert isinstance(answer, bytes) and json.loads(answer)["error"]["code"] == "upstream_unavailable", outcome
    fuzzed.after_example()


def test_live_fuzz_left_the_broker_serving(fuzzed: Fuzzed, live: LiveConnector) -> None:
    fuzzed.serves()
    text = httpx.get(fuzzed.broker.url + "/metrics").text
    assert metric(text, "remotellm_requests_in_flight") == 0, "a request was left in flight"
    assert "timeout" not in fuzzed.broker.proc.log(), "a request waited for a broker timeout"
