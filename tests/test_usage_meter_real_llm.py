"""connector/usage_meter.py against the real llama.cpp server (xllamacpp + SmolLM2, greedy decoding).

Each test asks llama.cpp the same question twice or three times: as the client would
(directly), and through the meter. Only fields that differ between any two requests are
normalised before comparing bytes: the completion `id`, `created`, the values of
llama.cpp's `timings` (milliseconds and cache counts) and `cached_tokens` (how much of the
prompt the previous request left in llama.cpp's cache). Nothing else is touched.
"""

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from connector.usage_meter import Usage, prepare
from tests.support import ROOT, free_port, wait_until

pytestmark = [pytest.mark.real_llm]
pytest.importorskip("xllamacpp", reason="needs xllamacpp (pip install xllamacpp)")


@pytest.fixture(scope="module")
def llm() -> Iterator[str]:
    port = free_port()
    script = ROOT / "tests" / "real_llm_server.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url, proc), timeout=60, interval=0.2, what="llama.cpp to load its model")
        yield url
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _healthy(url: str, proc: "subprocess.Popen[bytes]") -> bool:
    if proc.poll() is not None:
        pytest.skip(f"the real LLM server exited with {proc.returncode} (model file missing?)")
    return httpx.get(url + "/health", timeout=2).status_code == 200


CHAT = "/v1/chat/completions"
ASK = {
    "model": "smollm2",
    "temperature": 0,
    "max_tokens": 24,
    "messages": [{"role": "user", "content": "Name 3 fruits."}],
}


def normalised(raw: bytes) -> bytes:
    raw = re.sub(rb'"id":"[^"]*"', b'"id":"ID"', raw)
    raw = re.sub(rb'"created":\d+', b'"created":0', raw)
    raw = re.sub(rb'"cached_tokens":\d+', b'"cached_tokens":0', raw)
    return re.sub(rb'"timings":\{[^{}]*\}', b'"timings":{}', raw)


def direct(url: str, path: str, body: bytes) -> bytes:
    with httpx.stream("POST", url + path, content=body, timeout=60) as r:
        assert r.status_code == 200
        return b"".join(r.iter_raw())


def metered(url: str, path: str, body: bytes, stop_after: int | None = None) -> tuple[bytes, bytes, Usage]:
    """(what the client receives, what the LLM sent, the meter's usage); `stop_after` chunks cuts it short."""
    sent, meter = prepare("POST", path, body)
    forwarded, received = [], []
    with httpx.stream("POST", url + path, content=sent, timeout=60) as r:
        meter.start(r.status_code, r.headers.get("content-type"))
        for i, chunk in enumerate(r.iter_raw()):
            if i == stop_after:
                break  # the user hung up: the relay stops reading
            received.append(chunk)
            forwarded.append(meter.feed(chunk))
    forwarded.append(meter.close())
    return b"".join(forwarded), b"".join(received), meter.result()


def reported(raw: bytes) -> dict[str, Any]:
    """The usage llama.cpp reported in a raw body (its last `"usage":{...}`)."""
    found = re.findall(rb'"usage":\{"completion_tokens":(\d+),"prompt_tokens":(\d+)', raw)
    assert found, raw[-500:]
    completion, prompt = map(int, found[-1])
    return {"prompt": prompt, "completion": completion}


def body(**extra: Any) -> bytes:
    return httpx.Request("POST", "http://x", json={**ASK, **extra}).read()


def test_stream_without_usage_asked_reaches_the_client_as_llama_cpp_sends_it(llm: str) -> None:
    plain = direct(llm, CHAT, body(stream=True))
    assert b'"usage"' not in plain
    forwarded, received, usage = metered(llm, CHAT, body(stream=True))
    assert b'"choices":[],' in received  # the meter did ask for usage ...
    assert normalised(forwarded) == normalised(plain)  # ... and the client cannot tell
    assert usage == Usage(reported(received)["prompt"], reported(received)["completion"], "reported")
    asked = direct(llm, CHAT, body(stream=True, stream_options={"include_usage": True}))
    assert (usage.prompt_tokens, usage.completion_tokens) == tuple(reported(asked).values())


def test_stream_with_usage_asked_is_relayed_unchanged(llm: str) -> None:
    ask = body(stream=True, stream_options={"include_usage": True})
    forwarded, received, usage = metered(llm, CHAT, ask)
    assert forwarded == received
    assert normalised(forwarded) == normalised(direct(llm, CHAT, ask))
    assert usage == Usage(reported(received)["prompt"], reported(received)["completion"], "reported")


def test_json_usage(llm: str) -> None:
    forwarded, received, usage = metered(llm, CHAT, body())
    assert forwarded == received
    assert usage == Usage(reported(received)["prompt"], reported(received)["completion"], "reported")


def test_completions_and_messages_streams(llm: str) -> None:
    prompt = httpx.Request("POST", "http://x", json={**ASK, "prompt": "Fruits:", "stream": True}).read()
    forwarded, received, usage = metered(llm, "/v1/completions", prompt)
    assert normalised(forwarded) == normalised(direct(llm, "/v1/completions", prompt))
    assert usage == Usage(reported(received)["prompt"], reported(received)["completion"], "reported")
    forwarded, received, usage = metered(llm, "/v1/messages", body(stream=True))
    assert forwarded == received and b"event: message_delta" in received
    same = httpx.post(llm + CHAT, content=body(), timeout=60).json()["usage"]  # the same question, as chat
    assert usage == Usage(same["prompt_tokens"], same["completion_tokens"], "reported")


def test_cut_stream_is_estimated(llm: str) -> None:
    forwarded, received, usage = metered(llm, CHAT, body(stream=True, max_tokens=200), stop_after=6)
    assert forwarded == received[: len(forwarded)] and b'"usage"' not in forwarded
    assert usage.source == "estimated"
    assert usage.prompt_tokens >= 1 and 1 <= usage.completion_tokens <= 6


def test_responses_stream_usage(llm: str) -> None:
    fields = {"model": "smollm2", "temperature": 0, "max_output_tokens": 24, "input": "Name 3 fruits.", "stream": True}
    ask = httpx.Request("POST", "http://x", json=fields).read()
    forwarded, received, usage = metered(llm, "/v1/responses", ask)
    assert forwarded == received and b"event: response.completed" in received
    found = re.findall(rb'"usage":\{"input_tokens":(\d+),"output_tokens":(\d+)', received)
    assert usage == Usage(int(found[-1][0]), int(found[-1][1]), "reported") and usage.completion_tokens > 0
