"""The connector's client for its local LLM server: replays request frames, within bounds.

The broker is trusted with keys, not with reach: whatever a request frame says, the
connector talks only to ``--llm-url``'s own origin, only below its base path, only with
the methods of the forwarded API, and only with canonical paths (wire.targets). A frame
outside that is refused (``Forbidden``): logged, answered with an error reply, tunnel kept.
"""

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager

import httpx

from connector.llm_transport import LLMTransport, Origin
from wire import Request
from wire.headers import forwardable_request_header, valid_header
from wire.targets import canonical_path, canonical_query

# The methods of the forwarded API (POST), of model listing and of the by-id routes.
METHODS = frozenset({"GET", "POST", "DELETE"})


class Forbidden(Exception):
    """A request frame the connector will not send to its LLM; the message says why."""


class LLMClient:
    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url)  # parsed once: requests never re-parse a URL string
        default_port = 443 if url.scheme == "https" else 80
        self.origin: Origin = (url.scheme, url.host, url.port or default_port)
        base = url.raw_path.decode("ascii").rstrip("/")
        # "--llm-url http://host/v1" and "http://host" both work with "/v1/..." paths.
        self._strip_v1 = base.endswith("/v1")
        self._base = base[:-3] if self._strip_v1 else base
        self._host = url.netloc.decode("ascii")
        # No proxy: one set for reaching the broker is not for the LLM next door.
        self._transport = LLMTransport()

    def target(self, request: Request) -> bytes:
        """The request target below the base path; Forbidden for anything else."""
        if request.method not in METHODS:
            raise Forbidden(f"method {request.method[:16]!r} is not forwarded")
        if not canonical_path(request.path) or not canonical_query(request.query):
            raise Forbidden("the path is not canonical")
        query = f"?{request.query}" if request.query else ""
        return (self._base + request.path + query).encode("ascii")

    def headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        """The user's forwardable headers, then this hop's own: Host, the LLM key, the encoding."""
        headers = []
        for key, value in request.headers:
            name = key.lower()
            if not valid_header(name, value):
                raise Forbidden("a header is not valid HTTP")
            if forwardable_request_header(name):
                headers.append((name.encode("latin-1"), value.encode("latin-1")))
        headers.append((b"host", self._host.encode("ascii")))  # Ollama answers 403 to a foreign Host
        if request.llm_api_key:
            if not valid_header("authorization", request.llm_api_key):
                raise Forbidden("the LLM key is not valid in a header")
            headers.append((b"authorization", f"Bearer {request.llm_api_key}".encode("latin-1")))
        if not any(name == b"accept-encoding" for name, _ in headers):
            headers.append((b"accept-encoding", b"identity"))
        return headers

    @asynccontextmanager
    async def stream(self, request: Request, body: AsyncIterable[bytes] | None = None) -> AsyncIterator[httpx.Response]:
        """The LLM's response; the request's body is ``body`` as it streams, if given."""
        target = self.target(request)
        headers = self.headers(request)
        data = request.body if body is None else body
        response = await self._transport.send(self.origin, request.method, target, headers, data)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()


def body_of(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body of a response from ``LLMClient.stream``, as the transport reads it: httpx's
    aiter_raw would add a generator and a re-chunker per piece, for nothing here (the
    stream closes with the response)."""
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    return aiter(stream)
