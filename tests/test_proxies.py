"""The tunnel through real corporate proxies (issue 4): squid, tinyproxy and mitmproxy.

The connector dials the broker through a proxy; users talk to the broker directly. Each
test starts its own broker (https:// with a trustme certificate, or http://), fake LLM,
proxy and connector, and checks the proxy's own log to prove it carried the tunnel.

- squid (CONNECT for https://, absolute-form HTTP/1.1 for http://; WebSocket upgrades
  refused): routing, incremental streaming, cancel, broker restart; `--proxy` and the
  HTTPS_PROXY / HTTP_PROXY environment, and NO_PROXY.
- tinyproxy with Basic credentials in the proxy URL; tinyproxy cutting idle connections.
- mitmproxy intercepting TLS (HTTP/1.1 only), streaming or buffering whole bodies.

A test whose proxy is not installed is skipped (see tests/proxies.py for the packages).
"""

import re
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import trustme

from tests.proxies import Proxies, Proxy
from tests.support import Proc, Stack, fake_state, free_port, wait_until

pytestmark = pytest.mark.slow

USER = {"authorization": "Bearer sk-user"}
TOKEN = "tok-proxied"
CONFIG = f"connectors:\n  - name: behind-proxy\n    token: {TOKEN}\n"
MODEL = "m"
# Small ping interval and poll lifetime: a proxy that buffers the poll still passes
# frames on within a couple of seconds.
FAST = {"REMOTELLM_PING_INTERVAL": "1", "REMOTELLM_POLL_LIFETIME": "2"}
NO_PROXY_ELSEWHERE = "localhost,.example.internal"  # does not cover 127.0.0.1
TUNNEL_TIMEOUT = 10.0  # a tunnel through a proxy on loopback comes up well within this
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
TUNNEL_UP = re.compile(r"tunnel up \((HTTP/[\d.]+)[^)]*\)")  # e.g. "tunnel up (HTTP/1.1 with short polls)"


@pytest.fixture(autouse=True)
def no_inherited_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes start from this environment: a developer's own proxy settings stay out."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


@pytest.fixture
def proxies(stack: Stack) -> Iterator[Proxies]:
    started = Proxies(stack)
    yield started
    started.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


class Broker:
    def __init__(self, proc: Proc, url: str, verify: ssl.SSLContext | bool) -> None:
        self.proc = proc
        self.url = url
        self.verify = verify

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def health(self) -> dict[str, object]:
        result: dict[str, object] = httpx.get(self.url + "/health", verify=self.verify, timeout=2).json()
        return result

    def wait_models(self, *models: str, timeout: float = 15.0) -> None:
        def ready() -> bool:
            assert self.proc.alive, f"the broker exited:\n{self.proc.log()[-3000:]}"
            return set(models) <= set(self.health()["models"])  # type: ignore[call-overload]

        wait_until(ready, timeout=timeout, what=f"models {models} on the broker")

    def post(self, payload: dict[str, object], timeout: float = 20.0) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/chat/completions", json=payload, headers=USER, verify=self.verify, timeout=timeout
        )

    def stream(self, payload: dict[str, object], timeout: float = 20.0) -> AbstractContextManager[httpx.Response]:
        return httpx.stream(
            "POST",
            self.url + "/v1/chat/completions",
            json=payload,
            headers=USER,
            verify=self.verify,
            timeout=timeout,
        )


