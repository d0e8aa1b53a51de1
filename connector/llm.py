"""The connector's client for its local LLM server: replays request frames verbatim."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from connector.llm_transport import LLMTransport
from wire import Request

# Headers that belong to the broker's hop or that the LLM must not see from the user.
_DROP = frozenset({"host", "origin", "authorization", "content-length", "connection", "keep-alive"})


class LLMClient:
    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url)
        self._base = base_url.rstrip("/")
        # "--llm-url http://host/v1" and "http://host" both work with "/v1/..." paths.
        self._strip_v1 = url.path.rstrip("/").endswith("/v1")
        self._host = url.netloc.decode("ascii")
        # No proxy: one set for reaching the broker is not for the LLM next door.
        self._transport = LLMTransport()

    def build(self, request: Request) -> httpx.Request:
        path = request.path
        if self._strip_v1 and path.startswith("/v1/"):
            path = path[3:]
        headers = [(k, v) for k, v in request.headers if k.lower() not in _DROP]
        headers.append(("host", self._host))  # Ollama answers 403 to a foreign Host or an Origin
        if request.llm_api_key:
            headers.append(("authorization", f"Bearer {request.llm_api_key}"))
        if not any(k.lower() == "accept-encoding" for k, _ in headers):
            headers.append(("accept-encoding", "identity"))
        url = self._base + path + (f"?{request.query}" if request.query else "")
        return httpx.Request(
            request.method,
            url,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            content=request.body,
        )

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[httpx.Response]:
        response = await self._transport.handle_async_request(self.build(request))
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()
