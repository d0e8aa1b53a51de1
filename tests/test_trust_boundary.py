"""The trust boundary at the public edge, attacked the way a holder of one user key would.

The broker runs for real (hypercorn), with a connector whose LLM is a recording server
(tests/recorder.py) under a base path, and a canary server that nothing may ever reach.
Attacks are sent as raw HTTP/1.1 bytes and through h2 directly: httpx would normalise
the very targets under test.
"""

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.asgi import Message, Receive, Scope, Send
from broker.edge import CanonicalTarget
from connector import __main__ as connector_main
from connector.llm import Forbidden, LLMClient
from tests.recorder import Recorder
from tests.support import BrokerHandle, Stack, wait_until
from wire import Request

USER_KEY = "sk-user-trust"
LLM_KEY = "sk-llm-trust-secret"
BASE = "/base"
CONFIG = f"""
allowed_paths: [/v1/load_lora_adapter]
connectors:
  - name: lab
    token: tok-lab
    llm_api_key: {LLM_KEY}
    models: [m, reserved-m]
    allowed_paths: [/v1/only_lab]
  - name: open
    token: tok-open
"""


class Edge:
    def __init__(self, stack: Stack, llm: Recorder, canary: Recorder) -> None:
        self.stack = stack
        self.llm = llm
        self.canary = canary
        self.broker: BrokerHandle = stack.broker(CONFIG, user_keys=(USER_KEY,))
        self.host, port = self.broker.url.removeprefix("http://").split(":")
        self.port = int(port)
        stack.connector(self.broker.url, "tok-lab", llm.url + BASE, "m", "reserved-m", name="connector-lab")
        self.open_llm = stack.llm("reserved-m", "free-m", name="llm-open")
        stack.connector(self.broker.url, "tok-open", self.open_llm, "reserved-m", "free-m", name="connector-open")
        self.broker.wait_models("m", "reserved-m", "free-m", connectors=2)

    def nothing_reached_past_the_edge(self, before: int) -> None:
        assert self.canary.connections == 0 and not self.canary.requests
        assert len(self.llm.requests) == before, [r.target for r in self.llm.requests[before:]]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    stack = Stack(tmp_path_factory.mktemp("edge"))
    llm, canary = Recorder().start(), Recorder().start()
    try:
        yield Edge(stack, llm, canary)
    finally:
        stack.close()
        llm.stop()
        canary.stop()


def body_for(model: str = "m") -> bytes:
    return json.dumps({"model": model, "messages": []}).encode()


