"""The contract's surface, end to end: openai SDK → hypercorn broker → tunnel → connector → fake LLM.

One broker, two fake LLMs and two connectors serve the whole module; tests that break
things start their own (test_resilience.py).
"""

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import BrokerHandle, Stack, free_port, metric, wait_until

USER_KEY = "sk-user"
HASHED_USER_KEY = "sk-user-hashed"
LLM_KEYS = {"alpha": "sk-llm-alpha", "beta": "sk-llm-beta"}
USER_HEADERS = {"authorization": f"Bearer {USER_KEY}"}
SECRETS = [USER_KEY, HASHED_USER_KEY, "tok-alpha", "tok-beta", *LLM_KEYS.values()]


def sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


CONFIG = f"""
user_api_keys:
  - {sha256(HASHED_USER_KEY)}
connectors:
  - name: alpha
    token: tok-alpha
    llm_api_key: {LLM_KEYS["alpha"]}
    models: [alpha-model, shared]
  - name: beta
    token: {sha256("tok-beta")}
    llm_api_key: {LLM_KEYS["beta"]}
    models: [beta-model, shared, beta-spare]
"""


class Cluster:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.llm_alpha = stack.llm("alpha-model", "shared", api_key=LLM_KEYS["alpha"], name="llm-alpha")
        self.llm_beta = stack.llm("beta-model", "shared", api_key=LLM_KEYS["beta"], name="llm-beta")
        self.broker: BrokerHandle = stack.broker(CONFIG, user_keys=(USER_KEY,))
        self.health_port = free_port()
        stack.connector(
            self.broker.url, "tok-alpha", self.llm_alpha, "alpha-model", "shared", health_port=self.health_port
        )
        # beta is started without --model: the broker discovers its models through the tunnel.
        stack.connector(self.broker.url, "tok-beta", self.llm_beta, name="connector-beta")
        self.broker.wait_models("alpha-model", "beta-model", "shared", connectors=2)
        self.client = openai.OpenAI(base_url=self.broker.url + "/v1", api_key=USER_KEY, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    stack = Stack(tmp_path_factory.mktemp("contract"))
    try:
        yield Cluster(stack)
    finally:
        stack.close()


def chat(cluster: Cluster, model: str, **fake: object) -> openai.types.chat.ChatCompletion:
    return cluster.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], extra_body={"fake": fake}
    )


def served_by(cluster: Cluster, model: str) -> str:
    raw = cluster.client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    return raw.headers["x-fake-llm"]


def test_models_lists_every_live_model(cluster: Cluster) -> None:
    ids = {model.id for model in cluster.client.models.list()}
    assert ids == {"alpha-model", "beta-model", "shared"}


def test_routes_by_model_to_the_connector_serving_it(cluster: Cluster) -> None:
    assert served_by(cluster, "alpha-model") == "llm-alpha"
    assert served_by(cluster, "beta-model") == "llm-beta"


def test_connectors_of_one_model_share_the_load(cluster: Cluster) -> None:
    seen = [served_by(cluster, "shared") for _ in range(10)]
    assert set(seen) == {"llm-alpha", "llm-beta"}
    assert min(seen.count("llm-alpha"), seen.count("llm-beta")) >= 3


def test_json_chat(cluster: Cluster) -> None:
    completion = chat(cluster, "alpha-model", chunks=4)
    assert completion.model == "alpha-model"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3"


def test_stream_arrives_chunk_by_chunk(cluster: Cluster) -> None:
    stream = cluster.client.chat.completions.create(
        model="beta-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"chunks": 10, "delay_ms": 60}},
    )
    arrivals, text = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text.append(chunk.choices[0].delta.content)
    assert len(arrivals) == 10
    assert "".join(text).split() == [f"tok{i}" for i in range(10)]
    # Ten chunks 60 ms apart: buffered, they would all land together at the end.
    assert arrivals[-1] - arrivals[0] > 0.4


def test_the_request_log_counts_every_byte_of_a_paced_stream(cluster: Cluster) -> None:
    """Chunks 20 ms apart reach the user one by one, most without waking the relay (written
    as they come): each still counts in the request's log line and in the metrics."""
    body = {"model": "alpha-model", "stream": True, "messages": [], "fake": {"chunks": 12, "delay_ms": 20}}

    def relayed() -> float:
        text = httpx.get(cluster.broker.url + "/metrics").text
        return metric(text, "remotellm_relayed_bytes_total", default=0, direction="response")  # (none before any)

    before = relayed()
    with httpx.stream("POST", cluster.broker.url + "/v1/chat/completions", json=body, headers=USER_HEADERS) as resp:
        request_id, data = resp.headers["x-request-id"], resp.read()
    assert data.count(b"data: ") == 14 and data.endswith(b"data: [DONE]\n\n")
    wait_until(lambda: f"id={request_id} " in cluster.stack.logs(), timeout=10, what="the request's log line")
    line = next(line for line in cluster.stack.logs().splitlines() if f"id={request_id} " in line)
    assert f" bytes={len(data)} " in line
    assert relayed() - before == len(data)


