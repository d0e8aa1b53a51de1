"""Audio uploads through the bridge: routed by the form's model, streamed, never held whole.

The fake LLM hashes what it receives, so a byte lost, added or re-encoded (NUL, non-UTF-8)
shows; the broker runs as one process, so its RSS is the broker's.
"""

import contextlib
import hashlib
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import BrokerHandle, Stack, fake_state, rss_kib, wait_until

USER_KEY = "sk-user-upload"
CONFIG = """
connectors:
  - name: conn
    token: tok
    models: [whisper-1]
"""
MIB = 1024 * 1024
BIG = 100 * MIB
MAX_UPLOAD = 128 * MIB
BOUNDARY = "remotellm-test-boundary"


class Bridge:
    def __init__(self, stack: Stack, env: dict[str, str] | None = None, llm_key: str | None = None) -> None:
        self.llm = stack.llm("whisper-1", name="llm", api_key=llm_key)
        # A body timeout far beyond any machine's upload time: only its own test meets it.
        env = {"REMOTELLM_MAX_UPLOAD_SIZE": str(MAX_UPLOAD), "REMOTELLM_BODY_TIMEOUT": "600", **(env or {})}
        self.broker: BrokerHandle = stack.broker(CONFIG, user_keys=(USER_KEY,), via="module", env=env)
        self.connector = stack.connector(self.broker.url, "tok", self.llm, "whisper-1")
        self.broker.wait_models("whisper-1", connectors=1)
        self.openai = openai.OpenAI(base_url=self.broker.url + "/v1", api_key=USER_KEY, max_retries=0, timeout=120)

    def state(self) -> dict[str, object]:
        return fake_state(self.llm)

    def last_request(self) -> dict[str, object]:
        requests = self.state()["last_requests"]
        assert isinstance(requests, list) and requests
        last: dict[str, object] = requests[-1]
        return last

    def cancelled(self) -> int:
        return int(self.state()["cancelled"])  # type: ignore[call-overload]


@contextlib.contextmanager
def running(directory: Path, env: dict[str, str] | None = None, llm_key: str | None = None) -> Iterator[Bridge]:
    """A bridge of its own for the block; its processes' logs are printed if the block fails."""
    stack = Stack(directory)
    try:
        yield Bridge(stack, env, llm_key)
    finally:
        stack.close()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    with running(tmp_path_factory.mktemp("uploads")) as shared:
        yield shared


def audio_file(directory: Path, size: int, seed: int) -> tuple[Path, str]:
    """Random bytes (NULs, bytes that are not UTF-8) of ``size``, and their sha256."""
    data = random.Random(seed).randbytes(size)
    path = directory / f"audio-{seed}.wav"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