class Site:
    """How to start — and restart, on the same port — one broker, https:// or http://."""

    def __init__(self, stack: Stack, tmp_path: Path, ca: trustme.CA, scheme: str, env: dict[str, str] | None = None):
        self.stack = stack
        self.scheme = scheme
        self.env = {"REMOTELLM_USER_API_KEYS": "sk-user", **(env or {})}
        self.port = free_port()
        tmp_path = tmp_path / f"{scheme}-broker"
        tmp_path.mkdir(exist_ok=True)
        self.config = tmp_path / "connectors.yaml"
        self.config.write_text(CONFIG)
        self.cafile = tmp_path / "broker-ca.pem"  # the CA of the broker's real certificate
        ca.cert_pem.write_to_path(str(self.cafile))
        self.tls_args: list[str] = []
        self.verify: ssl.SSLContext | bool = True
        if scheme == "https":
            cert = ca.issue_cert("127.0.0.1", "localhost")
            certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
            cert.cert_chain_pems[0].write_to_path(str(certfile))
            cert.private_key_pem.write_to_path(str(keyfile))
            self.tls_args = ["--certfile", str(certfile), "--keyfile", str(keyfile)]
            self.verify = ssl.create_default_context(cafile=str(self.cafile))

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, name: str = "broker") -> Broker:
        args = [sys.executable, "-m", "broker", "--port", str(self.port), "--connector-config", str(self.config)]
        proc = self.stack.spawn(name, args + self.tls_args, self.env)
        broker = Broker(proc, self.url, self.verify)

        def serving() -> bool:
            assert proc.alive, f"the broker exited:\n{proc.log()[-3000:]}"
            return httpx.get(broker.url + "/health", verify=self.verify, timeout=1).status_code == 200

        wait_until(serving, what=f"{name} to serve")
        return broker


def start_connector(
    stack: Stack,
    broker_url: str,
    llm: str,
    *,
    proxy: str | None = None,
    ca_certs: Path | None = None,
    env: dict[str, str] | None = None,
    name: str = "connector",
) -> Proc:
    args = [sys.executable, "-m", "connector", "--broker-url", broker_url, "--token", TOKEN, "--llm-url", llm]
    args += ["--model", MODEL]
    if proxy is not None:
        args += ["--proxy", proxy]
    if ca_certs is not None:
        args += ["--ca-certs", str(ca_certs)]
    return stack.spawn(name, args, env)


def tunnel_version(connector: Proc, timeout: float = TUNNEL_TIMEOUT) -> str:
    """Wait for the connector's "tunnel up (HTTP/x ...)" line; returns the HTTP version."""
    found = wait_until(
        lambda: TUNNEL_UP.search(connector.log()),
        timeout=timeout,
        what="the connector to log 'tunnel up' (its log is printed below)",
    )
    return found.group(1)


def body(stream: bool = False, **fake: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [], "stream": stream, "fake": fake}


def proxy_mark(proxy: Proxy, broker_url: str) -> str:
    """What the proxy logs for the tunnel's traffic: a CONNECT, or the URLs it forwarded."""
    port = broker_url.rsplit(":", 1)[1]
    if broker_url.startswith("https://") and proxy.kind != "mitmproxy":
        return f"CONNECT 127.0.0.1:{port}"
    return f"127.0.0.1:{port}/tunnel/v1/"


def assert_carried(proxy: Proxy, broker_url: str) -> None:
    mark = proxy_mark(proxy, broker_url)
    wait_until(lambda: mark in proxy.traffic(), timeout=5, what=f"{proxy.kind}'s log to show {mark!r}")


def check_routing(broker: Broker, timeout: float = 20.0) -> None:
    resp = broker.post(body(), timeout=timeout)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-fake-llm"] == "llm"
    assert resp.json()["choices"][0]["message"]["content"].split()[0] == "tok0"


def stream_arrivals(broker: Broker, chunks: int, delay_ms: int, timeout: float = 20.0) -> tuple[list[float], str]:
    """Seconds from the request to each SSE event, and the streamed text."""
    started = time.monotonic()
    arrivals: list[float] = []
    text = []
    with broker.stream(body(stream=True, chunks=chunks, delay_ms=delay_ms), timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - started)
                if '"content"' in line:
                    text.append(line)
    return arrivals, "".join(text)


