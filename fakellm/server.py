"""Fake OpenAI-compatible LLM server: fast, deterministic and steerable per request.

It is the LLM behind the bridge in end-to-end tests, a fast backend for
benchmarks, and the README's demo model. Only asyncio and msgspec are used so
it starts instantly and serves thousands of small requests per second.

API::

    server, llm = await serve("127.0.0.1", 0, models=["m1"], api_key=None, name="fake")
    llm.url                                   # "http://127.0.0.1:PORT"
    llm.requests, llm.active_streams, llm.cancelled, llm.last_requests
    llm.state(), llm.reset()                  # same as GET /_fake/state, POST /_fake/reset
    await llm.close()                         # stop listening, drop connections quietly

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /v1/embeddings, GET /health, GET /_fake/state, POST /_fake/reset.
With ``api_key`` set, /v1/ paths need ``Authorization: Bearer <api_key>``.

Tests steer each request through an extra body field ``"fake": {...}`` (the
bridge forwards bodies unchanged); see `Knobs` for the fields.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from http import HTTPStatus
from typing import Annotated, Any

import msgspec

DEMO_SENTENCE = (
    "Hello! I am the remotellm demo model, a fake LLM that always gives this same"
    " answer. Connect a real LLM to get real replies."
)
_JSON = b"application/json"
_encode = msgspec.json.encode


class Knobs(msgspec.Struct, forbid_unknown_fields=True):
    """Per-request behaviour; unknown fields are rejected so typos fail loudly."""

    chunks: int = 5  # content chunks in a stream / words in a JSON reply
    delay_ms: float | None = None  # pause between stream chunks (default 0; demo 30)
    head_delay_ms: float = 0.0  # pause before the response head
    hang: bool = False  # never answer; wait until the client goes away
    die_after: int | None = None  # abort the TCP connection after N stream chunks
    status: Annotated[int, msgspec.Meta(ge=200, le=599)] | None = None  # error reply
    echo_headers: bool = False  # reply content = JSON of the received headers
    pad_bytes: int = msgspec.field(default=0, name="bytes")  # pad reply to ~N bytes


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class Body(msgspec.Struct):
    """The parts of OpenAI request bodies the fake looks at."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    messages: list[dict[str, Any]] = []
    prompt: str | list[str] = ""
    input: str | list[str] = ""
    fake: Knobs = msgspec.field(default_factory=Knobs)


