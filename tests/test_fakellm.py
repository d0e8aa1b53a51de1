"""The fake LLM that stands in for a real one in the end-to-end tests, benchmarks and demo."""

import asyncio
import base64
import hashlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakellm.common import Exchange, Knobs, next_due
from fakellm.multipart import Multipart

ROOT = Path(__file__).resolve().parent.parent
Start = Callable[..., str]


def spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`python -m fakellm --port 0 ARGS...` and its base URL, once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakellm", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready, "fakellm did not start within 10 s"
    line = proc.stdout.readline()
    assert line.startswith("fakellm listening on http://127.0.0.1:"), line
    return proc, line.split()[-1]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes killed by PID after the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture
def start(procs: list[subprocess.Popen[str]]) -> Start:
    """Start `python -m fakellm --port 0 ARGS...`; returns its base URL. Killed by PID afterwards."""

    def run(*args: str) -> str:
        proc, url = spawn(*args)
        procs.append(proc)
        return url

    return run


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
    # Incremental: the first event came well before the last (the pauses are the server's own).
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
    assert httpx.get(state).json()["peak_streams"] == 1  # the most at once, still known after
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=chat(hang=True), timeout=0.2)
    wait_for(lambda: httpx.get(state).json()["cancelled"] == 2)
    assert httpx.post(f"{url}/_fake/reset").json()["peak_streams"] == 0


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


def test_keep_alive_serves_every_request_on_one_connection(start: Start) -> None:
    url = start()
    httpx.post(f"{url}/_fake/reset")  # (on a connection of its own, which this counts from)
    with httpx.Client(base_url=url) as client:
        for _ in range(200):
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        assert client.get("/_fake/state").json()["connections"] == 1


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


def state(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/_fake/state").json()  # type: ignore[no-any-return]


def test_chat_usage_in_streams_only_when_asked(start: Start) -> None:
    url = start()
    body = {**chat(chunks=3), "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        plain = [json.loads(e) for e in sse_data(r.iter_lines()) if e != "[DONE]"]
    assert all("usage" not in c and c["choices"] for c in plain)
    asked = {**body, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=asked) as r:
        chunks = [json.loads(e) for e in sse_data(r.iter_lines()) if e != "[DONE]"]
    assert chunks[:-1] == [{**c, "id": chunks[0]["id"], "created": chunks[0]["created"]} for c in plain]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    every = {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=every) as r:
        chunks = [json.loads(e) for e in sse_data(r.iter_lines()) if e != "[DONE]"]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3, 3]


def test_max_tokens_caps_the_reply(start: Start) -> None:
    url = start()
    body = httpx.post(f"{url}/v1/chat/completions", json={**chat(chunks=5), "max_tokens": 2}).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_responses_json_by_id_and_chaining(start: Start) -> None:
    url = start("--name", "conn-a", "--api-key", "sk")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk")
    first = client.responses.create(model="m1", input="hello there", instructions="be brief")
    assert first.id.startswith("resp_conn-a_") and first.status == "completed"
    assert first.output_text == "tok0 tok1 tok2 tok3 tok4"
    assert first.usage is not None
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.total_tokens) == (4, 5, 9)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    items = list(client.responses.input_items.list(first.id))
    assert [(i.type, i.role) for i in items] == [("message", "user")]
    second = client.responses.create(model="m1", input="more", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="m1", input="x", previous_response_id="resp_elsewhere_1")
    assert unknown.value.code == "previous_response_not_found"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    capped = client.responses.create(model="m1", input="x", max_output_tokens=2, store=False)
    assert capped.status == "incomplete" and capped.output_text == "tok0 tok1"
    assert capped.incomplete_details is not None and capped.incomplete_details.reason == "max_output_tokens"
    unstored = client.responses.create(model="m1", input="x", store=False)
    assert unstored.id not in state(url)["responses"] == [second.id]


def test_responses_stream_event_sequence(start: Start) -> None:
    url = start()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    events = list(client.responses.create(model="m1", input="hi", stream=True, extra_body={"fake": {"chunks": 2}}))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(10))
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and completed.response.output_text == "tok0 tok1"
    assert client.responses.retrieve(created.response.id).output_text == "tok0 tok1"
    with client.responses.stream(model="m1", input="hi") as stream:  # the SDK's helper too
        assert stream.get_final_response().output_text == "tok0 tok1 tok2 tok3 tok4"
    with httpx.stream("POST", f"{url}/v1/responses", json={"model": "m1", "input": "x", "stream": True}) as r:
        lines = list(r.iter_lines())
    assert lines[:2] == ["event: response.created", lines[1]] and lines[1].startswith("data: {")


