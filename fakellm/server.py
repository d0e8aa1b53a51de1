"""Fake LLM server: fast, deterministic and steerable per request, speaking every API family.

It is the LLM behind the bridge in end-to-end tests, a fast backend for
benchmarks, and the README's demo model. Only asyncio and msgspec are used so
it starts instantly and serves thousands of small requests per second.

API::

    server, llm = await serve("127.0.0.1", 0, models=["m1"], api_key=None, name="fake", ollama=False)
    llm.url                                   # "http://127.0.0.1:PORT"
    llm.requests, llm.active_streams, llm.peak_streams, llm.cancelled, llm.last_requests, llm.responses
    llm.state(), llm.reset()                  # same as GET /_fake/state, POST /_fake/reset
    await llm.close()                         # stop listening, drop connections quietly

Endpoints (see `ROUTES`): OpenAI's models, chat/completions, completions, embeddings,
rerank, images/generations, audio (transcriptions and translations as streamed
multipart, speech as binary); the Responses API with stored responses; Anthropic's
messages and messages/count_tokens; Ollama's /api/*; GET /health, GET /_fake/state,
POST /_fake/reset. With ``api_key`` set, /v1/ paths need ``Authorization: Bearer
<api_key>`` or ``x-api-key: <api_key>`` (as llama.cpp accepts); Ollama's /api/ has no
keys. With ``ollama`` set, GET /v1/models answers 404 like an Ollama-only server.

Tests steer each request through an extra body field ``"fake": {...}`` (the
bridge forwards bodies unchanged) or, for multipart and GET requests, an
``X-Fake: {...}`` header; see `Knobs` for the fields.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

from fakellm import anthropic_api, audio, ollama_api, openai_api, responses_api
from fakellm.common import Exchange, Failed, Handler, error_body
from fakellm.http import Conn, Request

ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/v1/models"): openai_api.models,
    ("POST", "/v1/chat/completions"): openai_api.chat,
    ("POST", "/v1/completions"): openai_api.completions,
    ("POST", "/v1/embeddings"): openai_api.embeddings,
    ("POST", "/v1/rerank"): openai_api.rerank,
    ("POST", "/v1/images/generations"): openai_api.images,
    ("POST", "/v1/audio/transcriptions"): audio.transcribe,
    ("POST", "/v1/audio/translations"): audio.transcribe,
    ("POST", "/v1/audio/speech"): audio.speech,
    ("POST", "/v1/responses"): responses_api.create,
    ("POST", "/v1/messages"): anthropic_api.messages,
    ("POST", "/v1/messages/count_tokens"): anthropic_api.count_tokens,
    ("GET", "/health"): openai_api.health,
    **ollama_api.ROUTES,
}
# By-id routes: the id is read from the path by the handler.
PATTERNS: list[tuple[str, re.Pattern[str], Handler]] = [
    ("GET", re.compile(r"/v1/responses/[^/]+"), responses_api.retrieve),
    ("DELETE", re.compile(r"/v1/responses/[^/]+"), responses_api.delete),
    ("POST", re.compile(r"/v1/responses/[^/]+/cancel"), responses_api.cancel),
    ("GET", re.compile(r"/v1/responses/[^/]+/input_items"), responses_api.input_items),
]
# Uploads are hashed as they stream in; the handler reads the body itself.
STREAMED_BODIES = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})


def _route(method: str, path: str) -> Handler | None:
    handler = ROUTES.get((method, path))
    if handler is None:
        handler = next((h for m, p, h in PATTERNS if m == method and p.fullmatch(path)), None)
    return handler


class FakeLLM:
    """Config and observable state of one fake LLM; `handle` serves a connection."""

    def __init__(
        self,
        models: Sequence[str],
        *,
        api_key: str | None = None,
        name: str = "fake",
        demo: bool = False,
        ollama: bool = False,
    ) -> None:
        self.models = list(models) or ["demo"]
        self.api_key = api_key
        self.name = name
        self.demo = demo
        self.ollama = ollama
        self.url = ""
        self.requests = 0
        self.active_streams = 0
        self.peak_streams = 0  # the most streams at once since the last reset
        self.cancelled = 0
        self.connections = 0  # accepted since the last reset (keep-alive reuses one)
        self.released = asyncio.Event()  # uploads with the `hold_body` knob wait for it
        self.last_requests: deque[dict[str, Any]] = deque(maxlen=50)
        self.responses = responses_api.Store()
        self.serial = itertools.count(1)  # for ids: unlike `requests`, never reset
        self.server: asyncio.Server | None = None
        self._open: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._name = name.encode()
        self._local: dict[tuple[str, str], Handler] = {
            ("GET", "/_fake/state"): self._state,
            ("POST", "/_fake/reset"): self._reset,
            ("POST", "/_fake/release"): self._release,
        }

    def state(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "active_streams": self.active_streams,
            "peak_streams": self.peak_streams,
            "cancelled": self.cancelled,
            "connections": self.connections,
            "last_requests": list(self.last_requests),
            "responses": self.responses.ids(),
        }

    def reset(self) -> None:
        """Clear history; active_streams is live and stored responses are the LLM's, so both are kept."""
        self.requests = self.cancelled = self.connections = 0
        self.peak_streams = self.active_streams
        self.last_requests.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, self._name)
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            while conn.keep_alive:
                try:
                    req = await conn.read_head()
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    conn.keep_alive = False
                    await conn.send(400, error_body("/", 400, f"malformed HTTP request: {exc}", "bad_request"))
                    return
                if req is None:
                    return
                await self._dispatch(conn, req)
                await conn.finish()
                if conn.keep_alive:
                    await conn.drain_body()
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

    async def _dispatch(self, conn: Conn, req: Request) -> None:
        record: dict[str, Any] = {"method": req.method, "path": req.path, "query": req.query, "headers": req.headers}
        local = self._local.get((req.method, req.path))
        if local is None:
            self.requests += 1
            record["model"] = None
            self.last_requests.append(record)
        x = Exchange(self, conn, req, record)
        try:
            if local is not None:
                return await local(x)
            x.knobs_from_header()
            if req.path not in STREAMED_BODIES:
                await x.read()  # before any reply: the whole request is recorded, even a refused one
            self._authorize(req)
            handler = _route(req.method, req.path)
            if handler is None:
                raise Failed(404, f"no route {req.method} {req.path}", "not_found")
            await handler(x)
        except Failed as failure:
            await x.fail(failure)
        finally:
            if x.active:
                self.active_streams -= 1

    def _authorize(self, req: Request) -> None:
        if not self.api_key or not req.path.startswith("/v1/"):
            return
        bearer = req.headers.get("authorization") == f"Bearer {self.api_key}"
        if not bearer and req.headers.get("x-api-key") != self.api_key:
            raise Failed(401, "invalid api key", "invalid_api_key")

    async def _state(self, x: Exchange) -> None:
        await x.send_json(self.state())

    async def _release(self, x: Exchange) -> None:
        """Uploads held by the `hold_body` knob are read from now on."""
        self.released.set()
        await self._state(x)

    async def _reset(self, x: Exchange) -> None:
        self.reset()
        await self._state(x)


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    models: Sequence[str],
    api_key: str | None = None,
    name: str = "fake",
    demo: bool = False,
    ollama: bool = False,
) -> tuple[asyncio.Server, FakeLLM]:
    """Start listening (port 0 picks a free port, see ``llm.url``); close the server to stop."""
    llm = FakeLLM(models, api_key=api_key, name=name, demo=demo, ollama=ollama)
    server = await asyncio.start_server(llm.handle, host, port, backlog=1024)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    llm.server = server
    llm.url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    return server, llm
