"""The broker's ASGI app, built from resolved settings.

Routes are thin: they authenticate, then call into the Hub, the Relay or the tunnel
endpoints.
"""

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import console, logs, tunnel_api
from broker.accounting import Accounting
from broker.affinity import affinity_of
from broker.asgi import ASGIApp, Receive, Scope, Send
from broker.edge import CanonicalTarget
from broker.enroll_api import enroll, rotate
from broker.errors import error_body, routing_error
from broker.front import FrontDoor
from broker.hub import Hub
from broker.metrics import CONTENT_TYPE
from broker.relay import Relay
from broker.routes import Family
from broker.settings import Settings
from broker.usage import usage_query
from broker.users import Caller, User
from wire import POLL_PATH, REGISTER_PATH, REPLY_PATH
from wire.endpoints import ENROLL_PATH, ROTATE_PATH


class _TunnelEndpoint:
    """Binds a tunnel handler to the hub as a plain ASGI app (Starlette calls it raw)."""

    def __init__(self, hub: Hub, handler: Callable[[Hub, Scope, Receive, Send], Awaitable[None]]) -> None:
        self.hub = hub
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(self.hub, scope, receive, send)


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _error(status: int, code: str, message: str) -> Response:
    return Response(error_body(status, code, message), status, media_type="application/json")


async def health(request: Request) -> Response:
    hub = _hub(request)
    tunnels = [
        {
            "name": session.name,
            "models": sorted(hub.router.models_of(session)),
            "protocol": session.protocol,
            "in_flight": session.in_flight,
            "free_slots": session.free_slots,  # what the connector reports, all its brokers together
            "connected_since": datetime.fromtimestamp(session.connected_at, UTC).isoformat(timespec="seconds"),
        }
        for session in hub.router.connectors()
    ]
    return JSONResponse(
        {
            "status": "ok",
            "connectors": len(tunnels),
            "models": hub.router.models(),
            "tunnels": tunnels,
            "broker": hub.peers.broker_id,
            "brokers": len(hub.peers.current),
        }
    )


async def metrics(request: Request) -> Response:
    return Response(_hub(request).metrics.render(), media_type=CONTENT_TYPE)


def _caller(request: Request) -> Caller | None:
    return _hub(request).identify(request.headers.get("authorization"), request.headers.get("x-api-key"))


def _user(request: Request) -> User | None:
    caller = _caller(request)
    return caller.user if caller is not None else None


def _models_for(request: Request, user: User) -> list[str]:
    """The live models this user may use: the model lists are filtered by the user's allowlist."""
    return [model for model in _hub(request).router.models() if user.may_use(model)]


def _model_object(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "remotellm"}


async def list_models(request: Request) -> Response:
    user = _user(request)
    if user is None:
        return _error(401, "invalid_api_key", "Incorrect or missing API key.")
    return JSONResponse({"object": "list", "data": [_model_object(m) for m in _models_for(request, user)]})


async def get_model(request: Request) -> Response:
    user = _user(request)
    if user is None:
        return _error(401, "invalid_api_key", "Incorrect or missing API key.")
    model = request.path_params["model"]
    if model not in _models_for(request, user):
        return _error(404, "model_not_found", f"The model {model!r} is not being served.")
    return JSONResponse(_model_object(model))


async def usage(request: Request) -> Response:
    """GET /v1/usage: a user's own rows; with an admin key, everyone's (or ``user=NAME``'s)."""
    caller = _caller(request)
    if caller is None:
        return _error(401, "invalid_api_key", "Incorrect or missing API key.")
    try:
        name = caller.user.name if caller.user is not None else None
        query = usage_query(request.query_params, caller=name, admin=caller.admin)
    except ValueError as exc:
        return _error(400, "invalid_request", str(exc))
    except PermissionError as exc:
        return _error(403, "forbidden", str(exc))
    accounting: Accounting = request.app.state.accounting
    assert accounting.store is not None  # started with the app
    return JSONResponse({"object": "list", "data": await accounting.store.query(query)})