def raw_http1(edge: Edge, target: bytes, *, method: bytes = b"POST", extra: bytes = b"") -> int:
    """Send one request with exactly this target; the status (0: the connection just closed)."""
    body = body_for()
    head = (
        method + b" " + target + b" HTTP/1.1\r\nHost: " + edge.host.encode() + b"\r\n"
        b"Authorization: Bearer " + USER_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n"
    )
    with socket.create_connection((edge.host, edge.port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                return 0
            answer += data
    return int(answer.split(b" ", 2)[1])


def raw_h2(edge: Edge, target: bytes, method: bytes = b"POST") -> int | str:
    """Send one request over h2c with exactly this :path; the status, or what ended the stream."""
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    headers = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", f"{edge.host}:{edge.port}".encode()),
        (b":path", target),
        (b"authorization", b"Bearer " + USER_KEY.encode()),
        (b"content-type", b"application/json"),
    ]
    with socket.create_connection((edge.host, edge.port), timeout=10) as sock:
        conn.send_headers(1, headers)
        conn.send_data(1, body_for(), end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                return "closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamReset):
                    return "reset"
                if isinstance(event, h2.events.ConnectionTerminated):
                    return "terminated"
            sock.sendall(conn.data_to_send())


def attack_targets(canary: Recorder) -> list[bytes]:
    c = canary.host.encode()
    return [
        b"/v1/%2Fv1%2F@" + c + b"/x",
        b"%2Fv1%2F@" + c + b"/x",
        b"/v1/..%2F..%2Fapi/create",
        b"/v1/../api/create",
        b"/v1/chat/completions/../../api/create",
        b"/v1/%2e%2e/api/create",
        b"/v1/%2E%2E/%2e%2E/api/create",
        b"/v1/./chat/completions",
        b"/v1/chat/.%2e/completions",
        b"/v1\\..\\api\\create",
        b"/v1/chat%5Ccompletions",
        b"/v1/chat%5ccompletions",
        b"/v1/chat%2Fcompletions",
        b"http://" + c + b"/v1/chat/completions",
        b"//" + c + b"/v1/chat/completions",
        b"@" + c + b"/v1/chat/completions",
        b"/v1//chat/completions",
        b"/v1/chat/completions/",
        b"//v1/chat/completions",
        b"/v1/chat/completions%00",
        b"/v1/chat/completions%0d%0aHost:%20" + c,
        b"/v1/chat/completions?x=%0d%0a#frag",
        b"/v1/chat/completions?x=\x7f",
        b"/v1/chat/compl\x01etions",
        b"/v1/unknown",
        b"/v1/only_lab%2f..",
        b"*",
    ]


def test_attack_targets_over_http1_never_pass_the_edge(edge: Edge) -> None:
    before = len(edge.llm.requests)
    results = {target: raw_http1(edge, target) for target in attack_targets(edge.canary)}
    assert all(status in (400, 404) for status in results.values()), results
    edge.nothing_reached_past_the_edge(before)


def test_attack_targets_over_http2_never_pass_the_edge(edge: Edge) -> None:
    before = len(edge.llm.requests)
    results = {target: raw_h2(edge, target) for target in attack_targets(edge.canary)}
    # hypercorn's h2 stack itself resets a stream whose :path holds a control byte.
    assert all(status in (400, 404, "reset") for status in results.values()), results
    assert sum(status in (400, 404) for status in results.values()) >= len(results) - 3, results
    edge.nothing_reached_past_the_edge(before)


@pytest.mark.parametrize("method", [b"PUT", b"DELETE", b"PATCH", b"GET"])
def test_methods_outside_the_forwarded_api_get_404(edge: Edge, method: bytes) -> None:
    before = len(edge.llm.requests)
    assert raw_http1(edge, b"/v1/chat/completions", method=method) == 404
    assert raw_h2(edge, b"/v1/chat/completions", method=method) == 404
    edge.nothing_reached_past_the_edge(before)


@pytest.mark.parametrize("path", ["/api/pull", "/api/create", "/api/delete", "/api/copy", "/api/push", "/api/blobs/x"])
def test_model_management_is_refused_in_ollamas_shape(edge: Edge, path: str) -> None:
    before = len(edge.llm.requests)
    resp = httpx.post(edge.broker.url + path, json={"model": "m"}, headers={"authorization": f"Bearer {USER_KEY}"})
    assert resp.status_code == 403
    assert set(resp.json()) == {"error"} and isinstance(resp.json()["error"], str)
    edge.nothing_reached_past_the_edge(before)


def test_errors_take_the_shape_of_the_api(edge: Edge) -> None:
    url = edge.broker.url
    anthropic = httpx.post(url + "/v1/messages", json={"model": "m"}, headers={"x-api-key": "wrong"})
    assert anthropic.status_code == 401
    assert anthropic.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": anthropic.json()["error"]["message"]},
    }
    ollama = httpx.post(url + "/api/chat", json={"model": "nope"}, headers={"x-api-key": USER_KEY})
    assert ollama.status_code == 404 and set(ollama.json()) == {"error"}
    openai = httpx.post(url + "/v1/nothing-here", json={"model": "m"}, headers={"x-api-key": USER_KEY})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "not_found"


SEGMENTS = ["v1", "chat", "completions", "api", "generate", "load_lora_adapter", "only_lab", ".", "..", "%2e",
            "%2E%2e", "", "%2F", "%5C", "@127.0.0.1:1", "a%41", "x:y", "%00", "~u"]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5),
    query=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
)
def test_the_llm_receives_exactly_the_canonical_path_under_its_base_or_nothing(
    edge: Edge, segments: list[str], query: str
) -> None:
    path = "/" + "/".join(segments)
    target = path + (f"?{query}" if query else "")
    before = len(edge.llm.requests)
    status = raw_http1(edge, target.encode())
    assert edge.canary.connections == 0
    if status in (400, 404):
        assert len(edge.llm.requests) == before
        return
    assert status == 200, (target, status)
    seen = edge.llm.requests[before:]
    assert len(seen) == 1, [s.target for s in seen]
    assert seen[0].target == BASE + target
    assert seen[0].headers["host"] == edge.llm.host


def test_user_credentials_and_hop_headers_never_reach_the_llm(edge: Edge) -> None:
    before = len(edge.llm.requests)
    hostile = {
        "authorization": f"Bearer {USER_KEY}",
        "cookie": "user-session=1",
        "x-api-key": "user-second-key",
        "api-key": "azure-style-key",
        "forwarded": "for=1.2.3.4",
        "x-forwarded-for": "1.2.3.4",
        "x-forwarded-host": edge.canary.host,
        "x-real-ip": "1.2.3.4",
        "proxy-authorization": "Basic dXNlcjpwdw==",
        "origin": "http://evil.example",
        "anthropic-version": "2023-06-01",
    }
    resp = httpx.post(edge.broker.url + "/v1/chat/completions", json={"model": "m"}, headers=hostile)
    assert resp.status_code == 200
    seen = edge.llm.requests[before:]
    assert len(seen) == 1
    names = set(seen[0].headers)
    leaked = names & {"cookie", "x-api-key", "api-key", "forwarded", "x-forwarded-for", "x-forwarded-host",
                      "x-real-ip", "proxy-authorization", "origin"}  # fmt: skip
    assert not leaked, seen[0].headers
    assert seen[0].headers["authorization"] == f"Bearer {LLM_KEY}"
    assert seen[0].headers["anthropic-version"] == "2023-06-01"
    assert seen[0].headers["host"] == edge.llm.host
    # The LLM's own cookie, Alt-Svc and HSTS would act on the broker's origin: never relayed.
    assert not {"set-cookie", "alt-svc", "strict-transport-security"} & set(resp.headers)


