"""The connector's uplink: every reply frame of a session, on one streaming POST.

A POST per reply costs a stream setup on both sides for every request and runs into
httpx's cap of 100 streams per connection. Instead one streaming POST carries all
replies; each write takes whatever was ready while the previous one went out, so frames
that are ready together cost one write. Where a proxy buffers request bodies, the same
frames go out as a series of short POSTs instead. A POST that breaks loses nothing: the
session sends again what the broker has not acknowledged, on the next one.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx

from wire import FRAMES_CONTENT_TYPE

BATCH_INTERVAL = 0.05  # when batching, frames leave in POSTs this far apart


class UplinkError(Exception):
    """The broker refused an upload; ``status`` says how."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the broker answered an upload with {status}")
        self.status = status


class Source(Protocol):
    """Where the uplink's bytes come from (the session's state machine)."""

    async def next_write(self) -> bytes | None:
        """The next write, once there is one; None when the uplink is to end."""

    def ready_now(self) -> bytes:
        """What is ready to write right now, maybe nothing."""


async def upload(
    client: httpx.AsyncClient, url: str, headers: Mapping[str, str], source: Source, *, batching: bool
) -> None:
    """Upload what ``source`` gives until it gives None; raises when the POST breaks.
    ``headers`` is read at each POST: a rotated credential takes effect at the next one."""
    if batching:
        while (data := await source.next_write()) is not None:
            await asyncio.sleep(BATCH_INTERVAL)  # gather what follows into the same POST
            content = data + source.ready_now()
            _check(await client.post(url, content=content, headers={**headers, "content-type": FRAMES_CONTENT_TYPE}))
        return

    async def body() -> AsyncIterator[bytes]:
        while (data := await source.next_write()) is not None:
            yield data

    _check(await client.post(url, content=body(), headers={**headers, "content-type": FRAMES_CONTENT_TYPE}))


def _check(response: httpx.Response) -> None:
    if response.status_code >= 300:
        raise UplinkError(response.status_code)
