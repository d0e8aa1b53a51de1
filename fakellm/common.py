"""What every API family of the fake shares: knobs, the per-request exchange, errors, streaming."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec

from fakellm.http import JSON, Conn, Request

if TYPE_CHECKING:
    from fakellm.server import FakeLLM

DEMO_SENTENCE = (
    "Hello! I am the remotellm demo model, a fake LLM that always gives this same"
    " answer. Connect a real LLM to get real replies."
)
SSE = b"text/event-stream"
NDJSON = b"application/x-ndjson"
RECORDED_BODY = 65536  # bodies up to this size are kept as text in last_requests
encode = msgspec.json.encode


class Knobs(msgspec.Struct, forbid_unknown_fields=True):
    """Per-request behaviour; unknown fields are rejected so typos fail loudly."""

    chunks: int = 5  # content chunks in a stream / words in a JSON reply
    delay_ms: float | None = None  # stream chunks this far apart, by the clock (default 0; demo 30)
    head_delay_ms: float = 0.0  # pause before the response head
    hang: bool = False  # never answer; wait until the client goes away
    die_after: int | None = None  # abort the TCP connection after N stream chunks
    status: Annotated[int, msgspec.Meta(ge=200, le=599)] | None = None  # error reply
    echo_headers: bool = False  # reply content = JSON of the received headers
    pad_bytes: int | None = msgspec.field(default=None, name="bytes")  # reply ~N bytes (speech: exactly N)
    hold_body: bool = False  # uploads: read none of the body until POST /_fake/release


class Body(msgspec.Struct):
    """The part of every JSON body the fake looks at; each API family extends it."""

    model: str | None = None
    fake: Knobs | None = None


class Failed(Exception):
    """An error reply, shaped by `Exchange.fail` for the API family of the path."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


B = TypeVar("B", bound=Body)


def error_body(path: str, status: int, message: str, code: str | None) -> bytes:
    """The error shape each API's own clients parse: Anthropic, Ollama or OpenAI."""
    if path.startswith("/v1/messages"):
        kind = _ANTHROPIC_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return encode({"type": "error", "error": {"type": kind, "message": message}})
    if path.startswith("/api/"):
        return encode({"error": message})
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return encode({"error": {"message": message, "type": kind, "param": None, "code": code}})


