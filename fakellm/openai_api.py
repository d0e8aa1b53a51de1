"""OpenAI's classic routes: models, chat and legacy completions, embeddings, rerank, images."""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import msgspec

from fakellm.common import SSE, Body, Exchange, Failed, content_text, embedding, encode, now, sse, words


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class CompletionBody(Body):
    stream: bool = False
    stream_options: StreamOptions | None = None
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    prompt: str | list[str] = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class EmbeddingBody(Body):
    input: str | list[str] = ""


class RerankBody(Body):
    query: str = ""
    documents: list[str | dict[str, Any]] = msgspec.field(default_factory=list)
    top_n: int | None = None
    return_documents: bool = False


class ImageBody(Body):
    prompt: str = ""
    n: int = 1


async def health(x: Exchange) -> None:
    await x.conn.send(200, b'{"status":"ok"}')


async def models(x: Exchange) -> None:
    if x.llm.ollama:  # Ollama-only servers: connectors must discover models from /api/tags
        raise Failed(404, "404 page not found", "not_found")
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakellm"} for m in x.llm.models]
    await x.send_json({"object": "list", "data": data})


async def chat(x: Exchange) -> None:
    await _complete(x, chat=True)


async def completions(x: Exchange) -> None:
    await _complete(x, chat=False)


async def _complete(x: Exchange, *, chat: bool) -> None:
    body = x.decode(CompletionBody)
    if not await x.prelude(streaming=body.stream):
        return
    cap = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    pieces, cut = x.reply(cap)
    finish = "length" if cut else "stop"
    prompt = words(*(content_text(m.get("content")) for m in body.messages))
    prompt += words(*([body.prompt] if isinstance(body.prompt, str) else body.prompt))
    head = {
        "id": x.new_id("chatcmpl" if chat else "cmpl", "-"),
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": body.model or x.llm.models[0],
    }
    if not body.stream:
        choice = _choice(chat, "".join(pieces), finish, key="message", role=True)
        return await x.send_json({**head, "choices": [choice], "usage": _usage(prompt, len(pieces))})
    if chat:
        head["object"] = "chat.completion.chunk"
    await x.stream(SSE, _events(chat, head, pieces, finish, prompt, body.stream_options or StreamOptions()))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(chat: bool, text: str, finish: str | None, *, key: str = "delta", role: bool = False) -> dict[str, Any]:
    """One `choices` entry, shaped for chat (message/delta) or legacy completions (text)."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    message: dict[str, str] = {"role": "assistant"} if role else {}
    if text or role:
        message["content"] = text
    return {"index": 0, key: message, "logprobs": None, "finish_reason": finish}


def _events(
    chat: bool, head: dict[str, Any], pieces: list[str], finish: str, prompt: int, options: StreamOptions
) -> Iterator[bytes]:
    """SSE: one chunk per piece, a finish chunk, the usage chunk if asked for, [DONE]."""
    every = options.include_usage and options.continuous_usage_stats
    for i, piece in enumerate(pieces):
        chunk = {**head, "choices": [_choice(chat, piece, None, role=chat and i == 0)]}
        yield sse(encode({**chunk, "usage": _usage(prompt, i + 1)} if every else chunk))
    last = {**head, "choices": [_choice(chat, "", finish)]}
    yield sse(encode({**last, "usage": _usage(prompt, len(pieces))} if every else last))
    if options.include_usage:  # like OpenAI and llama.cpp: a last chunk with no choices
        yield sse(encode({**head, "choices": [], "usage": _usage(prompt, len(pieces))}))
    yield sse(b"[DONE]")


async def embeddings(x: Exchange) -> None:
    body = x.decode(EmbeddingBody)
    if not await x.prelude():
        return
    texts = [body.input] if isinstance(body.input, str) else body.input
    data = [{"object": "embedding", "index": i, "embedding": embedding(t)} for i, t in enumerate(texts)]
    tokens = words(*texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    await x.send_json({"object": "list", "data": data, "model": body.model or x.llm.models[0], "usage": usage})


async def rerank(x: Exchange) -> None:
    """Jina/Cohere-style rerank, as llama.cpp and vLLM serve it: results by descending score."""
    body = x.decode(RerankBody)
    if not await x.prelude():
        return
    texts = [d if isinstance(d, str) else str(d.get("text", "")) for d in body.documents]
    query = set(body.query.lower().split())
    scored = [(len(query & set(t.lower().split())) / (1 + len(query)), i) for i, t in enumerate(texts)]
    scored.sort(key=lambda s: (-s[0], s[1]))
    results = []
    for score, i in scored[: body.top_n]:
        result: dict[str, Any] = {"index": i, "relevance_score": round(score, 6)}
        if body.return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    tokens = words(body.query, *texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    model = body.model or x.llm.models[0]
    await x.send_json({"id": x.new_id("rerank"), "model": model, "object": "list", "usage": usage, "results": results})


async def images(x: Exchange) -> None:
    body = x.decode(ImageBody)
    if not await x.prelude():
        return
    data = [{"b64_json": base64.b64encode(_png(f"{body.prompt}#{i}")).decode()} for i in range(body.n)]
    usage = {"input_tokens": words(body.prompt), "output_tokens": 0, "total_tokens": words(body.prompt)}
    await x.send_json({"created": now(), "data": data, "usage": usage})


def _png(seed: str) -> bytes:
    """A real 1x1 PNG whose colour comes from `seed`: deterministic and decodable."""
    red, green, blue = hashlib.sha256(seed.encode()).digest()[:3]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(bytes([0, red, green, blue]))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
