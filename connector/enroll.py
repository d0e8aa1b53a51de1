"""Enrollment on the connector's side: a one-time code exchanged at the broker for a credential."""

import logging
from dataclasses import replace

import httpx
import msgspec

from connector.credentials import MAX_FILE, usable, write_credential
from connector.links import make_client
from connector.settings import Settings
from wire.endpoints import ENROLL_BODY_LIMIT, ENROLL_PATH

log = logging.getLogger("remotellm.connector")

ENROLL_TIMEOUT = 30.0


class EnrollError(Exception):
    """Enrollment failed; the message says why and is safe to print."""


class _Answer(msgspec.Struct):
    name: str
    credential: str
    state: str


async def enroll(settings: Settings, code: str) -> Settings:
    """Exchanges ``code`` at the broker and writes the credentials file; the settings to run with."""
    assert settings.credentials_file is not None  # resolve() requires it with --enroll
    body = msgspec.json.encode({"code": code})
    if len(body) > ENROLL_BODY_LIMIT:
        raise EnrollError("that enrollment code is too long to be one")
    try:
        async with make_client(settings, http2=False, read_timeout=ENROLL_TIMEOUT) as client:
            response = await client.post(
                settings.broker_url + ENROLL_PATH, content=body, headers={"content-type": "application/json"}
            )
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the broker: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise EnrollError(f"the broker refused the code ({response.status_code}): {_message(response)}")
    try:
        answer = msgspec.json.decode(response.content[:MAX_FILE], type=_Answer)
    except msgspec.DecodeError:
        raise EnrollError("the broker's answer is not an enrollment") from None
    if not usable(answer.credential):
        raise EnrollError("the broker's answer holds no usable credential")
    try:
        write_credential(settings.credentials_file, answer.name, answer.credential)
    except OSError as exc:
        raise EnrollError(f"cannot write {settings.credentials_file}: {exc.strerror}") from None
    waiting = " (it waits for an admin's approval)" if answer.state == "pending" else ""
    log.info("enrolled as connector %s%s; credential written to %s", answer.name, waiting, settings.credentials_file)
    return replace(settings, token=answer.credential)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase
