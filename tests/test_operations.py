"""Operating the broker: keys and connectors change at runtime, without dropping streams."""

import signal
import time

import httpx

from tests.support import Stack, free_port, wait_until

BEFORE = """
user_api_keys: [sk-old]
connectors:
  - name: one
    token: tok-one
  - name: two
    token: tok-two
    llm_api_key: sk-llm-two-old
"""
AFTER = """
user_api_keys: [sk-new]
connectors:
  - name: one
    token: tok-one
"""


def chat(url: str, key: str, **body: object) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": "m", "messages": [], **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def test_sighup_reloads_keys_and_connectors_without_dropping_streams(stack: Stack) -> None:
    broker = stack.broker(BEFORE, user_keys=(), via="module")
    stack.connector(broker.url, "tok-one", stack.llm("m", name="llm-one"), "m", name="one")
    stack.connector(broker.url, "tok-two", stack.llm("m2", name="llm-two"), "m2", name="two")
    broker.wait_models("m", "m2", connectors=2)
    assert chat(broker.url, "sk-old").status_code == 200
    assert chat(broker.url, "sk-new").status_code == 401

    body = {"model": "m", "messages": [], "stream": True, "fake": {"chunks": 30, "delay_ms": 50}}
    headers = {"authorization": "Bearer sk-old"}
    with httpx.stream("POST", broker.url + "/v1/chat/completions", json=body, headers=headers, timeout=10) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data:")
        (stack.log_dir / "broker-connectors.yaml").write_text(AFTER)
        broker.proc.signal(signal.SIGHUP)
        wait_until(lambda: chat(broker.url, "sk-new").status_code == 200, timeout=5, what="the new key")
        rest = list(lines)
    assert "data: [DONE]" in rest, "a stream was dropped by the reload"
    assert chat(broker.url, "sk-old").status_code == 401
    wait_until(lambda: broker.health()["connectors"] == 1, timeout=5, what="the revoked connector to go")
    assert [t["name"] for t in broker.health()["tunnels"]] == ["one"]
    assert "configuration reloaded" in broker.proc.log()


def test_an_edited_config_file_is_picked_up_under_plain_hypercorn(stack: Stack) -> None:
    broker = stack.broker(BEFORE, user_keys=())
    stack.connector(broker.url, "tok-one", stack.llm("m"), "m")
    broker.wait_models("m")
    (stack.log_dir / "broker-connectors.yaml").write_text(AFTER.replace("sk-new", "sk-edited"))
    wait_until(lambda: chat(broker.url, "sk-edited").status_code == 200, timeout=10, what="the edited key")
    assert chat(broker.url, "sk-old").status_code == 401


def test_a_broken_config_keeps_the_old_one(stack: Stack) -> None:
    broker = stack.broker(BEFORE, user_keys=(), via="module")
    stack.connector(broker.url, "tok-one", stack.llm("m"), "m")
    broker.wait_models("m")
    (stack.log_dir / "broker-connectors.yaml").write_text("connectors:\n  - name: x\n")
    broker.proc.signal(signal.SIGHUP)
    wait_until(lambda: "configuration not reloaded" in broker.proc.log(), timeout=5, what="the refusal")
    assert "broker-connectors.yaml:2" in broker.proc.log()
    time.sleep(0.2)
    assert chat(broker.url, "sk-old").status_code == 200


def test_models_are_listed_again_while_the_llm_changes(stack: Stack) -> None:
    """A connector started without --model follows its LLM loading a new model."""
    broker = stack.broker(BEFORE, user_keys=("sk-old",), env={"REMOTELLM_MODEL_REFRESH": "0.5"})
    port = free_port()
    first = stack.llm("m", port=port, name="llm-first")
    stack.connector(broker.url, "tok-one", first)
    broker.wait_models("m")
    stack.procs[-2].kill()
    stack.llm("m", "m-new", port=port, name="llm-second")
    broker.wait_models("m", "m-new", timeout=10)
    assert chat(broker.url, "sk-old", model="m-new").status_code == 200
