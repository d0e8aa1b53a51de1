"""POST /tunnel/v1/enroll: a connector exchanges its one-time code for a credential.

Bounded like every door: a small JSON body, a few redemptions at once, and wrong codes
from one address answered more and more slowly (the tunnel's AuthThrottle).
"""

import asyncio

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


def _error(status: int, code: str, message: str) -> Response:
    return Response(error_body(status, code, message), status, media_type="application/json")


async def enroll(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    enrollment = hub.enrollment
    address = request.client.host if request.client else "?"
    try:
        body = await read_body(request.receive, ENROLL_BODY_LIMIT)
    except ClientGone:
        return _error(400, "invalid_request", "The request body did not arrive.")
    try:
        code = msgspec.json.decode(body or b"", type=_EnrollRequest).code
    except msgspec.DecodeError:
        return _error(400, "invalid_request", 'The body must be {"code": "<enrollment code>"}.')
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
