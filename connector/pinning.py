"""Requests pinned to one broker process, through whatever balances in between.

A load balancer may put each request (nginx) or each connection (worker processes on one
port) on any broker; a session lives in one. So every request of a session names its
broker (wire.BROKER_HEADER), another broker answers 421, and the connector tries again on
a new connection — a few times at once, then after the usual pause.
"""

from collections import ChainMap
from collections.abc import Mapping, MutableMapping

import httpx

from wire import BROKER_HEADER, MISDIRECTED, REPLY_PATH

# Tries on new connections before a pause: with N brokers behind a balancer that picks at
# random, 8 misses in a row happen with probability ((N-1)/N)^8 (4 % for N = 3).
MISDIRECT_ATTEMPTS = 8


class Misdirected(Exception):
    """The request reached another broker process than the one it is pinned to."""


def pinned(headers: MutableMapping[str, str], broker_id: str) -> MutableMapping[str, str]:
    """``headers`` for requests meant for ``broker_id`` alone ("" pins nothing: an old broker).
    A live view: a rotated credential in ``headers`` shows through."""
    return ChainMap({BROKER_HEADER: broker_id}, headers) if broker_id else headers


def check_pinned(response: httpx.Response) -> None:
    if response.status_code == MISDIRECTED:
        raise Misdirected(f"{response.request.url.path} reached another broker")


async def probe_uplink(client: httpx.AsyncClient, base_url: str, headers: Mapping[str, str]) -> bool:
    """An empty uplink body on ``client``'s connection: raises Misdirected when that connection
    is to another broker; False when nothing is pinned (nothing to probe).

    A streaming upload cannot learn it itself over HTTP/2: its answer is read only once its
    body ends, and an uplink's body runs for as long as the session. Behind a balancer that
    picks per request the probe proves nothing (the upload's own 421 arrives at once there,
    as the balancer ends the exchange): the session stops probing once it sees that.
    """
    if BROKER_HEADER not in headers:
        return False
    check_pinned(await client.post(base_url + REPLY_PATH, content=b"", headers=headers))
    return True
