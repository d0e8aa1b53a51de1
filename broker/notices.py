"""Notices between brokers through Redis pub/sub: "the configuration changed", "this token is revoked".

An accelerator, not the guarantee: each broker's own config watch reloads within its poll
interval whether or not a notice arrives, so a notice lost while Redis is down costs speed,
never correctness. A broker ignores its own notices.
"""

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Literal

import msgspec
import redis.asyncio as aioredis

from broker.limits_redis import REDIS_TIMEOUT, REDIS_UNREACHABLE, redis_client

log = logging.getLogger("remotellm.notices")

CHANNEL = "remotellm:notices"
MAX_NOTICE = 1024  # bytes: anything larger on the channel is not ours
RECONNECT_DELAY = 1.0  # after a lost subscription


class Notice(msgspec.Struct, forbid_unknown_fields=True):
    sender: str
    kind: Literal["config", "revoked"]
    token_digest: str = ""  # for "revoked": the token's sha256, hex


_decode = msgspec.json.Decoder(Notice).decode


class Notices:
    """This broker's end of the channel: ``config_changed`` and ``revoked`` tell the other
    brokers, ``listen`` hears theirs."""

    def __init__(
        self, url: str, on_config: Callable[[], None], on_revoked: Callable[[bytes], None], channel: str = CHANNEL
    ) -> None:
        self._url = url
        self._on_config = on_config
        self._on_revoked = on_revoked
        self._channel = channel
        self._sender = secrets.token_hex(8)
        self._client = redis_client(url)

    async def config_changed(self) -> None:
        """This broker reloaded its configuration: the others reload theirs now."""
        await self._publish(Notice(self._sender, "config"))

    async def revoked(self, token_digest: bytes) -> None:
        """A connector token is revoked (an enrolled connector removed): every other broker drops
        its sessions (``Hub.revoke``; the caller drops this broker's own)."""
        await self._publish(Notice(self._sender, "revoked", token_digest.hex()))

    async def _publish(self, notice: Notice) -> None:
        try:
            await self._client.publish(self._channel, msgspec.json.encode(notice))
        except REDIS_UNREACHABLE as exc:  # the peers' own config watch still reloads in time
            log.warning("notice %r not published, redis unreachable: %s", notice.kind, type(exc).__name__)

    async def listen(self) -> None:
        """Forever: subscribe, hand on each peer's notice, and subscribe again after a loss
        (one log line when the subscription is lost, one when it is back)."""
        lost = False
        while True:
            # No socket timeout: a subscription is silent for as long as no broker reloads.
            client = aioredis.Redis.from_url(self._url, socket_connect_timeout=REDIS_TIMEOUT)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    if lost:
                        log.warning("notices from other brokers arrive again")
                        lost = False
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._handle(message["data"])
            except REDIS_UNREACHABLE as exc:
                if not lost:
                    log.warning(
                        "notices from other brokers lost (%s): each broker's own watch goes on", type(exc).__name__
                    )
                lost = True
            finally:
                with contextlib.suppress(*REDIS_UNREACHABLE):
                    await client.aclose()
            await asyncio.sleep(RECONNECT_DELAY)

    def _handle(self, data: object) -> None:
        if not isinstance(data, bytes) or len(data) > MAX_NOTICE:
            return
        try:
            notice = _decode(data)
            digest = bytes.fromhex(notice.token_digest)
        except (msgspec.DecodeError, ValueError):
            log.warning("a malformed notice on %s was ignored", self._channel)
            return
        if notice.sender == self._sender:
            return
        if notice.kind == "config":
            log.info("another broker reloaded its configuration: reloading")
            self._on_config()
        elif len(digest) == 32:
            self._on_revoked(digest)

    async def aclose(self) -> None:
        with contextlib.suppress(*REDIS_UNREACHABLE):
            await self._client.aclose()