def test_stream_response_headers_disable_buffering(cluster: Cluster) -> None:
    body = {"model": "alpha-model", "stream": True, "messages": []}
    headers = {"authorization": f"Bearer {USER_KEY}"}
    with httpx.stream("POST", cluster.broker.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-accel-buffering"] == "no"
        assert resp.headers["cache-control"] == "no-cache"
        assert b"data: [DONE]" in resp.read()


def test_embeddings(cluster: Cluster) -> None:
    result = cluster.client.embeddings.create(model="beta-model", input=["a", "b"])
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8


def test_llm_sees_its_own_key_and_host_never_the_users(cluster: Cluster) -> None:
    completion = cluster.client.chat.completions.create(
        model="alpha-model",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"fake": {"echo_headers": True}},
        extra_headers={"origin": "https://evil.example", "x-custom": "kept"},
    )
    seen = json.loads(completion.choices[0].message.content or "{}")
    assert seen["authorization"] == f"Bearer {LLM_KEYS['alpha']}"
    assert seen["host"] == httpx.URL(cluster.llm_alpha).netloc.decode()
    assert "origin" not in seen
    assert seen["x-custom"] == "kept"
    assert USER_KEY not in json.dumps(seen)


def test_hashed_user_key_works(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.broker.url + "/v1", api_key=HASHED_USER_KEY, max_retries=0)
    assert client.chat.completions.create(model="alpha-model", messages=[]).choices


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_bad_user_key_is_401(cluster: Cluster, key: str | None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        resp = httpx.request(method, cluster.broker.url + path, json={"model": "alpha-model"}, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"messages": []}', b'{"model": 5}', b"[1, 2]", b'{"model": ""}', b'\xff\xfe{"model": "x"}'],
)
def test_bad_body_is_400(cluster: Cluster, body: bytes) -> None:
    resp = httpx.post(
        cluster.broker.url + "/v1/chat/completions", content=body, headers={"authorization": f"Bearer {USER_KEY}"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_request"


def test_unknown_model_is_404(cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        chat(cluster, "no-such-model")
    assert caught.value.code == "model_not_found"


def test_allowlisted_model_without_connector_is_503(cluster: Cluster) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        chat(cluster, "beta-spare")
    assert caught.value.status_code == 503
    assert caught.value.code == "model_unavailable"


def test_oversize_body_is_413_and_tunnel_survives(cluster: Cluster) -> None:
    body = b'{"model": "alpha-model", "pad": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    resp = httpx.post(
        cluster.broker.url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {USER_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert chat(cluster, "alpha-model").choices


def test_large_request_and_response_bodies_pass_intact(cluster: Cluster) -> None:
    completion = chat(cluster, "alpha-model", bytes=3_000_000)
    assert len(completion.choices[0].message.content or "") >= 3_000_000


def test_early_answers_do_not_break_an_h2_connection(cluster: Cluster) -> None:
    """hypercorn #329: a response sent before the body was read used to kill the connection."""
    big = b'{"model": "alpha-model", "pad": "' + b"y" * 2_000_000 + b'"}'
    with httpx.Client(http1=False, http2=True, timeout=20) as client:
        url = cluster.broker.url + "/v1/chat/completions"
        assert client.post(url, content=big).status_code == 401
        bad_model = big.replace(b"alpha-model", b"nope-model")
        assert client.post(url, content=bad_model, headers={"authorization": f"Bearer {USER_KEY}"}).status_code == 404
        ok = client.post(url, content=big, headers={"authorization": f"Bearer {USER_KEY}"})
        assert ok.status_code == 200
        assert ok.http_version == "HTTP/2"


def test_health_has_counts_tunnels_and_no_secret(cluster: Cluster) -> None:
    resp = httpx.get(cluster.broker.url + "/health")
    health = resp.json()
    assert {k: health[k] for k in ("status", "connectors", "models")} == {
        "status": "ok",
        "connectors": 2,
        "models": ["alpha-model", "beta-model", "shared"],
    }
    tunnels = {t["name"]: t for t in health["tunnels"]}
    assert tunnels["alpha"]["models"] == ["alpha-model", "shared"]
    assert tunnels["beta"]["models"] == ["beta-model", "shared"]
    assert {t["protocol"] for t in tunnels.values()} == {"h2"}
    assert tunnels["alpha"]["in_flight"] == 0
    assert tunnels["alpha"]["connected_since"].endswith("+00:00")
    for secret in SECRETS:
        assert secret not in resp.text


def test_connector_health(cluster: Cluster) -> None:
    health = httpx.get(f"http://127.0.0.1:{cluster.health_port}/health").json()
    assert health["status"] == "ok"
    assert health["connected"] is True
    assert health["broker_url"] == cluster.broker.url
    assert health["models"] == ["alpha-model", "shared"]
    assert health["protocol"] == "HTTP/2"
    assert health["last_error"] == ""


def test_metrics(cluster: Cluster) -> None:
    chat(cluster, "alpha-model")
    httpx.post(cluster.broker.url + "/v1/chat/completions", json={"model": "alpha-model"})  # no key
    httpx.post(cluster.broker.url + "/v1/chat/completions", json={"model": "attacker-chosen"}, headers=USER_HEADERS)
    text = httpx.get(cluster.broker.url + "/metrics").text
    assert 'remotellm_requests_total{connector="alpha",model="alpha-model",status="200"}' in text
    assert 'remotellm_requests_total{connector="-",model="_unrouted",status="404"}' in text
    assert "attacker-chosen" not in text
    assert 'remotellm_connectors_connected{protocol="h2"} 2.0' in text
    assert "remotellm_requests_in_flight 0.0" in text
    assert "remotellm_requests_queued 0.0" in text
    assert 'remotellm_auth_failures_total{kind="user"}' in text
    assert 'remotellm_tunnel_registrations_total{connector="alpha"} 1.0' in text
    assert 'remotellm_relayed_bytes_total{direction="response"}' in text
    assert 'remotellm_time_to_first_byte_seconds_bucket{le="0.005",model="alpha-model"}' in text
    assert 'remotellm_request_duration_seconds_count{model="alpha-model"}' in text
    for secret in SECRETS:
        assert secret not in text


def test_no_secret_in_any_log(cluster: Cluster) -> None:
    chat(cluster, "alpha-model")
    logs = cluster.stack.logs()
    assert "registered" in logs
    for secret in SECRETS:
        assert secret not in logs


def test_wrong_connector_token_is_refused(stack: Stack) -> None:
    broker = stack.broker(CONFIG)
    llm = stack.llm("alpha-model")
    intruder = stack.connector(broker.url, "tok-wrong", llm, "alpha-model")
    wait_until(lambda: "register answered 401" in intruder.log(), what="the refusal")
    assert broker.health()["connectors"] == 0
    assert "tok-wrong" not in stack.logs().replace("--token tok-wrong", "")


def test_model_outside_allowlist_is_refused(stack: Stack) -> None:
    broker = stack.broker(CONFIG)
    llm = stack.llm("beta-model", "forbidden")
    refused = stack.connector(broker.url, "tok-beta", llm, "beta-model", "forbidden")
    wait_until(lambda: "may not serve: forbidden" in refused.log(), what="the refusal")
    assert broker.health()["connectors"] == 0
    # Discovery filters the LLM's list through the allowlist instead of refusing.
    stack.connector(broker.url, "tok-beta", llm, name="discovering")
    broker.wait_models("beta-model", connectors=1)
    assert broker.health()["models"] == ["beta-model"]


def test_python_m_broker_with_cli_flags(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "connectors.yaml"
    config.write_text(CONFIG)
    port = free_port()
    proc = stack.spawn(
        "broker-cli",
        [
            sys.executable, "-m", "broker", "--port", str(port), "--user-api-key", "sk-cli-1",
            "--user-api-key", "sk-cli-2", "--connector-config", str(config), "--log-format", "json",
        ],
    )  # fmt: skip
    broker = BrokerHandle(proc, f"http://127.0.0.1:{port}")
    broker.wait_serving()
    url = broker.url
    stack.connector(url, "tok-alpha", stack.llm("alpha-model"), "alpha-model")
    broker.wait_models("alpha-model")
    for key in ("sk-cli-1", "sk-cli-2", HASHED_USER_KEY):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
        assert client.chat.completions.create(model="alpha-model", messages=[]).choices
    access = [line for line in proc.log().splitlines() if "remotellm.access" in line]
    assert json.loads(access[-1].split("remotellm.access ", 1)[1])["status"] == 200


def test_broker_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("connectors:\n  - name: x\n")
    result = subprocess.run(
        [sys.executable, "-m", "broker", "--connector-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 2
    assert "bad.yaml:2" in result.stderr and "token is required" in result.stderr


def test_request_id_travels_to_the_llm_and_back(cluster: Cluster) -> None:
    raw = cluster.client.chat.completions.with_raw_response.create(
        model="alpha-model",
        messages=[],
        extra_body={"fake": {"echo_headers": True}},
        extra_headers={"x-request-id": "trace-123"},
    )
    assert raw.headers["x-request-id"] == "trace-123"
    seen = json.loads(raw.parse().choices[0].message.content or "{}")
    assert seen["x-request-id"] == "trace-123"
    generated = cluster.client.chat.completions.with_raw_response.create(model="alpha-model", messages=[])
    assert len(generated.headers["x-request-id"]) == 16


def test_overhead_header_excludes_the_llms_time(cluster: Cluster) -> None:
    raw = cluster.client.chat.completions.with_raw_response.create(
        model="alpha-model", messages=[], extra_body={"fake": {"head_delay_ms": 300}}
    )
    overhead = float(raw.headers["x-remotellm-overhead-ms"])
    assert 0 <= overhead < 100
