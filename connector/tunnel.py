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

import httpx

from connector import __version__
from connector.links import make_client
from connector.llm import LLMClient
from connector.path import PathProfile
from connector.rotation import Rotation
from connector.session import Refused, Session, SessionLost, Status, error_message
from connector.settings import Settings
from connector.uplink import UplinkError
from wire import FRAMES_CONTENT_TYPE, REGISTER_PATH, FrameError, Hello, ProtocolError, Welcome, decode_all, encode

__all__ = ["Status", "Tunnel", "backoff_delay"]

log = logging.getLogger("remotellm.connector")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0  # a session that lasted this long resets the backoff
DRAIN_TIMEOUT = 30.0  # how long replies in flight may run on when a session ends gracefully
REGISTER_TIMEOUT = 10.0  # a path that accepts connections but never answers is retried soon


def backoff_delay(attempt: int) -> float:
    """Full jitter: a crowd of connectors does not reconnect in step after a broker restart."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


class Tunnel:
    """Registers, serves a session until it ends, and starts over — until stopped."""

    def __init__(self, settings: Settings, llm: LLMClient, status: Status) -> None:
        self.settings = settings
        self.llm = llm
        self.status = status
        self.connector_id = uuid.uuid4().hex
        self.rotation = Rotation(settings)  # (it owns the Authorization header: a rotation replaces it)
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
                session = self._current = Session(
                    self.settings, self.llm, self.status, self.path, self.rotation.auth, welcome, self.rotation
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
            except (httpx.HTTPError, FrameError, ProtocolError, UplinkError, OSError) as exc:
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
                if session is not None and not winding_down and not self.stopping:
                    await session.abort()
            if self.stopping:
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

    async def _register(self) -> Welcome:
        """A new session's Welcome."""
        hello = Hello(self.connector_id, __version__, list(self.settings.models))
        try:
            async with make_client(self.settings, http2=self.path.http2, read_timeout=REGISTER_TIMEOUT) as client:
                response = await client.post(
                    self.settings.broker_url + REGISTER_PATH,
                    content=encode(hello),
                    headers={**self.rotation.auth, "content-type": FRAMES_CONTENT_TYPE},
                )
        except httpx.RemoteProtocolError:
            self.path.observe_h2c_refused()
            raise
        if response.status_code != 200:
            raise Refused(f"register answered {response.status_code}: {error_message(response)}")
        frames = decode_all(response.content)
        if len(frames) != 1 or not isinstance(frames[0], Welcome):
            raise FrameError("register did not answer with a Welcome frame")
        return frames[0]
