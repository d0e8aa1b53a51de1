"""Connections to the broker: HTTP/2 where it can be had, HTTP/1.1 where it cannot.

Over HTTP/2 each httpx client holds one connection. httpx caps a connection at 100
concurrent streams and queues the rest with no timeout, and hypercorn ends a connection
after 1000 requests by default; so replies spread over a small pool of connections, and
each retires well before either limit. Over HTTP/1.1 (a proxy that strips ALPN, a
TLS-intercepting proxy, an http:// broker through a forward proxy) one client keeps a
bounded pool of keep-alive connections, one request each at a time.
"""

import asyncio
import ssl
import urllib.request

import httpx

from connector.settings import Settings

STREAMS_PER_LINK = 90  # below httpx's (and hypercorn's default) 100 streams
REQUESTS_PER_LINK = 800  # below hypercorn's default keep_alive_max_requests of 1000
HTTP1_CONNECTIONS = 64  # replies in flight at once over HTTP/1.1; more wait for a free one
CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
WARM_UP_PATH = "/health"


def proxy_for(settings: Settings) -> str | None:
    """--proxy, else HTTPS_PROXY / HTTP_PROXY as NO_PROXY allows, for the broker's URL."""
    if settings.proxy:
        return settings.proxy
    url = httpx.URL(settings.broker_url)
    if urllib.request.proxy_bypass(url.host):
        return None
    return urllib.request.getproxies_environment().get(url.scheme)


def speaks_h2c(settings: Settings) -> bool:
    """Whether to try cleartext HTTP/2: only straight to an http:// broker (proxies speak 1.1)."""
    return settings.broker_url.startswith("http://") and proxy_for(settings) is None


def make_client(
    settings: Settings, *, http2: bool, read_timeout: float | None, connections: int = 1
) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if settings.ca_certs:
        verify = ssl.create_default_context()
        verify.load_verify_locations(settings.ca_certs)
    cleartext = settings.broker_url.startswith("http://")
    return httpx.AsyncClient(
        # Over http:// only prior-knowledge h2c gets HTTP/2; over https:// ALPN decides.
        http1=not (http2 and cleartext),
        http2=http2,
        verify=verify,
        proxy=proxy_for(settings),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout, write=WRITE_TIMEOUT, pool=None),
    )


class Link:
    __slots__ = ("active", "capacity", "client", "ready", "retire_after", "used")

    def __init__(self, client: httpx.AsyncClient, capacity: int, retire_after: int | None) -> None:
        self.client = client
        self.capacity = capacity
        self.retire_after = retire_after
        self.active = 0
        self.used = 0
        self.ready = asyncio.Event()

    @property
    def retired(self) -> bool:
        return self.retire_after is not None and self.used >= self.retire_after

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


class LinkPool:
    """Reply connections: the least busy one with room, a new one when none has."""

    def __init__(self, settings: Settings, *, http2: bool) -> None:
        self._settings = settings
        self._http2 = http2
        self._links: list[Link] = []
        self._warming: set[asyncio.Task[None]] = set()

    def _new_link(self) -> Link:
        if not self._http2:
            client = make_client(self._settings, http2=False, read_timeout=None, connections=HTTP1_CONNECTIONS)
            link = Link(client, capacity=2**31, retire_after=None)  # httpx queues past its pool
            link.ready.set()
            return link
        link = Link(make_client(self._settings, http2=True, read_timeout=None), STREAMS_PER_LINK, REQUESTS_PER_LINK)
        warming = asyncio.create_task(link.warm_up(self._settings.broker_url + WARM_UP_PATH))
        self._warming.add(warming)
        warming.add_done_callback(self._warming.discard)
        return link

    async def acquire(self) -> Link:
        usable = [link for link in self._links if not link.retired and link.active < link.capacity]
        if usable:
            link = min(usable, key=lambda candidate: candidate.active)
        else:
            link = self._new_link()
            self._links.append(link)
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
