"""The connector's reply channel: the reply frames of every request on one upload.

A POST per reply costs a stream setup on both sides for every request and runs into
httpx's cap of 100 streams per connection. Instead one streaming POST per session carries
all replies; each write takes whatever was queued while the previous one went out, so
frames that are ready together cost one write. Per-request flow control is the broker's
Credit frames: a slow user holds back only its own reply. Where a proxy buffers request
bodies, the same frames go out as a series of short POSTs instead.
"""

import asyncio
from collections.abc import AsyncIterator

import httpx

from wire import FRAMES_CONTENT_TYPE, PARTIAL_HEADER

BATCH_INTERVAL = 0.05  # when batching, frames leave in POSTs this far apart
MAX_WRITE = 256 * 1024


class UplinkError(Exception):
    """The upload broke or the broker refused it: the session is over."""


class Uplink:
    def __init__(self, client: httpx.AsyncClient, url: str, headers: dict[str, str], *, batching: bool) -> None:
        self._client = client
        self._url = url
        # Partial: the end of an upload body says nothing about the requests in it.
        self._headers = {**headers, "content-type": FRAMES_CONTENT_TYPE, PARTIAL_HEADER: "1"}
        self._batching = batching
        self._parts: list[bytes] = []
        self._wake = asyncio.Event()
        self._closing = False

    def send(self, data: bytes) -> None:
        self._parts.append(data)
        self._wake.set()

    def close(self) -> None:
        """Finish the upload once everything queued has left."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Upload until closed; raises UplinkError (or an httpx error) when it breaks."""
        if self._batching:
            while (data := await self._take()) is not None:
                await asyncio.sleep(BATCH_INTERVAL)
                self._check(await self._client.post(self._url, content=data + self._take_now(), headers=self._headers))
            return

        async def body() -> AsyncIterator[bytes]:
            while (data := await self._take()) is not None:
                yield data

        self._check(await self._client.post(self._url, content=body(), headers=self._headers))

    async def _take(self) -> bytes | None:
        """Everything queued, once there is something; None once closed and drained."""
        while not self._parts:
            if self._closing:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._take_now()

    def _take_now(self) -> bytes:
        """What is queued, up to about MAX_WRITE: httpcore copies the unsent rest of a write
        for every 16 KiB frame it sends, so one huge write would cost quadratic time."""
        parts = self._parts
        size, count = 0, 0
        while count < len(parts) and size < MAX_WRITE:
            size += len(parts[count])
            count += 1
        taken = parts[:count]
        del parts[:count]
        return taken[0] if count == 1 else b"".join(taken)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code >= 300:
            raise UplinkError(f"the broker answered an upload with {response.status_code}")
