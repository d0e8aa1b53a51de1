"""connector/usage_meter.py fed bytes as an LLM sends them, split anywhere, and hostile input."""

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.usage_meter import MAX_EVENT, Usage, UsageMeter, prepare

CHAT = "/v1/chat/completions"
HEAD = '"created":1,"id":"chatcmpl-1","model":"m","system_fingerprint":"b0","object":"chat.completion.chunk"'
TIMINGS = '"timings":{"prompt_n":3,"predicted_ms":2.5}'


def chunk(choices: str, tail: str = "") -> bytes:
    return f'data: {{"choices":[{choices}],{HEAD}{tail}}}\n\n'.encode()


DELTAS = [
    chunk('{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}'),
    chunk('{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}'),
    chunk('{"finish_reason":null,"index":0,"delta":{"content":" world"}}'),
]
FINISH = '{"finish_reason":"stop","index":0,"delta":{}}'
USAGE = ',"usage":{"completion_tokens":2,"prompt_tokens":7,"total_tokens":9}'
# What llama.cpp sends without include_usage: `timings` in the finish chunk ...
PLAIN = b"".join([*DELTAS, chunk(FINISH, "," + TIMINGS), b"data: [DONE]\n\n"])
# ... and with it: `timings` moves to a last chunk with no choices, after the usage.
WITH_USAGE = b"".join([*DELTAS, chunk(FINISH), chunk("", USAGE + "," + TIMINGS), b"data: [DONE]\n\n"])
STREAM_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi there you"}],"stream":true}'


def run(meter: UsageMeter, pieces: list[bytes], ctype: str = "text/event-stream", status: int = 200) -> bytes:
    meter.start(status, ctype)
    return b"".join(meter.feed(p) for p in pieces) + meter.close()


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def stripping_meter() -> UsageMeter:
    body, meter = prepare("POST", CHAT, STREAM_BODY)
    assert meter.strip and json.loads(body)["stream_options"] == {"include_usage": True}
    return meter


def test_prepare_adds_include_usage_preserving_every_value() -> None:
    raw = b'{"model": "m", "stream": true, "n": 1.50e1, "s": "\\u00e9\\n", "messages": []}'
    body, meter = prepare("POST", CHAT, raw)
    assert meter.strip
    assert body == b'{"model":"m","stream":true,"n":1.50e1,"s":"\\u00e9\\n","messages":[],' + (
        b'"stream_options":{"include_usage":true}}'
    )
    for options in (b"{}", b'{"include_usage": false}', b"null", b'{"continuous_usage_stats": true}'):
        body, meter = prepare("POST", "/v1/completions", b'{"stream":true,"stream_options":%s}' % options)
        assert meter.strip and json.loads(body)["stream_options"]["include_usage"] is True
    assert json.loads(prepare("POST", CHAT, b'{"stream":true,"stream_options":{"x":1}}')[0])["stream_options"] == {
        "x": 1,
        "include_usage": True,
    }


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("POST", CHAT, b'{"stream":true,"stream_options":{"include_usage":true}}'),  # the client asked itself
        ("POST", CHAT, b'{"stream":false}'),
        ("POST", CHAT, b'{"messages":[]}'),
        ("POST", CHAT, b'{"stream":"true"}'),
        ("POST", CHAT, b'{"stream":true,"stream_options":[1]}'),
        ("POST", CHAT, b"[1, 2]"),
        ("POST", CHAT, b"\xff\xfe not json"),
        ("POST", "/v1/messages", b'{"stream":true}'),
        ("POST", "/api/chat", b'{"stream":true}'),
        ("GET", "/v1/models", b""),
    ],
)
def test_prepare_leaves_other_bodies_alone(method: str, path: str, raw: bytes) -> None:
    body, meter = prepare(method, path, raw)
    assert body is raw and not meter.strip