# What /api/version reports: the Ollama API release whose routes the broker serves.
OLLAMA_API_VERSION = "0.12.0"


def _ollama_error(status: int, message: str) -> Response:
    return Response(error_body(status, "", message, Family.OLLAMA), status, media_type="application/json")


def _ollama_model(model: str) -> dict[str, object]:
    return {"name": model, "model": model, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "",
            "details": {"format": "", "family": "", "parameter_size": "", "quantization_level": ""}}  # fmt: skip


async def ollama_tags(request: Request) -> Response:
    """Ollama's model list: every model with a live connector that the user may use."""
    user = _user(request)
    if user is None:
        return _ollama_error(401, "Incorrect or missing API key.")
    return JSONResponse({"models": [_ollama_model(m) for m in _models_for(request, user)]})


async def ollama_ps(request: Request) -> Response:
    """Ollama's running models: here, the models being served right now."""
    if not _user(request):
        return _ollama_error(401, "Incorrect or missing API key.")
    models = [
        {**_ollama_model(m), "expires_at": "9999-12-31T00:00:00Z", "size_vram": 0}
        for m in _hub(request).router.models()
    ]
    return JSONResponse({"models": models})


async def ollama_version(request: Request) -> Response:
    if _user(request) is None:
        return _ollama_error(401, "Incorrect or missing API key.")
    return JSONResponse({"version": OLLAMA_API_VERSION})


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return _error(status, *routing_error(request.method, request.url.path, status))


# The GET routes under the forwarded API's prefixes that the broker answers itself.
_LOCAL_GETS = {
    "/v1/models": list_models,
    "/v1/models/{model:path}": get_model,
    "/v1/usage": usage,
    "/api/tags": ollama_tags,
    "/api/ps": ollama_ps,
    "/api/version": ollama_version,
}


class BrokerApp:
    """The composed broker: the canonical-target check, the front door, Starlette; and its hub."""

    def __init__(self, app: ASGIApp, hub: Hub) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def create_app(settings: Settings, reload: Callable[[], Settings] | None = None) -> BrokerApp:
    """The app; ``reload`` re-reads keys and connectors on SIGHUP and when the YAML changes."""
    logs.setup()
    hub = Hub(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.start(reload)
        hub.enrollment.start()
        accounting.start()
        app.state.accounting = accounting
        await hub.enrollment.started()  # (before the first request: it may need the tables)
        loop = asyncio.get_running_loop()
        if reload is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(signal.SIGHUP, hub.reload_from, reload)
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        await hub.aclose()
        await hub.enrollment.aclose()
        await affinity.aclose()
        await accounting.aclose()
        await hub.peers.aclose()

    accounting = Accounting(settings, hub.metrics)
    affinity = affinity_of(settings.redis_url, settings.response_ttl)
    relay = Relay(hub, affinity, accounting)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(Route(path, handler, methods=["GET"]) for path, handler in _LOCAL_GETS.items()),
        Route(ENROLL_PATH, enroll, methods=["POST"]),
        Route(ROTATE_PATH, rotate, methods=["POST"]),
        *console.routes(),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: _http_error, 405: _http_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect would send clients to a path nobody forwards
    app.state.hub = hub
    tunnel: dict[str, tuple[str, ASGIApp]] = {
        REGISTER_PATH: ("POST", _TunnelEndpoint(hub, tunnel_api.register)),
        POLL_PATH: ("GET", _TunnelEndpoint(hub, tunnel_api.poll)),
        REPLY_PATH: ("POST", _TunnelEndpoint(hub, tunnel_api.reply)),
    }
    # Every other method and path of the forwarded API is the relay's to accept or refuse.
    return BrokerApp(CanonicalTarget(FrontDoor(app, relay, tunnel, local_gets=_LOCAL_GETS)), hub)
