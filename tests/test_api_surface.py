"""The API families beyond chat, through the bridge, with their real client libraries.

Two fake LLMs (fakellm, which stores the Responses it creates) serve the same model
through two connectors, so a by-id route that reached the wrong one would fail.
"""

from collections.abc import Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.support import BrokerHandle, Stack, fake_state, wait_until

USER_KEY = "sk-user-api"
CONFIG = """
connectors:
  - name: conn-a
    token: tok-a
    models: [shared, solo]
  - name: conn-b
    token: tok-b
    models: [shared]
  - name: conn-ollama
    token: tok-o
    models: [llama3.2:1b]
"""


class Surface:
    def __init__(self, stack: Stack) -> None:
        self.llm_a = stack.llm("shared", "solo", name="llm-a")
        self.llm_b = stack.llm("shared", name="llm-b")
        self.broker: BrokerHandle = stack.broker(CONFIG, user_keys=(USER_KEY,))
        stack.connector(self.broker.url, "tok-a", self.llm_a, "shared", "solo", name="connector-a")
        stack.connector(self.broker.url, "tok-b", self.llm_b, "shared", name="connector-b")
        # Started without --model before an Ollama-only server: found through /api/tags.
        self.llm_o = stack.llm("llama3.2:1b", name="llm-o", ollama=True)
        stack.connector(self.broker.url, "tok-o", self.llm_o, name="connector-o")
        self.broker.wait_models("shared", "solo", "llama3.2:1b", connectors=3)
        self.openai = openai.OpenAI(base_url=self.broker.url + "/v1", api_key=USER_KEY, max_retries=0, timeout=20)

    def state(self, llm: str) -> dict[str, object]:
        return fake_state(llm)


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    stack = Stack(tmp_path_factory.mktemp("surface"))
    try:
        yield Surface(stack)
    finally:
        stack.close()


# --- Responses: by-id routes go to the connector that created the response -----------------


def test_responses_by_id_reach_the_connector_that_created_them(surface: Surface) -> None:
    created = [surface.openai.responses.create(model="shared", input="hello") for _ in range(6)]
    makers = {r.id.split("_")[1] for r in created}
    assert makers == {"llm-a", "llm-b"}, "both connectors should have created some"
    for response in created:
        assert surface.openai.responses.retrieve(response.id).id == response.id
        items = surface.openai.responses.input_items.list(response.id)
        assert items.data
    deleted = surface.openai.responses.delete(created[0].id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        surface.openai.responses.retrieve(created[0].id)  # gone at its LLM, which answers 404


def test_previous_response_id_chains_on_the_same_connector(surface: Surface) -> None:
    first = surface.openai.responses.create(model="shared", input="one")
    previous = first
    for _ in range(5):  # round robin would send half of these elsewhere, where the id is unknown
        previous = surface.openai.responses.create(model="shared", input="again", previous_response_id=previous.id)
        assert previous.id.split("_")[1] == first.id.split("_")[1]


def test_a_streamed_response_is_remembered_from_its_first_event(surface: Surface) -> None:
    with surface.openai.responses.stream(model="shared", input="stream me") as stream:
        final = stream.get_final_response()
    assert surface.openai.responses.retrieve(final.id).id == final.id


def test_an_unknown_response_id_is_404_at_the_broker(surface: Surface) -> None:
    before = [surface.state(url)["requests"] for url in (surface.llm_a, surface.llm_b)]
    with pytest.raises(openai.NotFoundError) as caught:
        surface.openai.responses.retrieve("resp_nobody_1")
    assert caught.value.response.json()["error"]["code"] == "not_found"
    assert [surface.state(url)["requests"] for url in (surface.llm_a, surface.llm_b)] == before


# --- Anthropic Messages ----------------------------------------------------------------------


def test_messages_json_stream_and_count_tokens_with_the_anthropic_sdk(surface: Surface) -> None:
    client = anthropic.Anthropic(base_url=surface.broker.url, api_key=USER_KEY, max_retries=0, timeout=20)
    message = client.messages.create(model="solo", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.usage.output_tokens > 0
    with client.messages.stream(model="solo", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
    assert text
    counted = client.messages.count_tokens(model="solo", messages=[{"role": "user", "content": "hi there"}])
    assert counted.input_tokens > 0
    seen = surface.state(surface.llm_a)["last_requests"]
    assert isinstance(seen, list) and seen[-1]["headers"].get("anthropic-version")


def test_messages_with_the_key_as_x_api_key_and_anthropic_shaped_errors(surface: Surface) -> None:
    url = surface.broker.url + "/v1/messages"
    body = {"model": "solo", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    ok = httpx.post(url, json=body, headers={"x-api-key": USER_KEY, "anthropic-version": "2023-06-01"})
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    missing = httpx.post(url, json={**body, "model": "nope"}, headers={"x-api-key": USER_KEY})
    assert missing.status_code == 404
    assert missing.json()["type"] == "error" and missing.json()["error"]["type"] == "not_found_error"


def test_a_messages_stream_cancelled_after_its_first_event_is_cancelled_at_the_llm(surface: Surface) -> None:
    before = surface.state(surface.llm_a)["cancelled"]
    body = {"model": "solo", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "fake": {"chunks": 1000, "delay_ms": 20}}  # fmt: skip
    with httpx.stream("POST", surface.broker.url + "/v1/messages", json=body, headers={"x-api-key": USER_KEY}) as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                break  # Claude Code often does this: read the first event, then go
    wait_until(lambda: surface.state(surface.llm_a)["cancelled"] == before + 1, what="the cancel at the LLM")  # type: ignore[operator]


# --- Ollama's native API ------------------------------------------------------------------------


def test_the_ollama_client_lists_chats_generates_and_embeds(surface: Surface) -> None:
    client = ollama.Client(host=surface.broker.url, headers={"authorization": f"Bearer {USER_KEY}"})
    assert sorted(m.model for m in client.list().models) == ["llama3.2:1b", "shared", "solo"]
    assert sorted(m.model for m in client.ps().models) == ["llama3.2:1b", "shared", "solo"]
    ollama_only = client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}])
    assert ollama_only.message.content
    parts = [p.message.content for p in client.chat(model="solo", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True)]  # fmt: skip
    assert len(parts) > 1 and "".join(parts)
    assert client.generate(model="solo", prompt="hi").response
    assert client.embed(model="solo", input="hi").embeddings
    version = httpx.get(surface.broker.url + "/api/version", headers={"x-api-key": USER_KEY})
    assert version.status_code == 200 and version.json()["version"]


def test_ollama_routes_need_a_key_and_answer_in_ollamas_shape(surface: Surface) -> None:
    for path in ("/api/tags", "/api/ps", "/api/version"):
        resp = httpx.get(surface.broker.url + path)
        assert resp.status_code == 401 and set(resp.json()) == {"error"}


# --- rerank, images, speech ----------------------------------------------------------------


def test_rerank_images_and_speech_are_relayed(surface: Surface) -> None:
    headers = {"authorization": f"Bearer {USER_KEY}"}
    rerank = httpx.post(surface.broker.url + "/v1/rerank", headers=headers,
                        json={"model": "solo", "query": "q", "documents": ["a", "b"]})  # fmt: skip
    assert rerank.status_code == 200 and rerank.json()["results"]
    image = surface.openai.images.generate(model="solo", prompt="a cat")
    assert image.data and image.data[0].b64_json
    direct = httpx.post(surface.llm_a + "/v1/audio/speech", json={"model": "solo", "input": "hi"})
    speech = surface.openai.audio.speech.create(model="solo", input="hi", voice="alloy")
    assert speech.content == direct.content and b"\x00" in speech.content