@settings(max_examples=300)
@given(cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_stripped_stream_equals_what_the_llm_sends_unasked(cuts: list[int]) -> None:
    """The usage chunk is dropped, and the fields the LLM moved into it go back where they were."""
    meter = stripping_meter()
    assert run(meter, split(WITH_USAGE, cuts)) == PLAIN
    assert meter.result() == Usage(7, 2, "reported")


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_stream_the_client_asked_usage_for_is_untouched(cuts: list[int]) -> None:
    _, meter = prepare("POST", CHAT, b'{"stream":true,"stream_options":{"include_usage":true}}')
    pieces = split(WITH_USAGE, cuts)
    meter.start(200, "text/event-stream; charset=utf-8")
    assert [meter.feed(p) for p in pieces] == pieces  # forwarded at once, chunk for chunk
    assert meter.close() == b""
    assert meter.result() == Usage(7, 2, "reported")


def test_openai_usage_null_on_every_chunk_is_removed() -> None:
    """OpenAI itself adds `"usage":null` to each chunk once usage is asked for."""
    unasked = [b'data: {"id":"c","choices":[{"delta":{"content":"x"},"finish_reason":null}]}\n\n']
    unasked.append(b'data: {"id":"c","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n')
    asked = [c.replace(b"]}\n", b'],"usage":null}\n') for c in unasked]
    asked.append(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n')
    meter = stripping_meter()
    assert run(meter, [*asked, b"data: [DONE]\n\n"]) == b"".join([*unasked, b"data: [DONE]\n\n"])
    assert meter.result() == Usage(4, 1, "reported")


def test_usage_on_every_chunk_counts_a_cut_stream_exactly() -> None:
    """vLLM's continuous_usage_stats: the last usage seen is what was delivered."""
    chunks = [
        chunk(f'{{"index":0,"delta":{{"content":"word{i} "}}}}', USAGE.replace(":2,", f":{i + 1},")) for i in range(3)
    ]
    meter = stripping_meter()
    run(meter, chunks)  # cut before the finish chunk
    assert meter.result() == Usage(7, 3, "estimated")


def test_cut_stream_without_usage_is_estimated_from_delivered_text() -> None:
    meter = stripping_meter()
    assert run(meter, [*DELTAS, b'data: {"choices":[{"delta":{"content":"par']) == b"".join(DELTAS) + (
        b'data: {"choices":[{"delta":{"content":"par'
    )
    assert meter.result() == Usage(3, 3, "estimated")  # "hi there you" and "Hello world": 12 and 11 chars / 4


def anthropic_stream() -> bytes:
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {"message": {"usage": {"input_tokens": 1, "cache_read_input_tokens": 30, "output_tokens": 0}}},
        ),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hello there"}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
        ("message_stop", {}),
    ]
    return b"".join(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode() for name, data in events)