def test_responses_cancel_only_in_background(start: Start) -> None:
    url = start()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    background = client.responses.create(model="m1", input="x", background=True)
    assert background.status == "in_progress"
    assert client.responses.cancel(background.id).status == "cancelled"
    done = client.responses.create(model="m1", input="x")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(done.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nobody_0")


def test_anthropic_messages_json_stream_and_count(start: Start) -> None:
    url = start("--api-key", "sk")
    client = anthropic.Anthropic(base_url=url, api_key="sk", default_headers={"anthropic-beta": "tools-2024"})
    messages: Any = [{"role": "user", "content": "hi there"}]
    reply = client.messages.create(model="m1", max_tokens=100, system="be nice", messages=messages)
    assert reply.content[0].type == "text" and reply.content[0].text == "tok0 tok1 tok2 tok3 tok4"
    assert (reply.stop_reason, reply.usage.input_tokens, reply.usage.output_tokens) == ("end_turn", 4, 5)
    with client.messages.stream(model="m1", max_tokens=3, messages=messages) as stream:
        assert "".join(stream.text_stream) == "tok0 tok1 tok2"
        final = stream.get_final_message()
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == ("max_tokens", 2, 3)
    assert client.messages.count_tokens(model="m1", messages=messages).input_tokens == 2
    seen = state(url)["last_requests"]
    assert [r["path"] for r in seen] == ["/v1/messages", "/v1/messages", "/v1/messages/count_tokens"]
    assert all(r["headers"]["anthropic-version"] and r["headers"]["anthropic-beta"] == "tools-2024" for r in seen)


def test_anthropic_key_as_x_api_key_and_errors(start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    url = start("--api-key", "sk")
    client = anthropic.Anthropic(base_url=url, api_key=None, default_headers={"x-api-key": "sk"})
    messages: Any = [{"role": "user", "content": "a b c"}]
    assert client.messages.count_tokens(model="m1", messages=messages).input_tokens == 3
    assert "authorization" not in state(url)["last_requests"][-1]["headers"]
    wrong = anthropic.Anthropic(base_url=url, api_key=None, default_headers={"x-api-key": "nope"}, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="m1", max_tokens=5, messages=messages)
    assert denied.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid api key"},
    }
    r = httpx.post(f"{url}/v1/messages", json={"model": "m1", "fake": {"status": 529}}, headers={"x-api-key": "sk"})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"


def test_anthropic_stream_cancel_reaches_the_llm(start: Start) -> None:
    url = start()
    body = {"model": "m1", "max_tokens": 100, "stream": True, "messages": [], "fake": {"chunks": 50, "delay_ms": 100}}
    with httpx.Client() as client, client.stream("POST", f"{url}/v1/messages", json=body) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: message_start"
        assert state(url)["active_streams"] == 1
    wait_for(lambda: state(url)["cancelled"] == 1)
    assert state(url)["active_streams"] == 0
    hanging = {**body, "fake": {"hang": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/messages", json=hanging, timeout=0.3)
    wait_for(lambda: state(url)["cancelled"] == 2)


def test_ollama_client(start: Start) -> None:
    url = start("--ollama", "--model", "llama3:8b")
    client = ollama.Client(host=url)
    parts = list(client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi there"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "tok0 tok1 tok2 tok3 tok4"
    assert [p.done for p in parts] == [False] * 5 + [True]
    assert (parts[-1].prompt_eval_count, parts[-1].eval_count, parts[-1].done_reason) == (2, 5, "stop")
    generated = client.generate(model="llama3:8b", prompt="say it", options={"num_predict": 2})
    assert (generated.response, generated.eval_count, generated.done_reason) == ("tok0 tok1", 2, "length")
    embedded = client.embed(model="llama3:8b", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and embedded.prompt_eval_count == 2
    assert [m.model for m in client.list().models] == ["llama3:8b"]
    assert [m.model for m in client.ps().models] == ["llama3:8b"]
    assert client.show("llama3:8b").details is not None
    assert httpx.get(f"{url}/api/version").json()["version"]
    assert len(client.embeddings(model="llama3:8b", prompt="a").embedding) == 8
    r = httpx.get(f"{url}/v1/models")  # an Ollama-only server: models come from /api/tags
    assert r.status_code == 404


def test_ollama_ndjson_on_the_wire(start: Start) -> None:
    url = start()
    with httpx.stream("POST", f"{url}/api/generate", json={"model": "m1", "prompt": "x", "fake": {"chunks": 2}}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines()]
    assert [line["response"] for line in lines] == ["tok0", " tok1", ""]
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 2
    r = httpx.post(f"{url}/api/chat", json={"model": "m1", "fake": {"status": 404}})
    assert r.status_code == 404 and r.json() == {"error": "fake status 404"}
    assert httpx.get(f"{url}/v1/models").status_code == 200  # not in Ollama mode


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


KEY = {"Authorization": "Bearer sk"}
SLOW_429 = {**KEY, "X-Fake": '{"status": 429, "head_delay_ms": 1}'}


def test_large_transcription_upload_streams_through(procs: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    proc, url = spawn("--api-key", "sk")
    procs.append(proc)
    audio = tmp_path / "speech.wav"
    block = bytes(range(256)) * 4096  # 1 MiB with NUL and non-UTF-8 bytes
    digest = hashlib.sha256()
    with audio.open("wb") as f:
        for i in range(100):
            piece = block[i:] + block[:i]
            digest.update(piece)
            f.write(piece)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk")
    client.audio.transcriptions.create(model="whisper", file=("small.wav", b"\0\xff"))  # warm up the server
    before = vm_rss_kib(proc.pid)
    with audio.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper", file=f, language="en")
    growth_mib = (vm_rss_kib(proc.pid) - before) / 1024
    assert result.text == f"speech.wav: {100 << 20} bytes, sha256 {digest.hexdigest()}"
    seen = state(url)["last_requests"][-1]
    assert seen["upload"] == {"filename": "speech.wav", "size": 100 << 20, "sha256": digest.hexdigest()}
    assert seen["form"] == {"model": "whisper", "language": "en"} and seen["model"] == "whisper"
    assert growth_mib < 16, f"fakellm grew by {growth_mib:.1f} MiB for a 100 MiB upload"
    form = {"model": "whisper", "response_format": "text"}
    r = httpx.post(f"{url}/v1/audio/translations", data=form, files={"file": ("a.mp3", b"abc")}, headers=KEY)
    assert r.headers["content-type"].startswith("text/plain") and r.text.startswith("a.mp3: 3 bytes")
    r = httpx.post(f"{url}/v1/audio/translations", data=form, files={"file": ("a", b"")}, headers=SLOW_429)
    assert r.status_code == 429  # knobs in a header, where the body is a form


def test_speech_is_deterministic_binary(start: Start) -> None:
    url = start()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    first = client.audio.speech.create(model="tts", input="hello", voice="alloy")
    again = client.audio.speech.create(model="tts", input="hello", voice="alloy")
    assert first.response.headers["content-type"] == "audio/mpeg"
    assert first.content == again.content and len(first.content) == 4096
    assert b"\0" in first.content and b"\xff" in first.content
    with pytest.raises(UnicodeDecodeError):
        first.content.decode()
    sized = client.audio.speech.create(
        model="tts", input="hello", voice="alloy", extra_body={"fake": {"bytes": 200_003}}
    )
    assert len(sized.content) == 200_003 and sized.content[:4096] == first.content


def test_rerank_and_images(start: Start) -> None:
    url = start()
    body = {"model": "r", "query": "blue sky", "documents": ["green grass", "the sky is blue", "sky"], "top_n": 2}
    ranked = httpx.post(f"{url}/v1/rerank", json={**body, "return_documents": True}).json()
    assert [r["index"] for r in ranked["results"]] == [1, 2]
    assert ranked["results"][0]["document"] == {"text": "the sky is blue"}
    assert ranked["usage"]["prompt_tokens"] == 9
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    images = client.images.generate(model="img", prompt="a cat", n=2)
    assert images.data is not None and len(images.data) == 2
    png = base64.b64decode(images.data[0].b64_json or "")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")


def test_bodies_are_recorded_exactly(start: Start) -> None:
    url = start()
    raw = b'{"model": "m1", "messages": [], "note": "\\u0000"}'
    httpx.post(f"{url}/v1/chat/completions", content=raw)
    binary = b"\x00\xff\xfe not json"
    httpx.post(f"{url}/v1/embeddings", content=binary)
    first, second = state(url)["last_requests"]
    assert first["body"] == raw.decode() and first["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert second["body"] is None and second["body_size"] == len(binary)
    assert second["body_sha256"] == hashlib.sha256(binary).hexdigest()
    httpx.get(f"{url}/v1/responses/resp_x/input_items?order=asc&limit=5")
    assert state(url)["last_requests"][-1]["query"] == "order=asc&limit=5"


def parse_form(content_type: str, pieces: list[bytes]) -> list[tuple[str, str, str | None, bytes]]:
    """Parts as (kind, name, filename, data), data events merged: their split is not meaningful."""
    form, out = Multipart(content_type), []
    for piece in pieces:
        for e in form.feed(piece):
            if e.kind == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", "", None, out[-1][3] + e.data)
            else:
                out.append((e.kind, e.name, e.filename, e.data))
    return out


FORM = httpx.Request(
    "POST", "http://x/", data={"model": "w"}, files={"file": ("a.bin", b"\r\n--\r\n--boundar\0\xff" * 50)}
)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(FORM.read())), max_size=20))
def test_multipart_parse_is_split_independent(cuts: list[int]) -> None:
    raw, ctype = FORM.read(), FORM.headers["content-type"]
    bounds = [0, *sorted(cuts), len(raw)]
    split = parse_form(ctype, [raw[a:b] for a, b in itertools.pairwise(bounds)])
    assert (
        split
        == parse_form(ctype, [raw])
        == [
            ("start", "model", None, b""),
            ("data", "", None, b"w"),
            ("end", "", None, b""),
            ("start", "file", "a.bin", b""),
            ("data", "", None, b"\r\n--\r\n--boundar\0\xff" * 50),
            ("end", "", None, b""),
        ]
    )


def test_paced_chunks_keep_to_the_clock() -> None:
    """Chunks are due ``delay`` apart from the stream's start: a sender running late by less
    than a chunk does not push the rest back; one held back longer goes on from now."""
    due = 0.0
    for now in (0.003, 0.0205, 0.047, 0.061):  # each send a little late, never a chunk
        due = next_due(due, now, 0.02)
    assert due == pytest.approx(0.08)  # the fourth chunk after the first: 4 x 20 ms
    assert next_due(0.08, 0.09, 0.02) == pytest.approx(0.1)
    assert next_due(0.08, 0.11, 0.02) == pytest.approx(0.1)  # already due: sent at once, on the clock
    assert next_due(0.08, 0.1201, 0.02) == 0.1201  # more than a chunk behind: from now
    assert next_due(0.08, 0.5, 0.02) == 0.5  # held back 420 ms: no burst of 21 chunks


class _ClockedConn:
    """A stream's connection on a clock that moves only as the stream sends and waits:
    each send takes ``lags[i]`` seconds."""

    def __init__(self, lags: list[float]) -> None:
        self.now, self.lags, self.sent = 0.0, lags, list[float]()

    def start_stream(self, ctype: bytes) -> None:
        pass

    async def send_chunk(self, chunk: bytes) -> None:
        self.sent.append(round(self.now, 6))
        self.now += self.lags[len(self.sent) - 1]

    async def idle(self, seconds: float) -> bool:
        self.now += seconds
        return False  # the client is still there

    async def end_stream(self) -> None:
        pass


def _paced(lags: list[float]) -> list[float]:
    """When each of ``len(lags)`` chunks 20 ms apart was sent, by the stream's own clock."""

    async def main() -> list[float]:
        conn, loop = _ClockedConn(lags), asyncio.get_running_loop()
        loop.time = lambda: conn.now  # type: ignore[method-assign]
        llm = types.SimpleNamespace(demo=False, active_streams=0, peak_streams=0, cancelled=0)
        exchange = Exchange(llm, conn, None, {})  # type: ignore[arg-type]
        exchange.knobs = Knobs(delay_ms=20)
        await exchange.stream(b"text/event-stream", [b"x"] * len(lags))
        return conn.sent

    return asyncio.run(main())


def test_a_paced_stream_keeps_its_pace_whatever_its_sends_cost() -> None:
    assert _paced([0.005] * 6) == pytest.approx([0, 0.02, 0.04, 0.06, 0.08, 0.1])
    # A send held up 200 ms (a user who did not read): the next goes at once, then on the pace.
    assert _paced([0.001, 0.2, 0.001, 0.001]) == pytest.approx([0, 0.02, 0.22, 0.24])