def check_streaming(broker: Broker, chunks: int = 10, delay_ms: int = 150) -> None:
    """The chunks reach the user spread out as the LLM made them, not all at the end."""
    arrivals, text = stream_arrivals(broker, chunks, delay_ms)
    assert f"tok{chunks - 1}" in text
    assert len(arrivals) >= chunks
    made_over = (chunks - 1) * delay_ms / 1000
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.6 * made_over, f"chunks arrived in a burst: {[round(t, 2) for t in arrivals]}"


def check_cancel(broker: Broker, llm: str) -> None:
    """A user who hangs up mid-stream cancels the call at the LLM, through the proxy."""
    with broker.stream(body(stream=True, chunks=200, delay_ms=50)) as resp:
        assert resp.status_code == 200
        assert next(resp.iter_lines()).startswith("data:")
    wait_until(lambda: fake_state(llm)["cancelled"] == 1, timeout=5, what="the LLM to see the disconnect")
    assert fake_state(llm)["active_streams"] == 0


# ---------------------------------------------------------------- squid: the main paths

EXPECTED_VERSION = {"https": "HTTP/2", "http": "HTTP/1.1"}  # an http:// broker via a proxy is HTTP/1.1


def through_squid(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str, *, via: str = "flag"
) -> tuple[Site, Broker, str, Proc, Proxy]:
    """Broker, LLM, squid and a connector that reaches the broker through squid, up and
    serving; ``via`` is "flag" (--proxy) or "env" (HTTPS_PROXY / HTTP_PROXY)."""
    squid = proxies.squid()
    site = Site(stack, tmp_path, ca, scheme)
    broker = site.start()
    llm = stack.llm(MODEL)
    ca_certs = site.cafile if scheme == "https" else None
    if via == "flag":
        connector = start_connector(stack, broker.url, llm, proxy=squid.url, ca_certs=ca_certs)
    else:
        env = {f"{scheme.upper()}_PROXY": squid.url, "NO_PROXY": NO_PROXY_ELSEWHERE}
        connector = start_connector(stack, broker.url, llm, ca_certs=ca_certs, env=env)
    assert tunnel_version(connector) == EXPECTED_VERSION[scheme]
    broker.wait_models(MODEL)
    assert_carried(squid, broker.url)
    return site, broker, llm, connector, squid


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_squid_routes_requests(stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str) -> None:
    _, broker, _, _, _ = through_squid(stack, proxies, tmp_path, ca, scheme)
    for _ in range(3):
        check_routing(broker)


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_squid_streams_incrementally(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str
) -> None:
    _, broker, _, _, _ = through_squid(stack, proxies, tmp_path, ca, scheme)
    check_streaming(broker)


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_squid_user_disconnect_cancels_the_llm_call(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str
) -> None:
    _, broker, llm, _, _ = through_squid(stack, proxies, tmp_path, ca, scheme)
    check_cancel(broker, llm)


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_squid_broker_restart_is_survived(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str
) -> None:
    site, broker, _, connector, squid = through_squid(stack, proxies, tmp_path, ca, scheme)
    mark = proxy_mark(squid, broker.url)
    broker.proc.kill()
    wait_until(lambda: "tunnel down" in connector.log(), timeout=10, what="the connector to see the broker go")
    seen_before = squid.traffic().count(mark)
    again = site.start(name="broker-again")
    again.wait_models(MODEL, timeout=30)
    check_routing(again)
    assert connector.alive
    assert connector.log().count("tunnel up") >= 2
    assert TUNNEL_UP.findall(connector.log())[-1] == EXPECTED_VERSION[scheme]
    wait_until(lambda: squid.traffic().count(mark) > seen_before, timeout=5, what="squid to carry the new tunnel")


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_squid_from_the_environment(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str
) -> None:
    """HTTPS_PROXY (https://) or HTTP_PROXY (http://), with a NO_PROXY that does not cover
    127.0.0.1 ("localhost" in it does not: no implicit loopback exception), no --proxy flag."""
    _, broker, llm, _, _ = through_squid(stack, proxies, tmp_path, ca, scheme, via="env")
    check_routing(broker)
    check_streaming(broker)
    check_cancel(broker, llm)