_ANTHROPIC_KINDS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class Exchange:
    """One request being answered: the handler's view of the connection and the LLM."""

    def __init__(self, llm: FakeLLM, conn: Conn, req: Request, record: dict[str, Any]) -> None:
        self.llm = llm
        self.conn = conn
        self.req = req
        self.record = record
        self.raw = b""
        self.knobs = Knobs()
        self.active = False  # counted in llm.active_streams until the dispatcher ends the exchange

    def knobs_from_header(self) -> None:
        """Knobs for requests without a JSON `fake` field: multipart uploads and GETs."""
        header = self.req.headers.get("x-fake")
        if header:
            self.knobs = _decode_knobs(header.encode())

    async def read(self) -> bytes:
        self.raw = await self.conn.read_body()
        self.note_body(len(self.raw), hashlib.sha256(self.raw).hexdigest(), self.raw)
        return self.raw

    def note_body(self, size: int, sha256: str, raw: bytes | None) -> None:
        self.record["body_size"] = size
        self.record["body_sha256"] = sha256
        self.record["body"] = _text(raw) if raw is not None and size <= RECORDED_BODY else None

    def decode(self, kind: type[B]) -> B:
        """The JSON body as `kind`; its `fake` knobs apply unless the X-Fake header set them."""
        try:
            body = msgspec.json.decode(self.raw, type=kind)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raise Failed(400, f"invalid request body: {exc}", "invalid_json") from None
        self.record["model"] = body.model
        if body.fake is not None and "x-fake" not in self.req.headers:
            self.knobs = body.fake
        return body

    def activate(self) -> None:
        if not self.active:
            self.active = True
            llm = self.llm
            llm.active_streams += 1
            llm.peak_streams = max(llm.peak_streams, llm.active_streams)

    async def prelude(self, streaming: bool = False) -> bool:
        """Apply hang, head_delay_ms and status; False if the reply is settled already.

        A stream counts as active from here on, so a hanging stream shows in the state too.
        """
        if streaming:
            self.activate()
        knobs = self.knobs
        waits = knobs.hang or knobs.head_delay_ms > 0
        if waits and await self.conn.idle(None if knobs.hang else knobs.head_delay_ms / 1000):
            self.llm.cancelled += 1
            self.conn.abort()
            return False
        if knobs.status is not None:
            await self.fail(Failed(knobs.status, f"fake status {knobs.status}", "fake_status"))
            return False
        return True

    async def fail(self, failure: Failed) -> None:
        body = error_body(self.req.path, failure.status, failure.message, failure.code)
        await self.conn.send(failure.status, body)

    async def send_json(self, obj: Any, status: int = 200) -> None:
        await self.conn.send(status, encode(obj), JSON)

    def reply(self, limit: int | None) -> tuple[list[str], bool]:
        """The reply's pieces, at most `limit` (a max_tokens), and whether the limit cut it."""
        pieces = self.pieces()
        return pieces[:limit], limit is not None and len(pieces) > limit

    def pieces(self) -> list[str]:
        """Reply text as stream chunks; joined, it is the JSON reply's text."""
        knobs = self.knobs
        if knobs.echo_headers:
            pieces = [encode(self.req.headers).decode()]
        elif self.llm.demo:
            pieces = spaced(DEMO_SENTENCE.split(" "))
        else:
            pieces = spaced([f"tok{i}" for i in range(knobs.chunks)])
        size = sum(map(len, pieces))
        if knobs.pad_bytes is not None and knobs.pad_bytes > size:
            pieces.append(" " + "x" * (knobs.pad_bytes - size - 1))
        return pieces

    def new_id(self, prefix: str, sep: str = "_") -> str:
        """Ids carry the server's name, so a test can tell which LLM made an object; never reused."""
        return f"{prefix}{sep}{self.llm.name}{sep}{next(self.llm.serial)}"

    async def stream(self, ctype: bytes, chunks: Iterable[bytes]) -> None:
        """Send `chunks` as a chunked body, honouring delay_ms and die_after; count hang-ups."""
        knobs = self.knobs
        delay = (knobs.delay_ms if knobs.delay_ms is not None else 30.0 * self.llm.demo) / 1000
        self.activate()
        loop = asyncio.get_running_loop()
        due = loop.time()
        try:
            self.conn.start_stream(ctype)
            for i, chunk in enumerate(chunks):
                if i == knobs.die_after:
                    return self.conn.abort()
                if i and delay:
                    now = loop.time()
                    due = next_due(due, now, delay)
                    if await self.conn.idle(max(0.0, due - now)):
                        raise ConnectionResetError  # hung up while we paused
                await self.conn.send_chunk(chunk)
            await self.conn.end_stream()
        except ConnectionError:
            self.llm.cancelled += 1
            self.conn.abort()


def next_due(due: float, now: float, delay: float) -> float:
    """When the chunk after the one due at ``due`` is due: ``delay`` later, by the clock, as a
    model decodes at its own pace whatever the time its server takes to send. (Pausing
    ``delay`` after each send instead would slow the stream by the sender's own lag, which
    grows with the load on the machine.) A stream held back more than a chunk (a reader
    that does not read) goes on from now rather than in a burst."""
    due += delay
    return due if due >= now - delay else now


Handler = Callable[[Exchange], Awaitable[None]]


def _decode_knobs(raw: bytes) -> Knobs:
    try:
        return msgspec.json.decode(raw, type=Knobs)
    except msgspec.DecodeError as exc:
        raise Failed(400, f"invalid X-Fake header: {exc}", "invalid_json") from None


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def spaced(words: list[str]) -> list[str]:
    return [f" {w}" if i else w for i, w in enumerate(words)]


def words(*texts: Any) -> int:
    """Word counts stand in for tokens: deterministic and good enough for a fake."""
    return sum(len(t.split()) for t in texts if isinstance(t, str))


def content_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of text blocks/parts (any API)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def sse(data: bytes, event: str | None = None) -> bytes:
    """One server-sent event; Anthropic and Responses streams name theirs."""
    if event is None:
        return b"data: %s\n\n" % data
    return b"event: %s\ndata: %s\n\n" % (event.encode(), data)


def now() -> int:
    return int(time.time())


def embedding(text: str) -> list[float]:
    """Eight floats in [-1, 1] from a stable hash, so equal inputs embed equally."""
    return [round(b / 127.5 - 1, 4) for b in hashlib.blake2b(text.encode(), digest_size=8).digest()]
