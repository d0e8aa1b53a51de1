"""connector.netstream, the connector's links' network backend, against real sockets:
plain and TLS requests through make_client, connections reused and dropped, and every
failure as the httpx error httpx's own backend gives."""

import asyncio
import ssl
from pathlib import Path
from typing import Literal

import httpcore
import httpx
import pytest
import trustme

from connector.links import make_client
from connector.netstream import AsyncioBackend
from connector.settings import Settings

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class _Server:
    """An HTTP/1.1 server on a free port. Each request gets ``ok`` on a kept connection
    (``keep``), or ``ok`` and the connection closed (``close``), or no answer until the
    client gives up (``silent``), or the connection closed unanswered (``drop``). Counts
    the connections it accepted and those it closed."""

    def __init__(
        self, mode: Literal["keep", "close", "silent", "drop"] = "keep", tls: ssl.SSLContext | None = None
    ) -> None:
        self.mode, self.tls = mode, tls
        self.connections = self.closed = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                if self.mode == "silent":
                    await reader.read()
                if self.mode in ("silent", "drop"):
                    break
                writer.write(_OK)
                await writer.drain()
                if self.mode == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        await writer.wait_closed()
        self.closed += 1

    async def until_closed(self, count: int) -> None:
        for _ in range(1000):  # bounded
            if self.closed >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the server closed {self.closed} connections, not {count}")


def _client(url: str, *, read_timeout: float | None = 10.0, ca_certs: str | None = None) -> httpx.AsyncClient:
    settings = Settings(broker_url=url, token="t", llm_url="http://127.0.0.1:9", ca_certs=ca_certs)
    return make_client(settings, http2=False, read_timeout=read_timeout)


def test_make_client_dials_through_the_asyncio_backend() -> None:
    """If httpx stopped handing its pool's backend over, the connector would fall back to
    anyio's without a word: this says so."""

    async def main() -> None:
        async with _client("http://127.0.0.1:9") as client:
            assert isinstance(client._transport._pool._network_backend, AsyncioBackend)  # type: ignore[attr-defined]

    asyncio.run(main())


def test_requests_reuse_a_kept_connection() -> None:
    async def main() -> int:
        server = _Server()
        async with server as url, _client(url) as client:
            for _ in range(3):
                response = await client.get(url + "/")
                assert (response.status_code, response.content) == (200, b"ok")
        return server.connections

    assert asyncio.run(main()) == 1


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """httpcore asks an idle connection whether it is readable before reusing it: a closed
    one must say so, else the next request fails on a dead socket."""

    async def main() -> int:
        server = _Server("close")
        async with server as url, _client(url) as client:
            for done in range(1, 4):
                assert (await client.get(url + "/")).content == b"ok"
                await server.until_closed(done)
        return server.connections

    assert asyncio.run(main()) == 3


def test_a_silent_server_is_a_read_timeout() -> None:
    async def main() -> None:
        async with _Server("silent") as url, _client(url, read_timeout=0.2) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(url + "/")

    asyncio.run(main())


def test_a_peer_that_stops_reading_is_a_write_timeout() -> None:
    """Writes under the low-water mark skip the timer; once the buffers fill, the timeout
    still holds (without it this would wait for ever, and the outer bound fail it)."""

    async def main() -> int:
        held: list[asyncio.StreamWriter] = []  # the server keeps its end open and never reads

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        writes = 0
        try:
            async with asyncio.timeout(60):
                with pytest.raises(httpcore.WriteTimeout):
                    while writes < 256:  # 256 MiB at most: far beyond loopback's buffers
                        await stream.write(b"x" * (1 << 20), timeout=0.2)
                        writes += 1
        finally:
            await stream.aclose()
            server.close()
        return writes

    assert asyncio.run(main()) >= 1  # the first writes went through


def test_nobody_listening_is_a_connect_error() -> None:
    async def main() -> None:
        async with _Server() as url:
            pass  # closed: the port now refuses
        async with _client(url) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url + "/")

    asyncio.run(main())


def test_a_server_that_closes_without_answering_is_a_protocol_error() -> None:
    async def main() -> None:
        async with _Server("drop") as dropping, _client(dropping) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(dropping + "/")

    asyncio.run(main())


def test_tls_with_the_given_ca_and_a_refused_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_tls)
    cafile = f"{tmp_path}/ca.pem"
    ca.cert_pem.write_to_path(cafile)

    async def main() -> None:
        async with _Server(tls=server_tls) as url:
            async with _client(url, ca_certs=cafile) as client:
                response = await client.get(url + "/")
                assert response.content == b"ok"
            async with _client(url) as untrusting:  # the system's CAs: this one is unknown
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get(url + "/")

    asyncio.run(main())