def test_no_proxy_covering_the_broker_goes_direct(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA
) -> None:
    squid = proxies.squid()
    broker = Site(stack, tmp_path, ca, "http").start()
    env = {"HTTP_PROXY": squid.url, "HTTPS_PROXY": squid.url, "NO_PROXY": "localhost,127.0.0.1"}
    connector = start_connector(stack, broker.url, stack.llm(MODEL), env=env)
    assert tunnel_version(connector) == "HTTP/2"  # h2c with prior knowledge: no proxy in the way
    broker.wait_models(MODEL)
    check_routing(broker)
    assert f"127.0.0.1:{broker.port}" not in squid.traffic()


def test_squid_refuses_websocket_upgrades(stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA) -> None:
    """The squid here is the corporate kind: an Upgrade: websocket never gets through."""
    squid = proxies.squid()
    broker = Site(stack, tmp_path, ca, "http").start()
    upgrade = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    direct = httpx.get(broker.url + "/health", headers=upgrade, timeout=5)
    assert direct.status_code != 200  # the broker itself sees a WebSocket handshake (and refuses it)
    with httpx.Client(proxy=squid.url, timeout=5) as client:
        proxied = client.get(broker.url + "/health", headers=upgrade)
    assert proxied.status_code == 200  # squid stripped the upgrade: a plain GET reached the broker
    assert "upgrade" not in proxied.headers.get("connection", "").lower()
    assert f"GET http://127.0.0.1:{broker.port}/health" in squid.traffic()


# ---------------------------------------------------------------- credentials in the proxy URL

PROXY_USER, PROXY_PASSWORD = "proxyuser", "pw-Zq7-s3cret"


@pytest.mark.parametrize(("scheme", "via"), [("https", "flag"), ("http", "env")])
def test_proxy_credentials_work_and_stay_out_of_the_log(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str, via: str
) -> None:
    """tinyproxy demands Basic credentials; the connector takes them from the proxy URL.

    The connector starts before the broker, so its log also holds the failed attempts:
    the password must appear in none of its lines.
    """
    proxy = proxies.tinyproxy(auth=(PROXY_USER, PROXY_PASSWORD))
    site = Site(stack, tmp_path, ca, scheme)
    llm = stack.llm(MODEL)
    ca_certs = site.cafile if scheme == "https" else None
    proxy_url = proxy.url_with_credentials(PROXY_USER, PROXY_PASSWORD)
    if via == "flag":
        connector = start_connector(stack, site.url, llm, proxy=proxy_url, ca_certs=ca_certs)
    else:
        env = {f"{scheme.upper()}_PROXY": proxy_url, "NO_PROXY": NO_PROXY_ELSEWHERE}
        connector = start_connector(stack, site.url, llm, ca_certs=ca_certs, env=env)
    wait_until(lambda: "tunnel down" in connector.log(), timeout=10, what="a failed attempt while no broker runs")
    broker = site.start()
    assert tunnel_version(connector, timeout=30) == EXPECTED_VERSION[scheme]
    broker.wait_models(MODEL)
    check_routing(broker)
    assert_carried(proxy, broker.url)
    assert PROXY_PASSWORD not in connector.log()


def test_proxy_refuses_a_connector_without_credentials(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA
) -> None:
    proxy = proxies.tinyproxy(auth=(PROXY_USER, PROXY_PASSWORD))
    site = Site(stack, tmp_path, ca, "https")
    broker = site.start()
    connector = start_connector(stack, broker.url, stack.llm(MODEL), proxy=proxy.url, ca_certs=site.cafile)
    wait_until(lambda: "407" in connector.log(), timeout=10, what="the connector to log the proxy's 407")
    assert broker.health()["connectors"] == 0
    assert "tunnel up" not in connector.log()