def test_allowed_paths_top_level_and_per_connector(edge: Edge) -> None:
    headers = {"authorization": f"Bearer {USER_KEY}"}
    url = edge.broker.url
    before = len(edge.llm.requests)
    assert httpx.post(url + "/v1/load_lora_adapter", json={"model": "m"}, headers=headers).status_code == 200
    assert httpx.post(url + "/v1/only_lab", json={"model": "m"}, headers=headers).status_code == 200
    assert [s.target for s in edge.llm.requests[before:]] == [BASE + "/v1/load_lora_adapter", BASE + "/v1/only_lab"]
    # The path is the lab connector's alone: the open connector's model cannot take it.
    assert httpx.post(url + "/v1/only_lab", json={"model": "free-m"}, headers=headers).status_code == 503
    assert httpx.get(url + "/v1/only_lab", headers=headers).status_code == 404


def test_a_model_reserved_by_an_allowlist_never_goes_to_an_unrestricted_token(edge: Edge) -> None:
    tunnels = {t["name"]: t["models"] for t in edge.broker.health()["tunnels"]}  # type: ignore[index, union-attr]
    assert tunnels == {"lab": ["m", "reserved-m"], "open": ["free-m"]}
    before = len(edge.llm.requests)
    for _ in range(6):
        resp = httpx.post(edge.broker.url + "/v1/chat/completions", json={"model": "reserved-m"},
                          headers={"authorization": f"Bearer {USER_KEY}"})  # fmt: skip
        assert resp.status_code == 200
    assert len(edge.llm.requests) == before + 6
    log = edge.broker.proc.log()
    assert "connector open may not serve reserved-m" in log
    assert "connector 'open' has no models" in log


# --- the connector, against a broker that is not the one it should be -----------------------


def forged(path: str, method: str = "POST", query: str = "", headers: list[tuple[str, str]] | None = None) -> Request:
    return Request(1, method, path, query, headers or [], b"{}", "sk-llm-forged")


@pytest.mark.parametrize(
    "request_frame",
    [
        forged("/v1/%2Fv1%2F@127.0.0.1:1/x"),
        forged("@127.0.0.1:1/v1/x"),
        forged("http://127.0.0.1:1/v1/x"),
        forged("//127.0.0.1:1/v1/x"),
        forged("/v1/../api/create"),
        forged("/v1/%2e%2e/api/create"),
        forged("/v1/chat\\..\\x"),
        forged("/v1/x", method="CONNECT"),
        forged("/v1/x", method="TRACE"),
        forged("/v1/x", method="POST /evil HTTP/1.1\r\nX:"),
        forged("/v1/x", query="a=1#b"),
        forged("/v1/x", query="a=1\r\nHost: evil"),
        forged("/v1/x", headers=[("x-a", "b\r\nHost: evil")]),
        forged("/v1/x", headers=[("bad name", "b")]),
    ],
    ids=repr,
)
def test_the_connector_refuses_forged_requests_and_reaches_nothing(request_frame: Request) -> None:
    llm, canary = Recorder().start(), Recorder().start()

    async def attempt() -> None:
        client = LLMClient(llm.url + BASE)
        try:
            with pytest.raises(Forbidden):
                async with client.stream(request_frame):
                    pass
        finally:
            await client.aclose()

    try:
        asyncio.run(attempt())
        assert llm.connections == 0 and canary.connections == 0
    finally:
        llm.stop()
        canary.stop()


def test_the_connector_stays_on_its_origin_and_under_its_base() -> None:
    llm = Recorder().start()

    async def call() -> int:
        client = LLMClient(llm.url + BASE + "/v1")  # "--llm-url .../v1" takes "/v1/..." paths too
        try:
            request = forged("/v1/chat/completions", query="a=%2F", headers=[("Host", "evil")])
            async with client.stream(request) as resp:
                await resp.aread()
                return resp.status_code
        finally:
            await client.aclose()

    try:
        assert asyncio.run(call()) == 200
        assert [(s.method, s.target, s.headers["host"]) for s in llm.requests] == [
            ("POST", BASE + "/v1/chat/completions?a=%2F", llm.host)
        ]
        assert "sk-llm-forged" not in repr(forged("/x"))
    finally:
        llm.stop()


