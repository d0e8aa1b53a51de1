"""Exact token usage of one relayed request, sans-IO: ask the LLM for it, read it, hide what the client did not ask for.

The connector runs it on every request::

    body, meter = prepare(method, path, body)        # may add stream_options.include_usage
    meter.start(status, content_type)                # the LLM's response head
    forward(meter.feed(chunk))                       # for each body chunk, as it arrives
    forward(meter.close())                           # at the end of the body (or of the relay)
    meter.result()                                   # Usage(prompt, completion, source)

It never raises into the caller and never holds more than one SSE event (bounded): on
input it cannot follow it passes every byte through unchanged and reports `unknown`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from wire.frames import UsageSource as Source

# An SSE event or NDJSON line longer than this ends metering (usage unknown, bytes pass through):
# events are small, but a connector holds one per request in flight, hundreds at once.
MAX_EVENT = 256 << 10
# A JSON body is parsed whole up to this size; past it only its tail is kept, where usage
# comes (last in every API's JSON), so a connector never holds whole large answers.
JSON_TAIL = 64 << 10
CHARS_PER_TOKEN = 4  # the usual rough ratio, for estimates only
# Chat and legacy completions accept stream_options (OpenAI, vLLM, llama.cpp, Ollama's /v1).
USAGE_OPTION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Top-level fields of an OpenAI chunk that belong to every chunk; the rest of a usage-only
# chunk is what the LLM moved there because usage was asked for (llama.cpp's `timings`).
_CHUNK_FIELDS = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "choices", "usage", "service_tier", "obfuscation"}
)
# Responses and Anthropic events whose usage is the request's final count.
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "message_delta"})
_USAGE_NULL = (re.compile(rb',\s*"usage"\s*:\s*null'), re.compile(rb'"usage"\s*:\s*null\s*,'))
# Where an event ends: a blank line, as LLM servers write them. One regex scans once for both.
_EVENT_END = {"sse": re.compile(rb"\r\n\r\n|\n\n"), "ndjson": re.compile(rb"\n")}
_decode = msgspec.json.decode
_encode = msgspec.json.encode


@dataclass(frozen=True)
class Usage:
    """Tokens of one request and how we know them: reported by the LLM, estimated, or unknown."""

    prompt_tokens: int
    completion_tokens: int
    source: Source

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def prepare(method: str, path: str, body: bytes) -> tuple[bytes, UsageMeter]:
    """The body to send to the LLM, and the meter for its response.

    A streaming chat/completions request whose client did not ask for usage gets
    ``stream_options.include_usage: true``; every other body is returned unchanged.
    """
    try:
        return _prepare(method, path, body)
    except Exception:  # a body no rule foresaw is forwarded as it came, unmetered
        return body, UsageMeter()


def _prepare(method: str, path: str, body: bytes) -> tuple[bytes, UsageMeter]:
    fields = _object(body) if method == "POST" else None
    meter = UsageMeter(_prompt_chars(fields))
    if fields is None or path not in USAGE_OPTION_PATHS or fields.get("stream") != b"true":
        return body, meter
    options = _object(fields.get("stream_options", b"{}"))
    if options is None or options.get("include_usage") == b"true":
        return body, meter  # asked for already, or not something we can add to
    options["include_usage"] = b"true"
    fields["stream_options"] = _join(options)
    meter.strip = True
    return _join(fields), meter


def _object(raw: bytes | None) -> dict[str, bytes] | None:
    """A JSON object as its keys and the raw bytes of each value, or None."""
    if raw is None or raw == b"null":
        raw = b"{}"
    try:
        fields = _decode(raw, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # msgspec limits nesting
        return None
    return {key: bytes(value) for key, value in fields.items()}


def _join(fields: dict[str, bytes]) -> bytes:
    """Rebuild an object from raw values: each value keeps its exact bytes, and so its meaning."""
    return b"{" + b",".join(_encode(key) + b":" + value for key, value in fields.items()) + b"}"


def _prompt_chars(fields: dict[str, bytes] | None) -> int:
    """Characters of the prompt's text, to estimate its tokens if the LLM never reports them."""
    if fields is None:
        return 0
    total = 0
    for key in ("messages", "prompt", "input", "system", "instructions"):
        if key in fields:
            try:
                total += _text_chars(_decode(fields[key]))
            except (msgspec.DecodeError, RecursionError):
                continue
    return total