# ---------------------------------------------------------------- a TLS-intercepting proxy


def test_intercepting_proxy_with_its_ca(stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA) -> None:
    """mitmproxy re-signs the broker's certificate with its own CA and speaks HTTP/1.1 only;
    with --ca-certs naming that CA the tunnel comes up over HTTP/1.1 and serves."""
    site = Site(stack, tmp_path, ca, "https")
    mitm = proxies.mitmproxy(upstream_ca=site.cafile)
    broker = site.start()
    llm = stack.llm(MODEL)
    assert mitm.ca_cert is not None
    connector = start_connector(stack, broker.url, llm, proxy=mitm.url, ca_certs=mitm.ca_cert)
    assert tunnel_version(connector) == "HTTP/1.1"
    broker.wait_models(MODEL)
    assert_carried(mitm, broker.url)
    check_routing(broker)
    check_streaming(broker)
    check_cancel(broker, llm)


def test_intercepting_proxy_without_its_ca_is_refused_clearly(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA
) -> None:
    """The connector trusts the broker's real CA, but the proxy shows its own certificate."""
    site = Site(stack, tmp_path, ca, "https")
    mitm = proxies.mitmproxy(upstream_ca=site.cafile)
    broker = site.start()
    connector = start_connector(stack, broker.url, stack.llm(MODEL), proxy=mitm.url, ca_certs=site.cafile)
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in connector.log(), timeout=10, what="a verification error")
    assert connector.alive  # it keeps trying, it does not crash
    assert broker.health()["connectors"] == 0
    assert "registered" not in broker.proc.log()
    assert "tunnel up" not in connector.log()


# ---------------------------------------------------------------- a buffering proxy

BUFFERED_DEADLINE = 10.0  # seconds a request may take when every body is held to its end


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_buffering_proxy_still_completes_requests(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA, scheme: str
) -> None:
    """mitmproxy without stream_large_bodies holds every body, request and response, until
    it ends — the poll included. With a short poll lifetime requests still complete."""
    site = Site(stack, tmp_path, ca, scheme, env=FAST)
    mitm = proxies.mitmproxy(stream=False, upstream_ca=site.cafile)
    broker = site.start()
    llm = stack.llm(MODEL)
    ca_certs = mitm.ca_cert if scheme == "https" else None
    connector = start_connector(stack, broker.url, llm, proxy=mitm.url, ca_certs=ca_certs)
    assert tunnel_version(connector, timeout=20) == "HTTP/1.1"
    broker.wait_models(MODEL)
    assert_carried(mitm, broker.url)
    for _ in range(2):  # (httpx's timeout bounds each read; the deadline bounds the whole)
        started = time.monotonic()
        check_routing(broker, timeout=BUFFERED_DEADLINE)
        assert time.monotonic() - started < BUFFERED_DEADLINE
        started = time.monotonic()
        _, text = stream_arrivals(broker, chunks=5, delay_ms=50, timeout=BUFFERED_DEADLINE)
        assert "tok4" in text
        assert time.monotonic() - started < BUFFERED_DEADLINE


def test_buffering_proxy_from_the_very_first_request(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA
) -> None:
    """A request routed the moment the connector registers goes out on a poll the proxy
    holds; the connector finds the path buffers, polls short on the same session, and the
    request frame is sent again there: the request completes, once."""
    site = Site(stack, tmp_path, ca, "https", env=FAST)
    mitm = proxies.mitmproxy(stream=False, upstream_ca=site.cafile)
    broker = site.start()
    llm = stack.llm(MODEL)
    start_connector(stack, broker.url, llm, proxy=mitm.url, ca_certs=mitm.ca_cert)
    broker.wait_models(MODEL, timeout=20)  # routed at its first poll: before any detection
    started = time.monotonic()
    check_routing(broker, timeout=BUFFERED_DEADLINE)
    assert time.monotonic() - started < BUFFERED_DEADLINE
    assert fake_state(llm)["requests"] == 1


