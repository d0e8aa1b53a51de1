"""HTTP/2 connections to the broker, each an httpx client holding one connection.

httpx caps a connection at 100 concurrent streams and queues the rest with no timeout,
and hypercorn ends a connection after 1000 requests by default; so replies spread over
a small pool of connections, and each connection retires well before either limit.
"""

import asyncio
import ssl

import httpx

from connector.settings import Settings

STREAMS_PER_LINK = 90  # below httpx's (and hypercorn's default) 100 streams
REQUESTS_PER_LINK = 800  # below hypercorn's default keep_alive_max_requests of 1000
CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
WARM_UP_PATH = "/health"


def make_client(settings: Settings, read_timeout: float | None) -> httpx.AsyncClient:
    cleartext = settings.broker_url.startswith("http://")
    verify: ssl.SSLContext | bool = True
    if settings.ca_certs:
        verify = ssl.create_default_context()
        verify.load_verify_locations(settings.ca_certs)
    return httpx.AsyncClient(
        # Over http:// only prior-knowledge h2c gets HTTP/2; over https:// ALPN decides.
        http1=not cleartext,
        http2=True,
        verify=verify,
        proxy=settings.proxy,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout, write=WRITE_TIMEOUT, pool=None),
    )


class Link:
    __slots__ = ("active", "client", "ready", "used")

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.active = 0
        self.used = 0
        self.ready = asyncio.Event()

    async def warm_up(self, url: str) -> None:
        """One short request before any long one.

        httpcore allows a single stream on a new HTTP/2 connection until it has read the
        server's SETTINGS; a reply POST whose body is still streaming reads nothing, so
        every other request on that connection would wait for it to end.
        """
        try:
            await self.client.get(url)
        except httpx.HTTPError:
            pass  # the requests that follow fail on their own, with their own errors
        finally:
            self.ready.set()

    @property
    def retired(self) -> bool:
        return self.used >= REQUESTS_PER_LINK


class LinkPool:
    """Reply connections: the least busy one with room, a new one when none has."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._links: list[Link] = []
        self._warming: set[asyncio.Task[None]] = set()

    async def acquire(self) -> Link:
        usable = [link for link in self._links if not link.retired and link.active < STREAMS_PER_LINK]
        if usable:
            link = min(usable, key=lambda candidate: candidate.active)
        else:
            link = Link(make_client(self._settings, read_timeout=None))
            self._links.append(link)
            warming = asyncio.create_task(link.warm_up(self._settings.broker_url + WARM_UP_PATH))
            self._warming.add(warming)
            warming.add_done_callback(self._warming.discard)
        link.active += 1
        link.used += 1
        try:
            await link.ready.wait()
        except BaseException:
            link.active -= 1
            raise
        return link

    async def release(self, link: Link) -> None:
        link.active -= 1
        if link.retired and link.active == 0:
            self._links.remove(link)
            await link.client.aclose()

    async def aclose(self) -> None:
        for task in self._warming:
            task.cancel()
        links, self._links = self._links, []
        for link in links:
            await link.client.aclose()
