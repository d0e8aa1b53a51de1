"""Anthropic's Messages API: messages (JSON and SSE with named events) and count_tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from fakellm.common import SSE, Body, Exchange, content_text, encode, sse, words


class MessagesBody(Body):
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    system: str | list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    stream: bool = False


def _prompt(body: MessagesBody) -> int:
    return words(content_text(body.system), *(content_text(m.get("content")) for m in body.messages))


async def count_tokens(x: Exchange) -> None:
    body = x.decode(MessagesBody)
    if await x.prelude():
        await x.send_json({"input_tokens": _prompt(body)})


async def messages(x: Exchange) -> None:
    body = x.decode(MessagesBody)
    if not await x.prelude(streaming=body.stream):
        return
    pieces, cut = x.reply(body.max_tokens)
    stop = "max_tokens" if cut else "end_turn"
    message = {
        "id": x.new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": body.model or x.llm.models[0],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": _prompt(body), "output_tokens": 1},
    }
    if not body.stream:
        usage = {"input_tokens": _prompt(body), "output_tokens": len(pieces)}
        content = [{"type": "text", "text": "".join(pieces)}]
        return await x.send_json({**message, "content": content, "stop_reason": stop, "usage": usage})
    await x.stream(SSE, _events(message, pieces, stop))


def _events(message: dict[str, Any], pieces: list[str], stop: str) -> Iterator[bytes]:
    """Anthropic's sequence: the usage of the prompt first, that of the output in message_delta."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in pieces]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": len(pieces)},
        },
        {"type": "message_stop"},
    ]
    for event in events:
        yield sse(encode(event), event["type"])