def test_a_proxy_holding_uploads_switches_replies_to_short_posts(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA
) -> None:
    """nginx in front of the broker streams responses but holds each request body until it
    is complete (its default): the poll works, streamed replies would not arrive. The
    connector notices its heartbeats go unechoed and switches to short polls and batches."""
    broker = Site(stack, tmp_path, ca, "http", env={"REMOTELLM_PING_INTERVAL": "1"}).start()
    nginx = proxies.nginx(upstream=broker.url)
    connector = start_connector(stack, nginx.url, stack.llm(MODEL))
    wait_until(lambda: "switching to short polls and batched replies" in connector.log(), timeout=15, what="it")
    wait_until(lambda: "with short polls" in connector.log(), timeout=10, what="the tunnel in short-poll mode")
    broker.wait_models(MODEL)
    started = time.monotonic()
    check_routing(broker, timeout=BUFFERED_DEADLINE)
    _, text = stream_arrivals(broker, chunks=5, delay_ms=50, timeout=BUFFERED_DEADLINE)
    assert "tok4" in text
    assert time.monotonic() - started < BUFFERED_DEADLINE
    assert "/tunnel/v1/reply" in nginx.traffic()


# ---------------------------------------------------------------- a proxy that cuts idle connections

IDLE_CUT = 3  # tinyproxy's Timeout: seconds of silence before it closes a connection
IDLE_FOR = 10.0


def cut(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_tunnel_outlives_a_proxy_that_cuts_idle_connections(
    stack: Stack, proxies: Proxies, tmp_path: Path, ca: trustme.CA
) -> None:
    """tinyproxy closes connections silent for 3 s; the broker pings every second, so the
    tunnel stays up through 10 s without requests and then serves, never reconnecting.

    Both kinds of broker at once, sharing the idle time: https:// (a CONNECT tunnel) and
    http:// (requests forwarded one by one).
    """
    proxy = proxies.tinyproxy(timeout=IDLE_CUT)
    llm = stack.llm(MODEL)
    tunnels: dict[str, tuple[Broker, Proc]] = {}
    for scheme in ("https", "http"):
        site = Site(stack, tmp_path, ca, scheme, env={"REMOTELLM_PING_INTERVAL": "1"})
        broker = site.start(name=f"broker-{scheme}")
        ca_certs = site.cafile if scheme == "https" else None
        connector = start_connector(
            stack, broker.url, llm, proxy=proxy.url, ca_certs=ca_certs, name=f"connector-{scheme}"
        )
        tunnels[scheme] = (broker, connector)
    for scheme, (broker, connector) in tunnels.items():
        assert tunnel_version(connector) == EXPECTED_VERSION[scheme], scheme
        broker.wait_models(MODEL)
        check_routing(broker)
    with socket.create_server(("127.0.0.1", 0)) as quiet, socket.create_connection(("127.0.0.1", proxy.port)) as idle:
        # The premise: a connection through this proxy that stays silent is cut.
        idle.sendall(f"CONNECT 127.0.0.1:{quiet.getsockname()[1]} HTTP/1.1\r\n\r\n".encode())
        idle.settimeout(5)
        assert b" 200 " in idle.recv(4096).split(b"\r\n")[0]
        time.sleep(IDLE_FOR)
        idle.settimeout(0.5)
        assert cut(idle), "the proxy did not cut a silent connection"
    problems = []
    for scheme, (broker, connector) in tunnels.items():
        try:
            check_routing(broker)
            check_streaming(broker, chunks=5, delay_ms=100)
            assert connector.log().count("tunnel up") == 1, "the connector had to reconnect"
            assert broker.proc.log().count("registered") == 1, "the broker saw more than one registration"
            assert_carried(proxy, broker.url)
        except (AssertionError, httpx.HTTPError) as exc:
            problems.append(f"{scheme}:// broker: {exc!r}")
    assert not problems, problems