def _text_chars(value: Any) -> int:
    """Characters of the strings in a prompt's messages or parts (iterative: bodies come from users)."""
    total, todo = 0, [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            todo += item
        elif isinstance(item, dict):
            todo += [v for k, v in item.items() if k in ("content", "text", "input")]
    return total


class _Tally:
    """Usage as the response reports it, and what was delivered, for estimates."""

    def __init__(self, prompt_chars: int) -> None:
        self.prompt_chars = prompt_chars
        self.prompt: int | None = None
        self.completion: int | None = None
        self.final = False  # the response's own final count was seen
        self.fresh = False  # no content was delivered after the last count
        self.delivered_chars = 0

    def see(self, obj: dict[str, Any], complete: bool = False) -> None:
        """One event (or a whole JSON body: `complete`)."""
        if obj.keys().isdisjoint(_USAGE_KEYS):  # most events: text, no count (checked in C, once)
            chars = _content_chars(obj)
            self.delivered_chars += chars
            if chars:
                self.fresh = False
            return
        prompt, completion = _reported(obj)
        if prompt is not None:
            self.prompt = prompt
        if completion is not None:
            self.completion = completion
        chars = _content_chars(obj)
        self.delivered_chars += chars
        if prompt is not None or completion is not None:
            self.fresh = True
            self.final = self.final or complete or _is_final(obj)
        elif chars:
            self.fresh = False

    def result(self, streamed: bool) -> Usage:
        """Reported if the final count was seen; a stream cut short is estimated; all else unknown."""
        if self.final:
            return Usage(self.prompt or 0, self.completion or 0, "reported")
        if not streamed:
            return Usage(self.prompt or 0, self.completion or 0, "unknown")
        prompt = self.prompt if self.prompt is not None else math.ceil(self.prompt_chars / CHARS_PER_TOKEN)
        guess = math.ceil(self.delivered_chars / CHARS_PER_TOKEN)
        completion = self.completion or 0
        return Usage(prompt, completion if self.fresh else max(completion, guess), "estimated")


# The keys under which any API reports usage: an event with none of them reports none.
_USAGE_KEYS = frozenset({"usage", "response", "message", "prompt_eval_count", "eval_count"})


def _reported(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt, completion) of any API's usage: OpenAI, Responses, Anthropic or Ollama."""
    for holder in (obj, obj.get("response"), obj.get("message")):  # Responses and Anthropic nest theirs
        usage = holder.get("usage") if isinstance(holder, dict) else None
        if isinstance(usage, dict):
            prompt = _count(usage, "prompt_tokens") if "prompt_tokens" in usage else _anthropic_input(usage)
            completion = _count(usage, "completion_tokens") if "completion_tokens" in usage else None
            return prompt, completion if completion is not None else _count(usage, "output_tokens")
    if "prompt_eval_count" in obj or "eval_count" in obj:
        return _count(obj, "prompt_eval_count"), _count(obj, "eval_count")
    return None, None


def _anthropic_input(usage: dict[str, Any]) -> int | None:
    """Anthropic counts cached prompt tokens apart from `input_tokens`; the prompt is all of them."""
    parts = [_count(usage, k) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    return None if parts[0] is None else sum(p or 0 for p in parts)


def _count(holder: dict[str, Any], key: str) -> int | None:
    value = holder.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _is_final(obj: dict[str, Any]) -> bool:
    """Whether an event carrying usage carries the request's final count."""
    if obj.get("type") in _FINAL_EVENTS or obj.get("done") is True:
        return True
    return obj.get("choices") == [] or _finishes(obj)


def _finishes(obj: dict[str, Any]) -> bool:
    """An OpenAI chunk that ends a choice (it has a finish_reason)."""
    choices = obj.get("choices")
    if type(choices) is list:
        for choice in choices:  # (a loop, not any() over a generator: this runs on every event)
            if type(choice) is dict and choice.get("finish_reason"):
                return True
    return False


def _content_chars(obj: dict[str, Any]) -> int:
    """Characters of generated text in one event of any API (once per event: plain loops)."""
    total = 0
    for key in ("delta", "response", "message"):
        if key in obj:
            total += _text_chars_of(obj[key])
    choices = obj.get("choices")
    if type(choices) is list:
        for choice in choices:
            if type(choice) is dict:
                if "delta" in choice:
                    total += _text_chars_of(choice["delta"])
                if "text" in choice:
                    total += _text_chars_of(choice["text"])
    return total


def _text_chars_of(text: Any) -> int:
    """Characters of a text, or of a delta's or message's text-bearing fields."""
    if type(text) is str:
        return len(text)
    if type(text) is not dict:
        return 0
    total = 0
    for key, value in text.items():  # (a delta has a key or two)
        if key in _TEXT_KEYS and type(value) is str:
            total += len(value)
    return total


_TEXT_KEYS = frozenset({"content", "text", "reasoning_content", "partial_json", "thinking"})


class UsageMeter:
    """Follows one response: forwards its bytes, reads its usage, drops the usage chunk it asked for."""

    def __init__(self, prompt_chars: int = 0) -> None:
        self.strip = False  # usage was asked for on the client's behalf: remove it again
        self._tally = _Tally(prompt_chars)
        self._mode: Literal["sse", "ndjson", "json", "pass"] = "pass"  # until start() says otherwise
        self._streamed = False  # an SSE or NDJSON body: one cut short can be estimated
        # Bytes of the events (SSE) or lines (NDJSON) not processed yet, or the JSON body so far.
        self._pending = bytearray()  # appended to in place: a long line in tiny chunks stays linear
        self._done = 0  # how much of _pending the current feed has processed
        self._scanned = 0  # how much of _pending is known to hold no event end
        self._held = b""  # a finished chunk kept until we know whether a usage chunk follows
        self._out: list[bytes] = []  # processed events of the current feed, not yet returned
        self._json_size = 0  # bytes of a JSON body seen (only its tail is kept past JSON_TAIL)

    def start(self, status: int, content_type: str | None) -> None:
        """The response head. Only successful SSE, NDJSON and JSON bodies are metered."""
        ctype = (content_type or "").split(";")[0].strip().lower()
        self._mode = _MODES.get(ctype, "pass") if 200 <= status < 300 else "pass"
        self._streamed = self._mode in ("sse", "ndjson")

    def feed(self, chunk: bytes) -> bytes:
        """Bytes of the response body as they arrive; returns the bytes to forward now."""
        if self._mode == "pass":
            return chunk
        try:
            out = self._feed(chunk)
        except Exception:  # hostile or unforeseen input must never break the relay
            return self._give_up(chunk)
        return out if self._holding else chunk

    def close(self) -> bytes:
        """The end of the body, complete or cut short: returns what is still held back."""
        out = self._held + bytes(self._pending) if self._holding else b""
        try:
            self._finish()
        except Exception:
            self._streamed = False
        self._held, self._pending = b"", bytearray()
        self._mode = "pass"
        return out

    def result(self) -> Usage:
        """The usage so far; after close(), the request's."""
        return self._tally.result(self._streamed)

    @property
    def _holding(self) -> bool:
        """Only an SSE body we strip is held back, an event at a time; all else flows through at once."""
        return self.strip and self._mode == "sse"

    def _feed(self, chunk: bytes) -> bytes:
        if self._mode == "sse" and not self._pending and len(chunk) <= MAX_EVENT:
            # The usual chunk: one whole event (no buffer, no scan), most often of one data line.
            data = _lone_data(chunk)
            if data is not None:
                return self._event(chunk, data)
            if _one_event(chunk):
                return self._event(chunk)
        self._pending += chunk
        if self._mode == "json":
            self._json_size += len(chunk)
            if len(self._pending) > 2 * JSON_TAIL:  # trimmed in steps: linear however it is cut
                del self._pending[:-JSON_TAIL]
            return chunk
        pending, search = self._pending, _EVENT_END[self._mode].search
        handle = self._event if self._mode == "sse" else self._line
        # Events are cut out by offset, and the buffer trimmed once: many tiny events stay linear.
        start = max(self._done, self._scanned)
        while found := search(pending, start):
            start = found.end()
            self._out.append(handle(bytes(pending[self._done : start])))
            self._done = start
            if start == len(pending):  # (the usual case: a chunk ends with its event)
                break
        del pending[: self._done]
        self._done = 0
        self._scanned = max(0, len(self._pending) - 3)  # an end split across chunks is found next time
        if len(self._pending) > MAX_EVENT:
            raise ValueError("SSE event or NDJSON line too long to meter")
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _give_up(self, chunk: bytes) -> bytes:
        """Stop metering and pass everything through from now on, losing no byte held back."""
        out = b"".join([*self._out, self._held, self._pending[self._done :]]) if self._holding else chunk
        self._out.clear()
        self._held, self._pending, self._done = b"", bytearray(), 0
        self._mode = "pass"
        self._streamed = False
        return out

    def _line(self, line: bytes) -> bytes:
        obj = _json_object(line)
        if obj is not None:
            self._tally.see(obj)
        return line

    def _event(self, raw: bytes, data: bytes | None = None) -> bytes:
        """One SSE event (``data``: its data, if known already): read its usage; return what
        to forward now of it and of the held one."""
        obj = _json_object(_sse_data(raw) if data is None else data)
        if obj is None:
            return self._release() + raw if self._held else raw
        self._tally.see(obj)
        if not self.strip:
            return raw
        if "usage" in obj:
            usage = obj["usage"]
            if isinstance(usage, dict) and obj.get("choices") == []:
                return self._release(_extra_fields(_sse_data(raw)))  # the usage chunk we asked for: dropped
            if usage is None:
                raw = _without_usage_null(raw)
        out = self._release() if self._held else b""
        if _finishes(obj):
            self._held = raw  # a usage chunk may follow, with fields the LLM moved there from this one
            return out
        return out + raw if out else raw

    def _release(self, extra: dict[str, bytes] | None = None) -> bytes:
        """The held chunk, with the `extra` fields it lacks spliced in before its closing brace."""
        held, self._held = self._held, b""
        if held and extra:
            present = _object(_sse_data(held)) or {}
            fields = b"".join(b"," + _encode(k) + b":" + v for k, v in extra.items() if k not in present)
            brace = held.rfind(b"}")
            held = held[:brace] + fields + held[brace:]
        return held

    def _finish(self) -> None:
        if self._mode == "json":
            body = bytes(self._pending)
            obj = _json_object(body) if self._json_size == len(body) else _tail_usage(body)
            if obj is not None:
                self._tally.see(obj, complete=True)
        elif self._mode == "ndjson" and self._pending.strip():
            self._line(bytes(self._pending))


_OLLAMA_COUNT = re.compile(rb'"(prompt_eval_count|eval_count)"\s*:\s*(\d{1,18})')


def _tail_usage(tail: bytes) -> dict[str, Any] | None:
    """The usage fields found in the tail of a JSON body too large to parse whole."""
    found: dict[str, Any] = {k.decode(): int(v) for k, v in _OLLAMA_COUNT.findall(tail)}
    at = tail.rfind(b'"usage"')
    if at >= 0:
        usage = _json_object(_balanced(tail, tail.find(b"{", at)))
        if usage is not None:
            found["usage"] = usage
    return found or None


def _balanced(data: bytes, start: int) -> bytes:
    """The JSON object that opens at ``start`` (b"" if it does not close within ``data``)."""
    if start < 0:
        return b""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(data)):
        byte = data[index]
        if in_string:  # a quote ends the string unless a backslash escaped it
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                return data[start : index + 1]
    return b""


_MODES: dict[str, Literal["sse", "ndjson", "json", "pass"]] = {
    "text/event-stream": "sse",
    "application/x-ndjson": "ndjson",
    "application/json": "json",
}


def _lone_data(chunk: bytes) -> bytes | None:
    """The data of a chunk that is one event of one data line (``data: …`` and a blank
    line), as OpenAI-style servers write nearly every chunk; None for any other chunk."""
    if chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n") == 2 and b"\r" not in chunk:
        return chunk[6:-2]
    return None


def _one_event(chunk: bytes) -> bool:
    """Whether a chunk is exactly one SSE event ending in a blank line, as servers write them."""
    return chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2 and b"\r" not in chunk


def _sse_data(raw: bytes) -> bytes:
    """An event's data: its data lines joined, per the SSE format."""
    lone = _lone_data(raw)
    if lone is not None:
        return lone  # the usual event, one data line: what the loop below would return
    data = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data)


def _json_object(data: bytes) -> dict[str, Any] | None:
    if data[:1] != b"{" and not data.lstrip().startswith(b"{"):
        return None  # `[DONE]`, pings, blank keep-alive lines
    try:
        obj = _decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # msgspec limits nesting
        return None
    return obj if isinstance(obj, dict) else None


def _extra_fields(data: bytes) -> dict[str, bytes]:
    """The fields a usage-only chunk carries beyond those of every chunk, as raw bytes."""
    return {k: v for k, v in (_object(data) or {}).items() if k not in _CHUNK_FIELDS}


def _without_usage_null(raw: bytes) -> bytes:
    """OpenAI adds `"usage":null` to every chunk once usage is asked for; remove exactly that."""
    for pattern in _USAGE_NULL:
        if len(found := pattern.findall(raw)) == 1:
            return raw.replace(found[0], b"", 1)
    return raw
