"""The fake LLM that stands in for a real one in the end-to-end tests, benchmarks and demo."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
Start = Callable[..., str]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start `python -m fakellm --port 0 ARGS...`; returns its base URL. Killed by PID afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def run(*args: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fakellm", "--port", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "fakellm did not start within 10 s"
        line = proc.stdout.readline()
        assert line.startswith("fakellm listening on http://127.0.0.1:"), line
        return line.split()[-1]

    yield run
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_for(check: Callable[[], Any], timeout: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


def chat(**fake: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi there"}], "fake": fake}


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    return (line.removeprefix("data: ") for line in lines if line.startswith("data: "))


def test_models_list(start: Start) -> None:
    url = start("--model", "m1", "--model", "m2", "--name", "one")
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 200
    assert r.headers["x-fake-llm"] == "one"
    assert r.json() == {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fakellm"} for m in ("m1", "m2")],
    }


def test_chat_json(start: Start) -> None:
    url = start()
    body = httpx.post(f"{url}/v1/chat/completions", json=chat(chunks=3)).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_completions_json_and_stream(start: Start) -> None:
    url = start()
    req = {"model": "m1", "prompt": "say", "fake": {"chunks": 2}}
    body = httpx.post(f"{url}/v1/completions", json=req).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok0 tok1"
    with httpx.stream("POST", f"{url}/v1/completions", json={**req, "stream": True}) as r:
        events = list(sse_data(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "tok0 tok1"


def test_stream_arrives_incrementally(start: Start) -> None:
    url = start()
    arrivals: list[float] = []
    texts: list[str] = []
    t0 = time.monotonic()
    body = {**chat(chunks=5, delay_ms=80), "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        for event in sse_data(r.iter_lines()):
            arrivals.append(time.monotonic() - t0)
            texts.append(event)
    assert texts[-1] == "[DONE]"
    chunks = [json.loads(t) for t in texts[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m1" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == (
        "tok0 tok1 tok2 tok3 tok4"
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert arrivals[0] < 0.2
    assert arrivals[-1] - arrivals[0] > 0.3


def test_embeddings(start: Start) -> None:
    url = start()
    one = httpx.post(f"{url}/v1/embeddings", json={"model": "e", "input": "hello"}).json()
    many = httpx.post(f"{url}/v1/embeddings", json={"model": "e", "input": ["hello", "world"]}).json()
    assert one["object"] == "list" and one["model"] == "e"
    assert [d["index"] for d in many["data"]] == [0, 1]
    vectors = [d["embedding"] for d in many["data"]]
    assert all(len(v) == 8 and all(isinstance(x, float) for x in v) for v in vectors)
    assert vectors[0] == one["data"][0]["embedding"] != vectors[1]
    assert many["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_api_key(start: Start) -> None:
    url = start("--api-key", "sekrit")
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "message": "invalid api key",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/_fake/state").json()["requests"] == 4


def test_errors(start: Start) -> None:
    url = start()
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(status=429))
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "fake_status"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{url}/v1/chat/completions", json=chat(chunkz=1)).status_code == 400
    r = httpx.get(f"{url}/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_die_after_truncates_stream(start: Start) -> None:
    url = start()
    events: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat(chunks=10, die_after=3), "stream": True}) as r,
    ):
        events.extend(sse_data(r.iter_lines()))
    assert len(events) == 3


def test_client_hangup_counts_as_cancelled(start: Start) -> None:
    url = start()
    state = f"{url}/_fake/state"
    with httpx.Client() as client:
        body = {**chat(chunks=100, delay_ms=50), "stream": True}
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            events = sse_data(r.iter_lines())  # keep a reference: closing the iterator closes the stream
            next(events)
            assert httpx.get(state).json()["active_streams"] == 1
    wait_for(lambda: httpx.get(state).json()["cancelled"] == 1)
    assert httpx.get(state).json()["active_streams"] == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=chat(hang=True), timeout=0.2)
    wait_for(lambda: httpx.get(state).json()["cancelled"] == 2)


def test_echo_headers_and_state(start: Start) -> None:
    url = start()
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(echo_headers=True), headers={"X-Probe": "yes"})
    echoed = json.loads(r.json()["choices"][0]["message"]["content"])
    assert echoed["x-probe"] == "yes"
    state = httpx.get(f"{url}/_fake/state").json()
    assert state["requests"] == 1
    assert state["last_requests"][0]["model"] == "m1"
    assert state["last_requests"][0]["path"] == "/v1/chat/completions"
    assert state["last_requests"][0]["headers"]["x-probe"] == "yes"
    reset = httpx.post(f"{url}/_fake/reset").json()
    assert reset["requests"] == 0 and reset["last_requests"] == []


def test_chunked_request_body_and_padding(start: Start) -> None:
    url = start()
    raw = json.dumps(chat(bytes=5000)).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=iter([raw[:10], raw[10:]]))
    assert r.request.headers["transfer-encoding"] == "chunked"
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith("tok0") and len(content) == 5000


def test_keep_alive_is_fast(start: Start) -> None:
    url = start()
    with httpx.Client(base_url=url) as client:
        t0 = time.monotonic()
        for _ in range(200):
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        assert time.monotonic() - t0 < 1.5


def test_demo_mode_and_sigterm(start: Start) -> None:
    url = start("--demo")
    body = {"model": "demo", "messages": [], "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        events = [json.loads(e) for e in sse_data(r.iter_lines()) if e != "[DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert "remotellm demo model" in text
    proc = subprocess.Popen([sys.executable, "-m", "fakellm"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and select.select([proc.stdout], [], [], 10)[0]
        assert proc.stdout.readline().startswith("fakellm listening on ")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