class PeakRSS:
    """The highest RSS of some processes while the block runs, sampled every 10 ms."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.before = [rss_kib(pid) for pid in pids]
        self.peak = list(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = [max(p, rss_kib(pid)) for p, pid in zip(self.peak, self.pids, strict=True)]

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def growth_kib(self) -> list[int]:
        return [peak - before for peak, before in zip(self.peak, self.before, strict=True)]


def test_a_100_mb_upload_arrives_byte_identical_and_is_never_held(bridge: Bridge, tmp_path: Path) -> None:
    small, _ = audio_file(tmp_path, 3 * MIB, seed=1)  # a first upload warms every buffer and import up
    bridge.openai.audio.transcriptions.create(model="whisper-1", file=small)
    path, digest = audio_file(tmp_path, BIG, seed=2)
    with PeakRSS(bridge.broker.proc.pid, bridge.connector.pid) as rss:
        started = time.perf_counter()
        with path.open("rb") as file:
            result = bridge.openai.audio.transcriptions.create(model="whisper-1", file=file)
        elapsed = time.perf_counter() - started
    broker_growth, connector_growth = rss.growth_kib()
    print(
        f"100 MiB upload: {BIG / MIB / elapsed:.0f} MiB/s; RSS growth broker {broker_growth} KiB, "
        f"connector {connector_growth} KiB"
    )  # (figures for the record, with -s)
    assert f"{BIG} bytes, sha256 {digest}" in result.text
    upload = bridge.last_request()["upload"]
    assert upload == {"filename": path.name, "size": BIG, "sha256": digest}
    assert broker_growth < 16 * 1024
    assert connector_growth < 16 * 1024


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # (the SDK's own mark on translations)
def test_translations_stream_too(bridge: Bridge, tmp_path: Path) -> None:
    path, digest = audio_file(tmp_path, 5 * MIB, seed=3)
    result = bridge.openai.audio.translations.create(model="whisper-1", file=path)
    assert f"{5 * MIB} bytes, sha256 {digest}" in result.text
    request = bridge.last_request()
    assert request["path"] == "/v1/audio/translations"
    assert request["model"] == "whisper-1"


def test_a_small_form_is_relayed_whole(bridge: Bridge, tmp_path: Path) -> None:
    path, digest = audio_file(tmp_path, 1000, seed=4)  # all of it within the head read to route it
    result = bridge.openai.audio.transcriptions.create(model="whisper-1", file=path)
    assert f"1000 bytes, sha256 {digest}" in result.text


def post_form(bridge: Bridge, fields: dict[str, str], size: int = MIB) -> httpx.Response:
    files = {"file": ("a.wav", b"\x00\xff" * (size // 2), "audio/wav")}
    headers = {"authorization": f"Bearer {USER_KEY}"}
    return httpx.post(
        bridge.broker.url + "/v1/audio/transcriptions", data=fields, files=files, headers=headers, timeout=30
    )


def test_a_form_without_a_model_is_400(bridge: Bridge) -> None:
    requests = bridge.state()["requests"]
    response = post_form(bridge, {"language": "en"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    late = post_form(bridge, {"prompt": "x" * (2 * MIB), "model": "whisper-1"})  # beyond the head searched
    assert late.status_code == 400
    url, auth = bridge.broker.url + "/v1/audio/transcriptions", {"authorization": f"Bearer {USER_KEY}"}
    not_form = httpx.post(url, json={"model": "whisper-1"}, headers=auth)  # the model is a form field here
    assert not_form.status_code == 400
    assert bridge.state()["requests"] == requests  # none reached the LLM


def test_an_unknown_model_is_404(bridge: Bridge, tmp_path: Path) -> None:
    path, _ = audio_file(tmp_path, 4 * MIB, seed=5)
    with pytest.raises(openai.NotFoundError) as caught:
        bridge.openai.audio.transcriptions.create(model="no-such-model", file=path)
    assert caught.value.code == "model_not_found"


def raw_upload(bridge: Bridge, head_fields: bytes, declared: int | None, headers: str = "") -> socket.socket:
    """An HTTP/1.1 upload started by hand: its head and the form up to the file's bytes."""
    port = int(bridge.broker.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    framing = f"content-length: {declared}" if declared is not None else "transfer-encoding: chunked"
    sock.sendall(
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: broker\r\nauthorization: Bearer {USER_KEY}\r\n"
        f"content-type: multipart/form-data; boundary={BOUNDARY}\r\n{headers}{framing}\r\n\r\n".encode()
    )
    form = (
        f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode()
    send_body(sock, head_fields + form, chunked=declared is None)
    return sock


def send_body(sock: socket.socket, data: bytes, *, chunked: bool) -> None:
    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)


def test_an_llm_that_reads_nothing_holds_the_user_back_not_the_bridge(bridge: Bridge) -> None:
    requests = bridge.state()["requests"]
    piece = random.Random(6).randbytes(MIB)
    framed, pieces = b"%x\r\n%s\r\n" % (len(piece), piece), 64
    total = pieces * len(framed)
    sock = raw_upload(bridge, b"", declared=None, headers='x-fake: {"hold_body": true}\r\n')
    wait_until(lambda: bridge.state()["requests"] == requests + 1, what="the upload to reach the LLM")  # type: ignore[operator]
    sent = 0
    sock.setblocking(False)
    with PeakRSS(bridge.broker.proc.pid, bridge.connector.pid) as rss:
        # No room for 2 s: the path is full (a slow machine only stalls later, never sooner).
        while sent < total and select.select([], [sock], [], 2)[1]:
            sent += sock.send(framed[sent % len(framed) :])
    print(f"held back after {sent / MIB:.1f} MiB; RSS growth broker, connector: {rss.growth_kib()} KiB")
    assert sent < 40 * MIB  # socket buffers on three hops and one credit window, not the upload
    assert max(rss.growth_kib()) < 16 * 1024
    httpx.post(bridge.llm + "/_fake/release", timeout=5)
    sock.setblocking(True)
    sock.settimeout(60)
    sock.sendall(framed[sent % len(framed) :] + framed * (pieces - 1 - sent // len(framed)))
    end = f"\r\n--{BOUNDARY}--\r\n".encode()
    sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    upload = bridge.last_request()["upload"]
    assert upload == {"filename": "a.wav", "size": pieces * MIB, "sha256": hashlib.sha256(piece * pieces).hexdigest()}


def test_an_upload_sent_a_byte_at_a_time_arrives_intact(bridge: Bridge) -> None:
    # The model is searched for and the body forwarded in pieces the user does not choose
    # (the tunnel batches them: broker.upload.MIN_PIECE).
    data = random.Random(7).randbytes(70_000)
    sock = raw_upload(bridge, b"", declared=None)
    sock.sendall(b"".join(b"1\r\n%s\r\n" % data[i : i + 1] for i in range(len(data))))
    end = f"\r\n--{BOUNDARY}--\r\n".encode()
    sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
    sock.settimeout(60)
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert bridge.last_request()["upload"] == {
        "filename": "a.wav", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()
    }  # fmt: skip


def test_a_user_who_leaves_mid_upload_ends_the_request_at_the_llm(bridge: Bridge) -> None:
    requests, cancelled = bridge.state()["requests"], bridge.cancelled()
    sock = raw_upload(bridge, b"", declared=50 * MIB)
    for _ in range(4):
        send_body(sock, b"\x00\x80" * (MIB // 2), chunked=False)
    wait_until(lambda: bridge.state()["requests"] == requests + 1, what="the upload to reach the LLM")  # type: ignore[operator]
    sock.close()
    wait_until(lambda: bridge.cancelled() == cancelled + 1, what="the LLM to see the upload end")


def test_an_upload_over_max_upload_size_is_413(bridge: Bridge) -> None:
    sock = raw_upload(bridge, b"", declared=MAX_UPLOAD + 1)  # said at once: refused before any is read
    assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    sock.close()
    # Chunked, it shows only on the way: the LLM has the start and sees the request end.
    cancelled = bridge.cancelled()
    sock = raw_upload(bridge, b"", declared=None)
    piece = b"\xfe\x00" * (2 * MIB)
    answer = b""
    sock.settimeout(60)
    try:
        for _ in range(MAX_UPLOAD // len(piece) + 2):
            send_body(sock, piece, chunked=True)
    except OSError:
        pass  # the broker answered and closed
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    wait_until(lambda: bridge.cancelled() == cancelled + 1, what="the LLM to see the upload end")


def test_an_upload_slower_than_the_body_timeout_is_408(tmp_path: Path) -> None:
    with running(tmp_path, {"REMOTELLM_BODY_TIMEOUT": "3"}) as slow:
        sock = raw_upload(slow, b"", declared=50 * MIB)
        send_body(sock, b"\x00" * MIB, chunked=False)  # then nothing more
        sock.settimeout(30)
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        state = slow.state()  # whatever reached the LLM (on a slow machine maybe nothing) ended there
        wait_until(lambda: slow.cancelled() == slow.state()["requests"], what="the LLM to see the upload end")
        assert int(state["requests"]) <= 1  # type: ignore[call-overload]


def test_an_llm_that_answers_before_the_upload_ended_is_relayed(tmp_path: Path) -> None:
    with running(tmp_path, llm_key="sk-the-connector-lacks") as refusing:  # the LLM answers 401 to the head
        path, _ = audio_file(tmp_path, 20 * MIB, seed=8)
        for _ in range(2):  # and the connector serves on
            with pytest.raises(openai.AuthenticationError):
                refusing.openai.audio.transcriptions.create(model="whisper-1", file=path)
