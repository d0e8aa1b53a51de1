"""The public edge: what every request passes before any route sees it."""

import logging

from broker.asgi import ASGIApp, Receive, Scope, Send
from broker.errors import send_error
from broker.routes import family
from wire.endpoints import loopback
from wire.targets import canonical_path, canonical_query

log = logging.getLogger("remotellm.broker")


class CanonicalTarget:
    """400 for a request target that is not a canonical origin-form path (wire.targets).

    Checked on the raw target, before Starlette decodes it for routing: a path that
    decodes differently in the router and in the LLM's server never gets that far.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._warned_cleartext = False
        self._checked: set[object] = set()  # (scheme, server) pairs seen: the addresses it listens on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Once per address served, not per request (parsing an address costs microseconds).
        listener = (scope.get("scheme"), tuple(scope.get("server") or ()))
        if not self._warned_cleartext and listener not in self._checked:
            self._checked.add(listener)
            self._warn_cleartext(scope)
        raw = scope.get("raw_path") or scope["path"].encode("latin-1")
        path = raw.split(b"?", 1)[0].decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        if canonical_path(path) and canonical_query(query):
            await self.app(scope, receive, send)
            return
        message = "The request target must be a plain path: no dot or empty segments, encoded slashes or control bytes."
        await send_error(send, 400, "invalid_request", message, family=family(path))

    def _warn_cleartext(self, scope: Scope) -> None:
        """Once: keys cross the network in clear when a non-loopback address is served without TLS."""
        server = scope.get("server")
        if scope.get("scheme") == "http" and server:
            self._warned_cleartext = warn_cleartext(str(server[0]))


def warn_cleartext(host: str) -> bool:
    """Warn that ``host`` is served without TLS, unless it is loopback; whether it warned."""
    if loopback(host):
        return False
    log.warning("serving %s without TLS: user keys and connector tokens cross the network in clear text; "
                "give --certfile/--keyfile or put a TLS proxy in front", host)  # fmt: skip
    return True
