"""Credential rotation on the connector's side: when the broker asks, make a new credential,
have the broker take it, keep it in the credentials file, and present it from then on.

The broker keeps the old credential working until the new one is first presented, so the
live session never drops; if the file cannot be written, the connector goes on with the
old one (still valid) rather than hold a credential it would lose at its next start.
"""

import asyncio
import logging
import secrets

import httpx

from connector.credentials import write_credential
from connector.links import make_client
from connector.settings import Settings
from wire.endpoints import CREDENTIAL_PREFIX, ROTATE_PATH

log = logging.getLogger("remotellm.connector")

ROTATE_TIMEOUT = 30.0


class Rotation:
    """Owns the connector's Authorization header (``auth``) and replaces it in place when
    rotated: every tunnel's session reads it at each request, so all of them present the new
    credential from their next request on (the broker retires the old one at its first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = {"authorization": f"Bearer {settings.token}"}
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def requested(self) -> None:
        """The broker asked for a new credential: make it, have it taken, keep it, use it."""
        if self.settings.credentials_file is None:
            if not self._warned:  # once: every poll asks again
                log.warning("the broker asks for a new credential, but this connector has no --credentials-file")
                self._warned = True
            return
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._rotate())

    async def _rotate(self) -> None:
        assert self.settings.credentials_file is not None
        new = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
        response = await self._post(new, self.auth)
        if response is None:
            return
        try:
            name = str(response.json()["name"])[:64]
        except (ValueError, KeyError, TypeError):
            name = ""  # (only shown in the file)
        try:
            write_credential(self.settings.credentials_file, name, new)
        except OSError as exc:
            path = self.settings.credentials_file
            log.error("cannot write %s (%s): going on with the old credential", path, exc.strerror)
            return
        self.auth["authorization"] = f"Bearer {new}"
        log.info("credential rotated; the new one is in %s", self.settings.credentials_file)
        # Presenting the new credential retires the old one at once (else at the next poll).
        await self._post(new, self.auth)

    async def _post(self, credential: str, auth: dict[str, str]) -> httpx.Response | None:
        """POST a credential to the rotation endpoint; the answer when it is 200, else None."""
        try:
            async with make_client(self.settings, http2=False, read_timeout=ROTATE_TIMEOUT) as client:
                response = await client.post(
                    self.settings.broker_url + ROTATE_PATH, json={"credential": credential}, headers=auth
                )
        except httpx.HTTPError as exc:
            log.warning("credential rotation: the broker did not answer (%s)", type(exc).__name__)
            return None
        if response.status_code != 200:
            log.warning("credential rotation refused (%d)", response.status_code)
            return None
        return response
