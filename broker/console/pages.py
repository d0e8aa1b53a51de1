"""The console's routes: thin handlers that check who asks, then render or act.

Pages are rendered on the server (Jinja2); each live part of a page is re-fetched as an
HTML fragment from the same template, and the charts read the admin JSON API. Every
response carries a strict Content-Security-Policy: scripts and styles come from
/admin/static only.
"""

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from broker.asgi import ClientGone, read_body
from broker.console import actions, auth, views
from broker.console.auth import ConsoleSession
from broker.enrollment import DEFAULT_TTL, EnrollmentError
from broker.errors import error_body
from broker.hub import Hub
from broker.logs import log

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
PAGES = ("connectors", "models", "usage", "live", "enroll")
# Pages that are one live part under a title (live_page.html); the others have their own template.
TITLES = {"connectors": "Connectors", "models": "Models", "live": "Live requests"}
LIVE = frozenset({"connectors", "models", "usage", "live"})  # pages with a part fetched again and again
FORM_LIMIT = 8192  # bytes of a console form
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
REASONS = {400: "Bad request", 403: "Refused", 404: "Not found", 409: "Conflict", 503: "Unavailable"}


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _engine(request: Request) -> AsyncEngine:
    store = _hub(request).enrollment.store
    assert store is not None  # started with the app
    return store.engine


def _render(
    request: Request, template: str, context: dict[str, Any], status: int = 200, session: ConsoleSession | None = None
) -> Response:
    context = {"csrf": session.csrf if session else "", "signed_in": session is not None, **context}
    return templates.TemplateResponse(request, template, context, status_code=status, headers=SECURITY_HEADERS)


def _error_page(request: Request, status: int, message: str, session: ConsoleSession | None = None) -> Response:
    context = {"status": status, "reason": REASONS.get(status, "Error"), "message": message, "page": ""}
    return _render(request, "error.html", context, status, session)


def _redirect(to: str) -> Response:
    return RedirectResponse(to, 303, headers=SECURITY_HEADERS)


async def _form_body(request: Request) -> bytes | None:
    """The body of a console form or admin API call: at most FORM_LIMIT bytes (None if larger or cut short)."""
    try:
        return await read_body(request.receive, FORM_LIMIT)
    except ClientGone:
        return None


async def _form(request: Request) -> dict[str, str] | None:
    """A url-encoded form (None if too large, cut short, or with too many fields)."""
    body = await _form_body(request)
    if body is None:
        return None
    try:
        return dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=20))
    except ValueError:  # more fields than any console form has
        return None


async def _session(request: Request) -> ConsoleSession | None:
    return await auth.find_session(_engine(request), request)


# --- signing in and out ------------------------------------------------------


async def index(request: Request) -> Response:
    if await _session(request) is not None:
        return _redirect("/admin/connectors")
    return _login_page(request)


def _login_page(request: Request, error: str = "", status: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    response = _render(request, "login.html", {"login_csrf": token, "error": error, "page": "login"}, status)
    auth.set_cookie(request, response, auth.LOGIN_COOKIE, token, auth.LOGIN_FORM_LIFETIME)
    return response


async def login(request: Request) -> Response:
    form = await _form(request)
    if form is None:
        return _error_page(request, 400, "That form was too large or incomplete.")
    if not auth.csrf_ok(request.cookies.get(auth.LOGIN_COOKIE, "") or "-", form.get(auth.CSRF_FIELD)):
        return _login_page(request, "The sign-in form expired; please try again.", 403)
    hub = _hub(request)
    caller = hub.identify(f"Bearer {form.get('key', '')}", None)
    if caller is None or not caller.admin:
        address = request.client.host if request.client else "?"
        await asyncio.sleep(hub.auth_throttle.failed(address))
        log.warning("console: a sign-in with a key that is not an admin key, from %s", address)
        return _login_page(request, "That is not an admin key.", 401)
    value, _ = await auth.open_session(_engine(request))
    response = _redirect("/admin/connectors")
    auth.set_cookie(request, response, auth.COOKIE, value, auth.SESSION_LIFETIME)
    auth.clear_cookie(request, response, auth.LOGIN_COOKIE)
    return response


async def logout(request: Request) -> Response:
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    await auth.close_session(_engine(request), request)
    response = _redirect("/admin")
    auth.clear_cookie(request, response, auth.COOKIE)
    return response


async def _posted(request: Request) -> tuple[ConsoleSession, dict[str, str]] | Response:
    """A console form post: its session and form, or the refusal to send."""
    session = await _session(request)
    form = await _form(request)
    if session is None:
        return _redirect("/admin")
    if form is None:
        return _error_page(request, 400, "That form was too large or incomplete.", session)
    if not auth.csrf_ok(session.csrf, form.get(auth.CSRF_FIELD)):
        log.warning("console: a form post without its session's CSRF token was refused")
        return _error_page(request, 403, "This form is not from this console session; reload the page.", session)
    return session, form


# --- pages ---------------------------------------------------------------------


async def _data(request: Request, page: str) -> dict[str, Any]:
    hub = _hub(request)
    if page == "connectors":
        return views.connectors(hub)
    if page == "models":
        return await views.models(hub, _engine(request))
    if page == "usage":
        span = request.query_params.get("range", "hour")
        return await views.usage(_engine(request), span if span in views.RANGES else "hour")  # type: ignore[arg-type]
    if page == "live":
        return await views.feed(_engine(request))
    return {}


async def page(request: Request) -> Response:
    name = request.path_params["page"]
    session = await _session(request)
    if name not in PAGES:
        return _error_page(request, 404, f"There is no console page {name[:64]!r}.", session)
    if session is None:
        return _redirect("/admin")
    data = await _data(request, name)
    template = "live_page.html" if name in TITLES else f"{name}.html"
    return _render(request, template, {"page": name, "title": TITLES.get(name), "data": data}, session=session)


async def fragment(request: Request) -> Response:
    """The live part of a page, rendered again (the page's script swaps it in)."""
    name = request.path_params["page"]
    session = await _session(request)
    if session is None:
        return Response("signed out", 401, headers=SECURITY_HEADERS)
    if name not in LIVE:
        return _error_page(request, 404, "No such live view.", session)
    data = await _data(request, name)
    return _render(request, f"_{name}.html", {"page": name, "data": data}, session=session)


def _json_error(status: int, code: str, message: str) -> Response:
    return Response(error_body(status, code, message), status, media_type="application/json")


def _admin_key_refusal(request: Request) -> Response | None:
    """None when the request carries an admin key; else its 401 (no key) or 403 (not an admin's)."""
    caller = _hub(request).identify(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if caller is None:
        return _json_error(401, "invalid_api_key", "An admin key is required.")
    return None if caller.admin else _json_error(403, "forbidden", "This needs an admin key.")


async def api(request: Request) -> Response:
    """GET /admin/api/{connectors,models,usage,live}: a console session or an admin key."""
    if await _session(request) is None:
        refused = _admin_key_refusal(request)
        if refused is not None:
            return refused
    name = request.path_params["page"]
    if name not in LIVE:
        return _json_error(404, "not_found", "No such admin API.")
    return JSONResponse(await _data(request, name), headers={"cache-control": "no-store"})


# --- actions -------------------------------------------------------------------


FormHandler = Callable[[Request, ConsoleSession, dict[str, str]], Awaitable[Response]]


def _form_post(act: FormHandler) -> Callable[[Request], Awaitable[Response]]:
    """A console form's handler: run only with the session's CSRF token; a refusal
    (EnrollmentError) becomes an error page."""

    async def handler(request: Request) -> Response:
        posted = await _posted(request)
        if isinstance(posted, Response):
            return posted
        session, form = posted
        try:
            return await act(request, session, form)
        except EnrollmentError as exc:
            return _error_page(request, exc.status, str(exc), session)

    return handler


@_form_post
async def connector_action(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
    """A form's approve, revoke or rotate."""
    await actions.act(_hub(request), request.path_params["name"], request.path_params["action"])
    return _redirect("/admin/connectors")


@_form_post
async def enroll(request: Request, session: ConsoleSession, form: dict[str, str]) -> Response:
    """A one-time enrollment code, shown once in this response."""
    asked = form.get("name", ""), form.get("models", ""), form.get("ttl")
    code, name, ttl = await actions.new_code(_hub(request), *asked)
    context = {"page": "enroll", "data": {}, "code": code, "name": name, "ttl": ttl, "broker_url": _base_url(request)}
    return _render(request, "enroll.html", context, session=session)


# --- the admin JSON API's actions: an admin key only (a cookie could be ridden by a forged post) ---


class _NewCode(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    models: list[str] = []
    ttl: float = DEFAULT_TTL


async def api_enroll(request: Request) -> Response:
    """POST /admin/api/enroll {"name", "models"?, "ttl"?} → {"name", "code", "ttl"}."""
    refused = _admin_key_refusal(request)
    if refused is not None:
        return refused
    body = await _form_body(request)
    try:
        asked = msgspec.json.decode(body or b"", type=_NewCode)
    except msgspec.DecodeError:
        return _json_error(400, "invalid_request", 'The body must be {"name": ..., "models": [...], "ttl": seconds}.')
    try:
        code, name, ttl = await actions.new_code(_hub(request), asked.name, ",".join(asked.models), asked.ttl)
    except EnrollmentError as exc:
        return _json_error(exc.status, exc.code, str(exc))
    return JSONResponse({"name": name, "code": code, "ttl": ttl}, headers={"cache-control": "no-store"})


async def api_action(request: Request) -> Response:
    """POST /admin/api/connectors/{name}/{approve,revoke,rotate} → {"name", "done"}."""
    refused = _admin_key_refusal(request)
    if refused is not None:
        return refused
    name = request.path_params["name"]
    try:
        done = await actions.act(_hub(request), name, request.path_params["action"])
    except EnrollmentError as exc:
        return _json_error(exc.status, exc.code, str(exc))
    return JSONResponse({"name": name, "done": done})


def _base_url(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


async def not_found(request: Request) -> Response:
    return _error_page(request, 404, "There is no such console page.", await _session(request))


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The handler, with a clear page instead of a 500 while the database is unreachable."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except (SQLAlchemyError, OSError) as exc:
            log.error("console: the database is unreachable (%s)", type(exc).__name__)
            return _error_page(request, 503, "The console's database is unreachable; try again shortly.")

    return guarded


def routes() -> list[BaseRoute]:
    handlers: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/admin", index, "GET"),
        ("/admin/login", login, "POST"),
        ("/admin/logout", logout, "POST"),
        ("/admin/enroll", enroll, "POST"),
        ("/admin/connectors/{name}/{action}", connector_action, "POST"),
        ("/admin/api/{page}", api, "GET"),
        ("/admin/api/enroll", api_enroll, "POST"),
        ("/admin/api/connectors/{name}/{action}", api_action, "POST"),
        ("/admin/{page}/fragment", fragment, "GET"),
        ("/admin/{page}", page, "GET"),
    ]
    return [
        Mount("/admin/static", StaticFiles(directory=HERE / "static"), name="static"),
        *(Route(path, _guarded(handler), methods=[method]) for path, handler, method in handlers),
        Route("/admin/{path:path}", _guarded(not_found), methods=["GET", "POST"]),
    ]
