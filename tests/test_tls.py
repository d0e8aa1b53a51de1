"""TLS: `python -m broker --certfile --keyfile` speaks HTTP/2 by ALPN to users and connectors."""

import ssl
import sys
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from tests.support import BrokerHandle, Stack, free_port, wait_until

CONFIG = "connectors:\n  - name: tls\n    token: tok-tls\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def trusting(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))


def start_tls_broker(stack: Stack, tmp_path: Path, ca: trustme.CA) -> BrokerHandle:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, config = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "connectors.yaml"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    config.write_text(CONFIG)
    port = free_port()
    args = [sys.executable, "-m", "broker", "--port", str(port), "--user-api-key", "sk-user"]
    args += ["--certfile", str(certfile), "--keyfile", str(keyfile), "--connector-config", str(config)]
    proc = stack.spawn("broker-tls", args)
    broker = BrokerHandle(proc, f"https://127.0.0.1:{port}")
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    wait_until(lambda: httpx.get(broker.url + "/health", verify=trusting(tmp_path), timeout=1), what="the TLS broker")
    return broker


def test_https_broker_with_ca_certs(stack: Stack, tmp_path: Path, ca: trustme.CA) -> None:
    broker = start_tls_broker(stack, tmp_path, ca)
    cafile = str(tmp_path / "ca.pem")
    connector = stack.spawn(
        "connector",
        [
            sys.executable, "-m", "connector", "--broker-url", broker.url, "--token", "tok-tls",
            "--llm-url", stack.llm("m"), "--model", "m", "--ca-certs", cafile,
        ],
    )  # fmt: skip
    wait_until(lambda: "tunnel up (HTTP/2)" in connector.log(), what="an HTTP/2 tunnel over TLS")
    with httpx.Client(http2=True, verify=trusting(tmp_path)) as user:
        resp = user.post(
            broker.url + "/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"authorization": "Bearer sk-user"},
        )
    assert resp.status_code == 200
    assert resp.http_version == "HTTP/2"
    client = openai.OpenAI(
        base_url=broker.url + "/v1",
        api_key="sk-user",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=trusting(tmp_path)),
    )
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).split()[0] == "tok0"


def test_connector_refuses_an_untrusted_certificate(stack: Stack, tmp_path: Path, ca: trustme.CA) -> None:
    broker = start_tls_broker(stack, tmp_path, ca)
    connector = stack.connector(broker.url, "tok-tls", stack.llm("m"), "m")
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in connector.log(), what="a verification error")
    health = httpx.get(broker.url + "/health", verify=trusting(tmp_path)).json()
    assert health["connectors"] == 0
