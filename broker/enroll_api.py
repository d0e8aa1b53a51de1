"""The enrollment endpoints: a connector exchanges its one-time code for a credential
(POST /tunnel/v1/enroll), or replaces its credential when an admin asked (POST /tunnel/v1/credential).

Bounded like every door: a small JSON body, a few redemptions at once, and wrong codes
from one address answered more and more slowly (the tunnel's AuthThrottle).
"""

import asyncio
import re
from typing import TypeVar

import msgspec
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.asgi import ClientGone, read_body
from broker.enrollment import MAX_CODE_LENGTH, EnrollmentError
from broker.errors import error_body
from broker.hub import Hub
from broker.logs import log
from wire.endpoints import ENROLL_BODY_LIMIT

MAX_REDEEMING = 8  # redemptions in progress at once; more get 429


class _EnrollRequest(msgspec.Struct, forbid_unknown_fields=True):
    code: str


class _RotateRequest(msgspec.Struct, forbid_unknown_fields=True):
    credential: str


_Body = TypeVar("_Body", _EnrollRequest, _RotateRequest)
# A new credential the connector made: long enough to be unguessable, visible ASCII.
_CREDENTIAL = re.compile(r"[\x21-\x7e]{32,512}")


def _error(status: int, code: str, message: str) -> Response:
    return Response(error_body(status, code, message), status, media_type="application/json")


async def _decode(request: Request, kind: type[_Body]) -> _Body | None:
    """The request's small JSON body as ``kind``; None when it is not one."""
    try:
        body = await read_body(request.receive, ENROLL_BODY_LIMIT)
        return msgspec.json.decode(body or b"", type=kind)
    except (ClientGone, msgspec.DecodeError):
        return None


async def enroll(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    enrollment = hub.enrollment
    address = request.client.host if request.client else "?"
    asked = await _decode(request, _EnrollRequest)
    if asked is None:
        return _error(400, "invalid_request", 'The body must be {"code": "<enrollment code>"}.')
    code = asked.code
    if not 0 < len(code) <= MAX_CODE_LENGTH:
        return _error(400, "invalid_request", "That is not an enrollment code.")
    if enrollment.redeeming >= MAX_REDEEMING:
        return _error(429, "too_many_requests", "Too many enrollments at once; try again shortly.")
    try:
        redeemed = await enrollment.redeem(code, hub.settings)
    except EnrollmentError as exc:
        if exc.status == 401:  # guessing codes gets slower and slower
            await asyncio.sleep(hub.auth_throttle.failed(address))
        log.warning("enrollment refused from %s: %s", address, exc)
        return _error(exc.status, exc.code, str(exc))
    except (SQLAlchemyError, OSError) as exc:
        log.error("enrollment failed: the database is unreachable (%s)", type(exc).__name__)
        return _error(503, "database_unavailable", "Enrollment is unavailable right now; try again later.")
    log.info("connector %s enrolled from %s (%s)", redeemed.name, address, redeemed.state)
    return JSONResponse({"name": redeemed.name, "credential": redeemed.credential, "state": redeemed.state})


async def rotate(request: Request) -> Response:
    """The connector's own new credential replaces the one it presents (its tunnels stay up)."""
    hub: Hub = request.app.state.hub
    asked = await _decode(request, _RotateRequest)
    if asked is None or not _CREDENTIAL.fullmatch(asked.credential):
        return _error(400, "invalid_request", 'The body must be {"credential": "<32 to 512 visible characters>"}.')
    try:
        name = await hub.enrollment.rotate(request.headers.get("authorization"), asked.credential)
    except EnrollmentError as exc:
        if exc.status == 401:
            address = request.client.host if request.client else "?"
            await asyncio.sleep(hub.auth_throttle.failed(address))
        return _error(exc.status, exc.code, str(exc))
    except (SQLAlchemyError, OSError) as exc:
        log.error("credential rotation failed: the database is unreachable (%s)", type(exc).__name__)
        return _error(503, "database_unavailable", "Rotation is unavailable right now; try again later.")
    log.info("connector %s has a new credential", name)
    return JSONResponse({"name": name})
