"""Ollama's native API under /api/: NDJSON streams by default, model listings, embeddings."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec

from fakellm.common import NDJSON, Body, Exchange, Handler, content_text, embedding, encode, words

VERSION = "0.12.6"
_MODIFIED = "2026-01-01T00:00:00Z"
_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "135M",
    "quantization_level": "Q4_1",
}


class Options(msgspec.Struct):
    num_predict: int | None = None


class GenerateBody(Body):
    prompt: str = ""
    system: str | None = None
    messages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    stream: bool = True  # Ollama streams unless told not to
    options: Options | None = None


class EmbedBody(Body):
    input: str | list[str] = ""
    prompt: str = ""


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _model(name: str) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {"name": name, "model": name, "modified_at": _MODIFIED, "size": 98_000_000, "digest": digest}


async def tags(x: Exchange) -> None:
    await x.send_json({"models": [{**_model(m), "details": _DETAILS} for m in x.llm.models]})


async def ps(x: Exchange) -> None:
    expires = "2099-01-01T00:00:00Z"
    models = [{**_model(m), "details": _DETAILS, "expires_at": expires, "size_vram": 0} for m in x.llm.models]
    await x.send_json({"models": models})


async def version(x: Exchange) -> None:
    await x.send_json({"version": VERSION})


async def show(x: Exchange) -> None:
    body = x.decode(Body)
    if await x.prelude():
        info = {"general.architecture": "llama", "general.basename": body.model, "llama.context_length": 8192}
        await x.send_json(
            {
                "modelfile": f"FROM {body.model}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _DETAILS,
                "model_info": info,
                "capabilities": ["completion"],
                "modified_at": _MODIFIED,
            }
        )


async def chat(x: Exchange) -> None:
    await _generate(x, chat=True)


async def generate(x: Exchange) -> None:
    await _generate(x, chat=False)


async def _generate(x: Exchange, *, chat: bool) -> None:
    body = x.decode(GenerateBody)
    if not await x.prelude(streaming=body.stream):
        return
    cap = body.options.num_predict if body.options is not None else None
    pieces, cut = x.reply(cap)
    prompt = words(body.prompt, body.system, *(content_text(m.get("content")) for m in body.messages))
    head = {"model": body.model or x.llm.models[0], "created_at": _now()}
    final = {
        "done": True,
        "done_reason": "length" if cut else "stop",
        "total_duration": 1_000_000,
        "load_duration": 10_000,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": 100_000,
        "eval_count": len(pieces),
        "eval_duration": 800_000,
    }
    if not chat:
        final["context"] = list(range(1, prompt + len(pieces) + 1))
    if not body.stream:
        return await x.send_json({**head, **_piece(chat, "".join(pieces)), **final})
    await x.stream(NDJSON, _lines(chat, head, pieces, final))


def _piece(chat: bool, text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


def _lines(chat: bool, head: dict[str, Any], pieces: list[str], final: dict[str, Any]) -> Iterator[bytes]:
    """One JSON object a line; the last, with empty text, carries the counts."""
    for piece in pieces:
        yield encode({**head, **_piece(chat, piece), "done": False}) + b"\n"
    yield encode({**head, **_piece(chat, ""), **final}) + b"\n"


async def embed(x: Exchange) -> None:
    body = x.decode(EmbedBody)
    if await x.prelude():
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = [embedding(t) for t in texts]
        model = body.model or x.llm.models[0]
        counts = {"total_duration": 1_000_000, "load_duration": 10_000, "prompt_eval_count": words(*texts)}
        await x.send_json({"model": model, "embeddings": vectors, **counts})


async def embeddings(x: Exchange) -> None:
    """The older single-prompt route that /api/embed superseded."""
    body = x.decode(EmbedBody)
    if await x.prelude():
        await x.send_json({"embedding": embedding(body.prompt)})


ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/api/chat"): chat,
    ("POST", "/api/generate"): generate,
    ("POST", "/api/embed"): embed,
    ("POST", "/api/embeddings"): embeddings,
    ("POST", "/api/show"): show,
    ("GET", "/api/tags"): tags,
    ("GET", "/api/ps"): ps,
    ("GET", "/api/version"): version,
}