# --- users who send bodies slowly, or too much at once ---------------------------------------


@pytest.mark.slow  # (heavy: once per tox run keeps CI under 25 minutes)
def test_a_body_that_does_not_arrive_in_time_gets_408(stack: Stack) -> None:
    broker = stack.broker(CONFIG, user_keys=(USER_KEY,), env={"REMOTELLM_BODY_TIMEOUT": "1"})
    host, port = broker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + USER_KEY.encode()
            + b"\r\nContent-Length: 100\r\n\r\n{\"model\""
        )  # fmt: skip
        answer = b""
        while not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_bodies_held_at_once_are_bounded_and_the_rest_get_503(stack: Stack, tmp_path: Path) -> None:
    """40 users each start a 3.9 MB upload and stop short of its end: without a bound the broker
    would hold 156 MB; with a 16 MiB bound it holds at most that, and answers the rest 503."""
    env = {"REMOTELLM_MAX_BODY_SIZE": str(4 * 2**20), "REMOTELLM_BODY_MEMORY_LIMIT": str(16 * 2**20),
           "REMOTELLM_BODY_TIMEOUT": "60"}  # fmt: skip
    broker = stack.broker(CONFIG, user_keys=(USER_KEY,), env=env, via="module")
    host, port = broker.url.removeprefix("http://").split(":")
    baseline = rss_kib(broker.proc.pid)
    size = 3_900_000
    socks, refused = [], 0
    try:
        for _ in range(40):
            sock = socket.create_connection((host, int(port)), timeout=15)
            socks.append(sock)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + USER_KEY.encode()
                + b"\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
            )  # fmt: skip
            try:
                sock.sendall(b"x" * (size - 1000))
            except OSError:
                refused += 1  # answered 503 and closed while we were still sending
        deadline = time.monotonic() + 20
        answers = []
        for sock in socks:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                answers.append(sock.recv(200))
            except (TimeoutError, OSError):
                answers.append(b"")
        busy = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        grown_mib = (rss_kib(broker.proc.pid) - baseline) / 1024
    finally:
        for sock in socks:
            sock.close()
    assert busy >= 40 - 4, (busy, refused, answers[:6])  # at most 16 MiB / 3.9 MB held at once
    assert grown_mib < 64, f"the broker grew by {grown_mib:.0f} MiB"
    wait_until(lambda: httpx.get(broker.url + "/health").status_code == 200, what="the broker to serve")
    print(f"broker RSS grew by {grown_mib:.1f} MiB; {busy} of 40 uploads answered 503")


# --- secrets and clear text ---------------------------------------------------------------------


def test_a_key_with_edge_whitespace_stops_the_broker_at_start_without_showing_it(tmp_path: Path) -> None:
    config = tmp_path / "connectors.yaml"
    config.write_text("user_api_keys:\n  - 'sk-edge-secret '\nconnectors:\n  - token: \"\\tct-edge-secret\"\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--connector-config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert f"{config}:2:" in done.stderr and "visible ASCII" in done.stderr
    assert "edge-secret" not in done.stdout + done.stderr


def test_the_broker_warns_once_when_it_serves_a_public_address_in_clear_text(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def nothing() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def sent(message: Message) -> None:
        pass

    edge_app = CanonicalTarget(app)

    def scope(server: str, scheme: str) -> Scope:
        return {"type": "http", "path": "/health", "raw_path": b"/health", "query_string": b"", "headers": [],
                "scheme": scheme, "server": (server, 8443)}  # fmt: skip

    async def requests() -> None:
        for server, scheme in (("127.0.0.1", "http"), ("::1", "http"), ("10.1.2.3", "https"), ("10.1.2.3", "http")):
            await edge_app(scope(server, scheme), nothing, sent)
        await edge_app(scope("10.1.2.3", "http"), nothing, sent)

    with caplog.at_level(logging.WARNING, logger="remotellm.broker"):
        asyncio.run(requests())
    warnings = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert warnings == [warnings[0]] and "10.1.2.3" in warnings[0]


@pytest.mark.parametrize(
    ("url", "warned"),
    [("http://127.0.0.1:8443", False), ("http://localhost:1", False), ("https://broker.example", False),
     ("http://broker.example:8443", True), ("http://10.0.0.1:8443", True)],
)  # fmt: skip
def test_the_connector_warns_about_a_cleartext_broker_elsewhere(
    url: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="remotellm.connector"):
        connector_main._warn_cleartext(url)
    assert any("clear text" in r.getMessage() for r in caplog.records) is warned
