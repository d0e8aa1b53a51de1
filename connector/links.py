"""Connections to the broker: HTTP/2 where it can be had, HTTP/1.1 where it cannot.

Each httpx client holds one connection with one long-lived request at a time — the poll,
or the uplink — so neither waits behind the other, and a read timeout (which httpx keeps
per connection) can only fail the request it was meant for. HTTP/1.1 serves when HTTP/2
is not to be had: a TLS-intercepting proxy, a proxy that strips ALPN, an http:// broker
through a forward proxy.
"""

import ssl
import urllib.request

import httpx

from connector.netstream import AsyncioBackend
from connector.settings import Settings

CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0


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


def make_client(settings: Settings, *, http2: bool, read_timeout: float | None) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if settings.ca_certs:
        verify = ssl.create_default_context()
        verify.load_verify_locations(settings.ca_certs)
    cleartext = settings.broker_url.startswith("http://")
    proxy = proxy_for(settings)
    transport = httpx.AsyncHTTPTransport(
        # Over http:// only prior-knowledge h2c gets HTTP/2; over https:// ALPN decides.
        http1=not (http2 and cleartext),
        http2=http2,
        verify=verify,
        proxy=proxy,
        trust_env=False,  # the proxy is resolved above, once, the way the h2c decision saw it
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )
    # httpx takes no network backend, its pool does (httpcore's extension point). Not through
    # an https:// proxy: TLS inside TLS stays anyio's (asyncio's start_tls is not tested for it here).
    if proxy is None or not proxy.startswith("https://"):
        transport._pool._network_backend = AsyncioBackend()
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout, write=WRITE_TIMEOUT, pool=None),
    )