class Request(msgspec.Struct):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _error(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return _encode({"error": {"message": message, "type": kind, "param": None, "code": code}})


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class _Conn:
    """One client connection: HTTP/1.1 framing plus hang-up detection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: bytes):
        self.reader = reader
        self.writer = writer
        self.name = name
        self.keep_alive = True
        self._watch: asyncio.Task[bytes] | None = None

    async def read_request(self) -> Request | None:
        """Next request, or None on a clean close; ValueError if malformed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            key, value = key.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        if headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await self._read_body(headers)
        return Request(method, target.partition("?")[0], headers, body)

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            return await self.reader.readexactly(int(headers.get("content-length", "0")))
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await self.reader.readexactly(size + 2))[:-2])
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            pass  # skip trailers
        return b"".join(parts)

    def _head(self, status: int, ctype: bytes, framing: bytes) -> bytes:
        close = b"" if self.keep_alive else b"Connection: close\r\n"
        return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sX-Fake-LLM: %s\r\n%s\r\n" % (
            status,
            _reason(status),
            ctype,
            framing,
            self.name,
            close,
        )

    async def send(self, status: int, payload: bytes) -> None:
        framing = b"Content-Length: %d\r\n" % len(payload)
        self.writer.write(self._head(status, _JSON, framing) + payload)
        await self.writer.drain()

    def start_stream(self) -> None:
        framing = b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"
        self.writer.write(self._head(200, b"text/event-stream", framing))

    async def send_event(self, data: bytes) -> None:
        """One SSE event as one HTTP chunk, flushed at once so clients see it live."""
        event = b"data: %s\n\n" % data
        self.writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    def abort(self) -> None:
        self.keep_alive = False
        self.writer.transport.abort()

    async def idle(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: forever) but return True as soon as the client hangs up.

        Reading is the only way to see a hang-up while nothing is being written.
        """
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            if self._watch is None:
                self._watch = asyncio.create_task(self.reader.read(65536))
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait((self._watch,), timeout=timeout)
            if not done:
                return False
            watch, self._watch = self._watch, None
            if watch.exception() is not None or not watch.result():
                return True
            self.keep_alive = False  # pipelined bytes mid-response: framing is lost

    async def finish(self) -> None:
        """Stop watching for hang-ups so the next request can be read."""
        watch, self._watch = self._watch, None
        if watch is None:
            return
        if watch.cancel():
            await asyncio.wait((watch,))  # the read must really stop before the next one starts
        else:
            watch.exception()  # already done: EOF, error or pipelined bytes
            self.keep_alive = False


Handler = Callable[[_Conn, Request, Body], Awaitable[None]]


class FakeLLM:
    """Config and observable state of one fake LLM; `handle` serves a connection."""

    def __init__(
        self,
        models: Sequence[str],
        *,
        api_key: str | None = None,
        name: str = "fake",
        demo: bool = False,
    ) -> None:
        self.models = list(models) or ["demo"]
        self.api_key = api_key
        self.name = name
        self.demo = demo
        self.url = ""
        self.requests = 0
        self.active_streams = 0
        self.cancelled = 0
        self.last_requests: deque[dict[str, Any]] = deque(maxlen=50)
        self.server: asyncio.Server | None = None
        self._open: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._name = name.encode()
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/models"): self._list_models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/health"): self._health,
            ("GET", "/_fake/state"): self._state,
            ("POST", "/_fake/reset"): self._reset,
        }

    def state(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "active_streams": self.active_streams,
            "cancelled": self.cancelled,
            "last_requests": list(self.last_requests),
        }

    def reset(self) -> None:
        """Clear history; active_streams is live, so it is kept."""
        self.requests = self.cancelled = 0
        self.last_requests.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer, self._name)
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            while conn.keep_alive:
                try:
                    req = await conn.read_request()
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    conn.keep_alive = False
                    await conn.send(400, _error(f"malformed HTTP request: {exc}", "bad_request"))
                    return
                if req is None:
                    return
                await self._dispatch(conn, req)
                await conn.finish()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nobody is left to answer
        finally:
            del self._open[task]
            writer.close()

    async def close(self) -> None:
        """Stop listening and abort open connections.

        Handlers then end by themselves; cancelling them instead makes Python 3.11
        log a spurious traceback per connection.
        """
        if self.server is not None:
            self.server.close()
        for writer in self._open.values():
            writer.transport.abort()
        if self._open:
            await asyncio.wait(self._open, timeout=2)

    async def _dispatch(self, conn: _Conn, req: Request) -> None:
        body, problem = Body(), ""
        if req.method == "POST" and req.path.startswith("/v1/"):
            try:
                body = msgspec.json.decode(req.body, type=Body)
            except msgspec.DecodeError as exc:
                problem = f"invalid request body: {exc}"
        if not req.path.startswith("/_fake/"):
            self.requests += 1
            self.last_requests.append(
                {"method": req.method, "path": req.path, "headers": req.headers, "model": body.model}
            )
            auth = req.headers.get("authorization")
            if self.api_key and req.path.startswith("/v1/") and auth != f"Bearer {self.api_key}":
                return await conn.send(401, _error("invalid api key", "invalid_api_key"))
        route = self._routes.get((req.method, req.path))
        if route is None:
            return await conn.send(404, _error(f"no route {req.method} {req.path}", "not_found"))
        if problem:
            return await conn.send(400, _error(problem, "invalid_json"))
        await route(conn, req, body)

    async def _list_models(self, conn: _Conn, req: Request, body: Body) -> None:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakellm"} for m in self.models]
        await conn.send(200, _encode({"object": "list", "data": data}))

    async def _health(self, conn: _Conn, req: Request, body: Body) -> None:
        await conn.send(200, b'{"status":"ok"}')

    async def _state(self, conn: _Conn, req: Request, body: Body) -> None:
        await conn.send(200, _encode(self.state()))

    async def _reset(self, conn: _Conn, req: Request, body: Body) -> None:
        self.reset()
        await self._state(conn, req, body)

    async def _chat(self, conn: _Conn, req: Request, body: Body) -> None:
        await self._complete(conn, req, body, chat=True)

    async def _completions(self, conn: _Conn, req: Request, body: Body) -> None:
        await self._complete(conn, req, body, chat=False)

    async def _embeddings(self, conn: _Conn, req: Request, body: Body) -> None:
        if not await self._prelude(conn, body.fake):
            return
        texts = [body.input] if isinstance(body.input, str) else body.input
        data = [{"object": "embedding", "index": i, "embedding": _embedding(t)} for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        model = body.model or self.models[0]
        await conn.send(200, _encode({"object": "list", "data": data, "model": model, "usage": usage}))

    async def _complete(self, conn: _Conn, req: Request, body: Body, *, chat: bool) -> None:
        self.active_streams += body.stream
        try:
            if not await self._prelude(conn, body.fake):
                return
            pieces = self._pieces(req, body.fake)
            usage = _usage(body, len(pieces))
            head = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{self.requests}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.model or self.models[0],
            }
            if not body.stream:
                choice = _choice(chat, "".join(pieces), "stop", key="message", role=True)
                return await conn.send(200, _encode({**head, "choices": [choice], "usage": usage}))
            if chat:
                head["object"] = "chat.completion.chunk"
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            await self._stream(conn, body.fake, _events(chat, head, pieces, usage if with_usage else None))
        finally:
            self.active_streams -= body.stream

    async def _prelude(self, conn: _Conn, knobs: Knobs) -> bool:
        """Apply hang, head_delay_ms and status; False if the reply is settled already."""
        waits = knobs.hang or knobs.head_delay_ms > 0
        if waits and await conn.idle(None if knobs.hang else knobs.head_delay_ms / 1000):
            self.cancelled += 1
            conn.abort()
            return False
        if knobs.status is not None:
            kind = "server_error" if knobs.status >= 500 else "invalid_request_error"
            await conn.send(knobs.status, _error(f"fake status {knobs.status}", "fake_status", kind))
            return False
        return True

    def _pieces(self, req: Request, knobs: Knobs) -> list[str]:
        """Reply text as stream chunks; joined, it is the JSON reply's content."""
        if knobs.echo_headers:
            pieces = [_encode(req.headers).decode()]
        elif self.demo:
            pieces = _spaced(DEMO_SENTENCE.split(" "))
        else:
            pieces = _spaced([f"tok{i}" for i in range(knobs.chunks)])
        size = sum(map(len, pieces))
        if knobs.pad_bytes > size:
            pieces.append(" " + "x" * (knobs.pad_bytes - size - 1))
        return pieces

    async def _stream(self, conn: _Conn, knobs: Knobs, events: Iterator[bytes]) -> None:
        delay = (knobs.delay_ms if knobs.delay_ms is not None else 30.0 * self.demo) / 1000
        try:
            conn.start_stream()
            for i, event in enumerate(events):
                if i == knobs.die_after:
                    return conn.abort()
                if i and delay and await conn.idle(delay):
                    raise ConnectionResetError  # hung up while we paused
                await conn.send_event(event)
            await conn.end_stream()
        except ConnectionError:
            self.cancelled += 1
            conn.abort()