def responses_stream() -> bytes:
    usage = {"input_tokens": 31, "output_tokens": 3, "total_tokens": 34}
    events = [
        {"type": "response.created", "response": {"id": "r", "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hello!"},
        {"type": "response.completed", "response": {"id": "r", "usage": usage}},
    ]
    return b"".join(f"event: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n".encode() for e in events)


def ollama_stream() -> bytes:
    lines = [{"message": {"role": "assistant", "content": c}, "done": False} for c in ("Hi", " you")]
    lines.append(
        {"message": {"role": "assistant", "content": ""}, "done": True, "prompt_eval_count": 26, "eval_count": 2}
    )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@settings(max_examples=100)
@given(cuts=st.lists(st.integers(min_value=0), max_size=10))
@pytest.mark.parametrize(
    ("path", "ctype", "raw", "usage"),
    [
        ("/v1/messages", "text/event-stream", anthropic_stream(), Usage(31, 3, "reported")),
        ("/v1/responses", "text/event-stream", responses_stream(), Usage(31, 3, "reported")),
        ("/api/chat", "application/x-ndjson", ollama_stream(), Usage(26, 2, "reported")),
        (
            CHAT,
            "application/json",
            b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
            Usage(5, 6, "reported"),
        ),
        (
            "/v1/embeddings",
            "application/json",
            b'{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}',
            Usage(5, 0, "reported"),
        ),
        (
            "/api/generate",
            "application/json",
            b'{"done":true,"prompt_eval_count":4,"eval_count":9}',
            Usage(4, 9, "reported"),
        ),
    ],
)
def test_each_api_s_usage_is_read_and_bytes_pass_through(
    path: str, ctype: str, raw: bytes, usage: Usage, cuts: list[int]
) -> None:
    meter = prepare("POST", path, b'{"stream":true}')[1]
    pieces = split(raw, cuts)
    meter.start(200, ctype)
    assert [meter.feed(p) for p in pieces] == pieces and meter.close() == b""
    assert meter.result() == usage


def test_cancelled_anthropic_stream_is_estimated() -> None:
    raw = anthropic_stream()
    meter = prepare("POST", "/v1/messages", b"{}")[1]
    run(meter, [raw[: raw.index(b"event: content_block_stop")]])
    assert meter.result() == Usage(31, 3, "estimated")  # "Hello there": 11 chars, more than the 0 reported so far


def test_error_and_binary_responses_are_not_metered() -> None:
    meter = stripping_meter()
    error = b'{"error":{"message":"bad","code":"x"}}'
    assert run(meter, [error], "application/json", 400) == error
    assert meter.result() == Usage(0, 0, "unknown")
    meter = prepare("POST", "/v1/audio/speech", b"{}")[1]
    assert run(meter, [b"\0\xff" * 10], "audio/mpeg") == b"\0\xff" * 10
    assert meter.result().source == "unknown"
    meter = prepare("GET", "/v1/models", b"")[1]
    assert run(meter, [b'{"object":"list","data":[]}'], "application/json") == b'{"object":"list","data":[]}'
    assert meter.result() == Usage(0, 0, "unknown")


def test_an_endless_line_ends_metering_without_losing_a_byte() -> None:
    meter = stripping_meter()
    meter.start(200, "text/event-stream")
    held = meter.feed(DELTAS[0] + b"data: {" + b"x" * 100)
    assert held == DELTAS[0]
    rest = [b"y" * 65536 for _ in range(MAX_EVENT // 65536 + 1)]
    out = b"".join(meter.feed(p) for p in rest)
    assert held + out == DELTAS[0] + b"data: {" + b"x" * 100 + b"".join(rest)
    assert meter.feed(b"more") == b"more" and meter.close() == b""
    assert meter.result().source == "unknown"


@settings(max_examples=300)
@given(raw=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=0), max_size=8), strip=st.booleans())
def test_garbage_passes_through_unchanged(raw: bytes, cuts: list[int], strip: bool) -> None:
    """Random bytes, non-UTF-8 included: never an exception, and every byte forwarded in order."""
    meter = stripping_meter() if strip else prepare("POST", CHAT, b"{}")[1]
    for ctype in ("text/event-stream", "application/x-ndjson", "application/json"):
        assert run(meter, split(raw, cuts), ctype) == raw
        meter = stripping_meter() if strip else prepare("POST", CHAT, b"{}")[1]


@given(cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_json_garbage_inside_events_is_forwarded(cuts: list[int]) -> None:
    raw = b'data: {"choices": [}\n\ndata: {"usage": "lots"}\n\n: comment\n\ndata: \xff\xfe\n\n' + PLAIN
    meter = stripping_meter()
    assert run(meter, split(raw, cuts)) == raw
    assert meter.result() == Usage(3, 3, "estimated")  # no usage reported: estimated from the text


def test_hostile_request_bodies_are_left_alone() -> None:
    deep = b'{"stream":true,"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    body, meter = prepare("POST", CHAT, deep)
    assert body is deep and not meter.strip
    nested = b'{"stream":true,"messages":[' + b'{"content":[' * 200 + b'"abcd"' + b"]}" * 200 + b"]}"
    body, meter = prepare("POST", CHAT, nested)
    assert meter.strip and json.loads(body)["messages"] == json.loads(nested)["messages"]


def test_moved_fields_are_not_duplicated() -> None:
    """A server that puts `timings` in both chunks keeps the finish chunk's own."""
    both = b"".join([chunk(FINISH, "," + TIMINGS), chunk("", USAGE + ',"timings":{"other":1}'), b"data: [DONE]\n\n"])
    meter = stripping_meter()
    assert run(meter, [both]) == chunk(FINISH, "," + TIMINGS) + b"data: [DONE]\n\n"


def test_many_events_in_one_chunk_and_one_byte_chunks() -> None:
    events = [chunk(f'{{"index":0,"delta":{{"content":"{i}"}}}}') for i in range(5000)]
    raw = b"".join([*events, chunk(FINISH), chunk("", USAGE), b"data: [DONE]\n\n"])
    expected = b"".join([*events, chunk(FINISH), b"data: [DONE]\n\n"])
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        meter = stripping_meter()
        assert run(meter, pieces) == expected
        assert meter.result() == Usage(7, 2, "reported")


def test_a_large_json_answer_is_metered_from_its_tail_with_bounded_memory() -> None:
    """Usage comes last in every API's JSON: a connector keeps only the tail of a large body."""
    from connector.usage_meter import JSON_TAIL

    text = 'x\\"}{' * 200_000  # escaped quotes and braces in a long string do not fool the tail
    body = (
        b'{"id": "a", "choices": [{"message": {"content": "' + text.encode() + b'"}}], '
        b'"usage": {"prompt_tokens": 11, "completion_tokens": 22, "details": {"cached": 0}}}'
    )
    meter = UsageMeter()
    meter.start(200, "application/json")
    held = 0
    for start in range(0, len(body), 4096):
        assert meter.feed(body[start : start + 4096]) == body[start : start + 4096]
        held = max(held, len(meter._pending))
    assert meter.close() == b""
    assert meter.result() == Usage(11, 22, "reported")
    assert held <= 2 * JSON_TAIL + 4096
