"""The connector's side of the tunnel: register, serve the session, and start over.

Like cloudflared: long-lived outbound connections — one carries the poll, one the uplink
with every reply. A broken connection is reopened on the same session (connector.session);
a session the broker no longer knows means register again, with exponential backoff and
jitter, forever; a drain lets the replies in flight finish first.
"""

import asyncio
import logging
import random
import time
import uuid
from typing import Protocol

import httpx

from connector import __version__
from connector.links import make_client
from connector.llm import LLMClient
from connector.path import PathProfile
from connector.pinning import MISDIRECT_ATTEMPTS, Misdirected, check_pinned, pinned
from connector.rotation import Rotation
from connector.session import Refused, Session, SessionLost, Status, error_message
from connector.settings import Settings
from connector.slots import SlotCounter
from connector.uplink import UplinkError
from wire import (
    CONNECTOR_ID_SEPARATOR,
    FRAMES_CONTENT_TYPE,
    REGISTER_PATH,
    FrameError,
    Hello,
    ProtocolError,
    Welcome,
    decode_all,
    encode,
)

__all__ = ["Membership", "Status", "Tunnel", "backoff_delay"]

log = logging.getLogger("remotellm.connector")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0  # a session that lasted this long resets the backoff
DRAIN_TIMEOUT = 30.0  # how long replies in flight may run on when a session ends gracefully
REGISTER_TIMEOUT = 10.0  # a path that accepts connections but never answers is retried soon


def backoff_delay(attempt: int) -> float:
    """Full jitter: a crowd of connectors does not reconnect in step after a broker restart."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


class Membership(Protocol):
    """The fleet a tunnel belongs to (connector.fleet): one tunnel per broker."""

    def claim(self, tunnel: "Tunnel", broker_id: str) -> bool:
        """Whether the tunnel may hold a session to ``broker_id`` (False: another holds one)."""

    def heard(self, tunnel: "Tunnel", brokers: list[tuple[str, str]]) -> None:
        """The tunnel's broker listed the live brokers."""

    def lost(self, tunnel: "Tunnel") -> None:
        """The tunnel's session ended: what it heard no longer counts."""

    def keep(self, tunnel: "Tunnel") -> bool:
        """Whether the tunnel registers again after its session ended."""

    # What every tunnel of the fleet shares: max_concurrent over all its sessions, and its
    # name on every broker (the part of each tunnel's Hello.connector_id before the dot).
    slots: SlotCounter
    connector_id: str
    rotation: Rotation  # the one credential every tunnel presents


class Tunnel:
    """Registers, serves a session until it ends, and starts over — until stopped.

    ``pin``: the broker id it is for (it registers there alone, through any balancer);
    None: any broker at its URL (a --broker-url, where the fleet starts).
    """

    def __init__(
        self, settings: Settings, llm: LLMClient, status: Status, fleet: Membership, pin: str | None = None
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.status = status
        self.fleet = fleet
        self.pin = pin
        self.broker_id = ""  # the broker of the current session ("" before one, or a broker alone)
        self.connector_id = f"{fleet.connector_id}{CONNECTOR_ID_SEPARATOR}{uuid.uuid4().hex[:8]}"
        self.path = PathProfile(settings)
        self._current: Session | None = None
        self._winding_down: set[asyncio.Task[None]] = set()
        self.stopping = False

    async def run(self) -> None:
        attempt = 0
        while not self.stopping:
            started = time.monotonic()
            session = None
            winding_down = False
            try:
                welcome = await self._register()
                if welcome.broker and not self.fleet.claim(self, welcome.broker):
                    log.info("broker %s already has a tunnel: this one ends", welcome.broker)
                    return
                self.broker_id = welcome.broker
                headers = pinned(self.fleet.rotation.auth, welcome.broker)
                session = self._current = Session(
                    self.settings,
                    self.llm,
                    self.status,
                    self.path,
                    headers,
                    welcome,
                    self.fleet.slots,
                    self._heard,
                    self.fleet.rotation,
                )
                await session.serve()
                # The broker is draining: its replies finish in the background, we move on.
                task = asyncio.create_task(session.finish(DRAIN_TIMEOUT))
                winding_down = True
                self._winding_down.add(task)
                task.add_done_callback(self._winding_down.discard)
            except Refused as exc:
                self.status.last_error = str(exc)
                log.error("broker refused this connector: %s", exc)
            except SessionLost as exc:
                log.warning("session lost (%s): registering again", exc)
                attempt = -1  # not a failure of the broker: come back at once
            except (httpx.HTTPError, FrameError, ProtocolError, UplinkError, OSError, Misdirected) as exc:
                if self.stopping:  # the uplink was closed on purpose
                    return
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("tunnel down: %s", self.status.last_error)
            except Exception as exc:  # a bug must not end the connector: log it and reconnect
                self.status.last_error = f"internal error: {type(exc).__name__}"
                log.exception("tunnel failed unexpectedly")
            finally:
                self.status.connected = False
                self._current = None
                self.broker_id = ""
                self.fleet.lost(self)
                if session is not None and not winding_down and not self.stopping:
                    await session.abort()
            if self.stopping or not self.fleet.keep(self):
                return
            if time.monotonic() - started > STABLE_AFTER:
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def drain(self) -> None:
        """Graceful stop: the broker stops routing here, replies in flight finish (bounded)."""
        self.stopping = True
        session = self._current
        if session is not None:
            session.drain("connector shutting down")
            await session.finish(DRAIN_TIMEOUT)
        if self._winding_down:
            await asyncio.wait(self._winding_down, timeout=DRAIN_TIMEOUT)

    def _heard(self, brokers: list[tuple[str, str]]) -> None:
        self.fleet.heard(self, brokers)

    async def _register(self) -> Welcome:
        """A new session's Welcome; a pinned tunnel tries new connections until its broker answers."""
        for _ in range(MISDIRECT_ATTEMPTS - 1):
            try:
                return await self._register_once()
            except Misdirected:
                pass
        return await self._register_once()

    async def _register_once(self) -> Welcome:
        hello = Hello(self.connector_id, __version__, list(self.settings.models))
        headers = pinned(self.fleet.rotation.auth, self.pin or "")
        try:
            async with make_client(self.settings, http2=self.path.http2, read_timeout=REGISTER_TIMEOUT) as client:
                response = await client.post(
                    self.settings.broker_url + REGISTER_PATH,
                    content=encode(hello),
                    headers={**headers, "content-type": FRAMES_CONTENT_TYPE},
                )
        except httpx.RemoteProtocolError:
            self.path.observe_h2c_refused()
            raise
        check_pinned(response)
        if response.status_code != 200:
            raise Refused(f"register answered {response.status_code}: {error_message(response)}")
        frames = decode_all(response.content)
        if len(frames) != 1 or not isinstance(frames[0], Welcome):
            raise FrameError("register did not answer with a Welcome frame")
        return frames[0]
