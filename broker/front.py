"""The broker's front door: the forwarded API and the tunnel go straight to their handlers, the rest to Starlette.

Starlette's middleware and router cost a forwarded request about a tenth of the broker's CPU
in a burst of new streams (a Request object, a regex per route, exception wrappers; py-spy),
and wrap every relayed chunk's send in two more coroutines. The hot handlers are plain ASGI
apps that answer every error of theirs in the API's own shape, so they need none of it.
"""

import contextlib
import logging
from collections.abc import Iterable

from broker.asgi import ASGIApp, Receive, Scope, Send
from broker.errors import routing_error, send_error
from broker.routes import family

log = logging.getLogger("remotellm.broker")

# Path prefixes of the forwarded API: every method and path below them is the relay's,
# except the few GET routes the broker answers itself (``local_gets``).
FORWARDED_PREFIXES = ("/v1/", "/api/")


class FrontDoor:
    def __init__(
        self,
        app: ASGIApp,
        relay: ASGIApp,
        tunnel: dict[str, tuple[str, ASGIApp]],
        *,
        local_gets: Iterable[str],
    ) -> None:
        """``tunnel`` maps a path to its method and handler; ``local_gets`` are Starlette's
        route paths that the broker answers itself (a ``{...:path}`` parameter last only)."""
        self.app = app  # Starlette: the broker's own pages, and the lifespan
        self.relay = relay
        self.tunnel = tunnel
        self.local_gets = frozenset(p for p in local_gets if "{" not in p)
        self.local_get_prefixes = tuple(p.partition("{")[0] for p in local_gets if "{" in p)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self._hot(scope["method"], scope["path"])
            if handler is not None:
                await _guarded(handler, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _hot(self, method: str, path: str) -> ASGIApp | None:
        """The handler of a hot route (decided on the decoded path, as Starlette would route it)."""
        if path.startswith(FORWARDED_PREFIXES):
            local = method in ("GET", "HEAD") and (path in self.local_gets or path.startswith(self.local_get_prefixes))
            return None if local else self.relay
        endpoint = self.tunnel.get(path)
        if endpoint is None:
            return None
        return endpoint[1] if method == endpoint[0] else _method_not_allowed


async def _guarded(handler: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """What Starlette's error middleware would do: a bug is logged and answered with 500."""
    try:
        await handler(scope, receive, send)
    except Exception:
        log.exception("%s %s failed", scope["method"], scope["path"][:200])
        message = "The broker failed on this request."
        with contextlib.suppress(Exception):  # the response had started: ending here cuts it, as it must
            await send_error(send, 500, "internal_error", message, family=family(scope["path"]))


async def _method_not_allowed(scope: Scope, receive: Receive, send: Send) -> None:
    await send_error(send, 405, *routing_error(scope["method"], scope["path"], 405))