def _spaced(words: list[str]) -> list[str]:
    return [f" {w}" if i else w for i, w in enumerate(words)]


def _usage(body: Body, completion_tokens: int) -> dict[str, int]:
    """Word counts stand in for tokens: deterministic and good enough for a fake."""
    prompts = [m.get("content") for m in body.messages]
    prompts += [body.prompt] if isinstance(body.prompt, str) else body.prompt
    prompt = sum(len(p.split()) for p in prompts if isinstance(p, str))
    total = prompt + completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": total}


def _choice(chat: bool, text: str, finish: str | None, *, key: str = "delta", role: bool = False) -> dict[str, Any]:
    """One `choices` entry, shaped for chat (message/delta) or legacy completions (text)."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    message: dict[str, str] = {"role": "assistant"} if role else {}
    if text or role:
        message["content"] = text
    return {"index": 0, key: message, "logprobs": None, "finish_reason": finish}


def _events(chat: bool, head: dict[str, Any], pieces: list[str], usage: dict[str, int] | None) -> Iterator[bytes]:
    """SSE payloads: one per piece, a finish chunk, the optional usage chunk, [DONE]."""
    for i, piece in enumerate(pieces):
        yield _encode({**head, "choices": [_choice(chat, piece, None, role=chat and i == 0)]})
    yield _encode({**head, "choices": [_choice(chat, "", "stop")]})
    if usage is not None:
        yield _encode({**head, "choices": [], "usage": usage})
    yield b"[DONE]"


def _embedding(text: str) -> list[float]:
    """Eight floats in [-1, 1] from a stable hash, so equal inputs embed equally."""
    return [round(b / 127.5 - 1, 4) for b in hashlib.blake2b(text.encode(), digest_size=8).digest()]


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    models: Sequence[str],
    api_key: str | None = None,
    name: str = "fake",
    demo: bool = False,
) -> tuple[asyncio.Server, FakeLLM]:
    """Start listening (port 0 picks a free port, see ``llm.url``); close the server to stop."""
    llm = FakeLLM(models, api_key=api_key, name=name, demo=demo)
    server = await asyncio.start_server(llm.handle, host, port, backlog=1024)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    llm.server = server
    llm.url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    return server, llm
