"""Which models each session serves: its offer, cut to its token's allowlist and to the
models reserved to other tokens, and discovered through the tunnel when it names none."""

import asyncio
from typing import Protocol

import msgspec

from broker.logs import log
from broker.router import ModelRouter
from broker.settings import Settings
from broker.tunnel import Exchange, Interrupt, Session
from wire import Chunk, End, Head, check_models

DISCOVERY_TIMEOUT = 30.0
DISCOVERY_RETRY_MAX = 60.0


class _ModelList(msgspec.Struct):
    """OpenAI's GET /v1/models."""

    class _Model(msgspec.Struct):
        id: str

    data: list[_Model]

    def names(self) -> list[str]:
        return [model.id for model in self.data]


class _OllamaTags(msgspec.Struct):
    """Ollama's GET /api/tags: the listing of a server without /v1/models."""

    class _Model(msgspec.Struct):
        name: str

    models: list[_Model]

    def names(self) -> list[str]:
        return [model.name for model in self.models]


# Where a server lists its models, in the order asked: OpenAI's route, then Ollama's own.
_LISTINGS: tuple[tuple[str, type[_ModelList] | type[_OllamaTags]], ...] = (
    ("/v1/models", _ModelList),
    ("/api/tags", _OllamaTags),
)


def allowlisted(settings: Settings) -> frozenset[str]:
    """Every model some token's allowlist names: known (503, not 404) before any connector,
    and reserved to those tokens."""
    return frozenset().union(*(spec.models or () for spec in settings.connectors))


class Finish(Protocol):
    """How a request ends for its session (Hub.finish)."""

    def __call__(self, exchange: Exchange, *, cancel: bool) -> None: ...


class ModelPlacement:
    """Puts each session's models into the router, and keeps the connector told."""

    def __init__(self, settings: Settings, router: ModelRouter[Session]) -> None:
        self.settings = settings
        self._router = router
        self._reserved = allowlisted(settings)
        router.know(self._reserved)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self._reserved = allowlisted(settings)
        self._router.know(self._reserved)

    def place(self, session: Session) -> None:
        """Route what the connector offers, as far as its token's allowlist allows."""
        if session.closed or session.leaving or session.poll_generation == 0:
            return  # (a session is routed once it polls)
        allowed = session.spec.models
        if allowed is None:  # an unrestricted token may not take models reserved to others
            models = session.offered - self._reserved
            taken = session.offered & self._reserved
            if session.refuse(taken) and taken:
                log.warning("connector %s may not serve %s: reserved to the connectors that list them",
                            session.name, ", ".join(sorted(taken)))  # fmt: skip
        else:
            models = session.offered & allowed
        if models == self._router.models_of(session) and session in self._router.connectors():
            return
        self._router.set_models(session, models)
        session.models(sorted(models))

    async def discover(self, session: Session, finish: Finish) -> None:
        """List the LLM's models through the tunnel (only the broker has the LLM key), again
        every ``model_refresh`` seconds: the LLM may load or drop models meanwhile."""
        delay = 1.0
        while not session.closed:
            models = await self._list_models(session, finish)
            if models is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, DISCOVERY_RETRY_MAX)
                continue
            delay = 1.0
            session.offer(models)
            self.place(session)
            await asyncio.sleep(self.settings.model_refresh)

    async def _list_models(self, session: Session, finish: Finish) -> frozenset[str] | None:
        """The LLM's models from /v1/models, or from Ollama's /api/tags where that is absent."""
        for path, kind in _LISTINGS:
            listing = kind
            status, body = await self._get(session, path, finish)
            if status != 404:
                break
        limits = self.settings.limits
        try:
            if status == 200:
                models = msgspec.json.decode(body, type=listing).names()
                why = check_models(models, limits)
                if why is None:
                    return frozenset(models)
                log.warning("connector %s: its LLM's model list is refused: %s", session.name, why)
                return None
        except msgspec.MsgspecError:
            pass
        log.warning("connector %s: listing the LLM's models failed (status %s)", session.name, status)
        return None

    async def _get(self, session: Session, path: str, finish: Finish) -> tuple[int, bytes]:
        """A small GET through the tunnel: its status (0: failed) and body, bounded in size and time."""
        exchange = session.open("GET", path, "", [("accept", "application/json")], b"")
        ended = False
        try:
            async with asyncio.timeout(DISCOVERY_TIMEOUT):
                status, body, ended = await _collect(exchange, self.settings.limits.max_model_listing)
        except TimeoutError:
            status, body = 0, b""
        finally:
            finish(exchange, cancel=not ended)
        return status, body


async def _collect(exchange: Exchange, limit: int) -> tuple[int, bytes, bool]:
    """Status, body and whether it ended in-band; a body over ``limit`` bytes counts as failed."""
    status, parts, size = 0, [], 0
    while True:
        event = await exchange.events.get()
        if isinstance(event, Head):
            status = event.status
        elif isinstance(event, Chunk):
            size += len(event.data)
            if size > limit:
                return 0, b"", False
            parts.append(event.data)
            exchange.consumed(len(event.data))
        elif isinstance(event, End):
            return (status if event.error is None else 0), b"".join(parts), True
        elif isinstance(event, Interrupt):
            return 0, b"", False
