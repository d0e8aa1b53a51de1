"""OpenAI's audio routes: multipart uploads hashed as they stream in, and binary speech."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fakellm.common import Body, Exchange, Failed
from fakellm.multipart import Multipart

FIELD_LIMIT = 65536  # a form field other than the file is kept up to this size
SPEECH_BYTES = 4096  # default length of a speech reply; the `bytes` knob sets it exactly
_CHUNK = 65536
_AUDIO_TYPES = {
    "mp3": b"audio/mpeg",
    "opus": b"audio/opus",
    "aac": b"audio/aac",
    "flac": b"audio/flac",
    "wav": b"audio/wav",
    "pcm": b"audio/pcm",
}


class SpeechBody(Body):
    input: str = ""
    voice: str | None = None
    response_format: str = "mp3"


async def transcribe(x: Exchange) -> None:
    """Transcriptions and translations: the upload is never held whole, only hashed."""
    upload = await _read_form(x)
    fields = x.record["form"]
    x.record["model"] = fields.get("model")
    if upload is None:
        raise Failed(400, "a multipart form with a 'file' part is required", "invalid_request")
    if not await x.prelude():
        return
    text = f"{upload['filename']}: {upload['size']} bytes, sha256 {upload['sha256']}"
    fmt = fields.get("response_format", "json")
    if fmt == "text":
        return await x.conn.send(200, text.encode(), b"text/plain; charset=utf-8")
    reply: dict[str, Any] = {"text": text, "usage": {"type": "duration", "seconds": 1}}
    if fmt == "verbose_json":
        task = "translate" if x.req.path.endswith("translations") else "transcribe"
        reply = {"task": task, "language": fields.get("language", "english"), "duration": 1.0, **reply}
        reply["segments"] = []
    await x.send_json(reply)


class _Part:
    """One form part as it streams by: a field's text is kept, a file is only hashed."""

    def __init__(self, name: str, filename: str | None) -> None:
        self.name, self.filename = name, filename
        self.digest = hashlib.sha256()
        self.size = 0
        self.kept: list[bytes] = []

    def add(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        if self.filename is None and self.size <= FIELD_LIMIT:
            self.kept.append(data)


async def _read_form(x: Exchange) -> dict[str, Any] | None:
    """Stream the body through the multipart parser; record the fields and the file's digest."""
    whole, size = hashlib.sha256(), 0
    fields: dict[str, str] = {}
    upload: dict[str, Any] | None = None
    try:
        form = Multipart(x.req.headers.get("content-type", ""))
    except ValueError as exc:
        raise Failed(400, str(exc), "invalid_request") from None
    part = _Part("", None)
    if x.knobs.hold_body:  # a slow LLM: what the bridge holds meanwhile is bounded
        await x.llm.released.wait()
    async for chunk in _counted(x):
        whole.update(chunk)
        size += len(chunk)
        for event in form.feed(chunk):
            if event.kind == "start":
                part = _Part(event.name, event.filename)
            elif event.kind == "data":
                part.add(event.data)
            elif part.filename is None:
                fields[part.name] = b"".join(part.kept).decode(errors="replace")
            elif part.name == "file":
                upload = {"filename": part.filename, "size": part.size, "sha256": part.digest.hexdigest()}
    x.note_body(size, whole.hexdigest(), None)
    x.record["form"] = fields
    x.record["upload"] = upload
    return upload


async def _counted(x: Exchange) -> AsyncIterator[bytes]:
    """The body as it arrives; one cut short counts as cancelled: the client went away."""
    try:
        async for chunk in x.conn.body():
            yield chunk
    except (ConnectionError, asyncio.IncompleteReadError):
        x.llm.cancelled += 1
        raise


async def speech(x: Exchange) -> None:
    """Deterministic binary audio: an MP3-like header (NUL and 0xFF bytes) and hash-derived bytes."""
    body = x.decode(SpeechBody)
    if not await x.prelude():
        return
    size = x.knobs.pad_bytes if x.knobs.pad_bytes is not None else SPEECH_BYTES
    ctype = _AUDIO_TYPES.get(body.response_format, b"application/octet-stream")
    await x.stream(ctype, _audio(body.input, size))


def _audio(text: str, size: int) -> Iterator[bytes]:
    block = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb" + b"".join(
        hashlib.sha256(f"{text}#{i}".encode()).digest() for i in range(_CHUNK // 32)
    )
    while size > 0:
        piece = block[: min(size, _CHUNK)]
        size -= len(piece)
        yield piece
