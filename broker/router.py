"""ModelRouter: which live connector serves a model, right now.

Pure bookkeeping with no I/O, so it is unit-tested on its own. A model is *known*
once any connector's allowlist names it or any connector has served it; that is what
separates "no such model" (404) from "no connector for it at the moment" (503).
"""

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Endpoint(Protocol):
    @property
    def occupied(self) -> int: ...  # requests in flight on it, from every broker as far as known
    @property
    def max_concurrent(self) -> int | None: ...


E = TypeVar("E", bound=Endpoint)


class RouteError(Exception):
    status = 500
    code = "internal_error"


class ModelNotFound(RouteError):
    status = 404
    code = "model_not_found"


class ModelUnavailable(RouteError):
    status = 503
    code = "model_unavailable"


class AtCapacity(RouteError):
    status = 429
    code = "capacity_exceeded"


class ModelRouter(Generic[E]):
    def __init__(self, configured_models: frozenset[str] = frozenset()) -> None:
        self._known: set[str] = set(configured_models)
        self._serving: dict[str, list[E]] = {}
        self._models_of: dict[E, frozenset[str]] = {}

    def know(self, models: frozenset[str]) -> None:
        """Models that are known from now on (a model once known stays known: 503, not 404)."""
        self._known.update(models)

    def set_models(self, connector: E, models: frozenset[str]) -> None:
        """Register a connector, or replace the models it serves."""
        self.remove(connector)
        self._models_of[connector] = models
        self._known.update(models)
        for model in models:
            self._serving.setdefault(model, []).append(connector)

    def remove(self, connector: E) -> None:
        for model in self._models_of.pop(connector, ()):
            serving = self._serving[model]
            serving.remove(connector)
            if not serving:
                del self._serving[model]

    def models(self) -> list[str]:
        """Every model with at least one live connector."""
        return sorted(self._serving)

    def connectors(self) -> list[E]:
        return list(self._models_of)

    def models_of(self, connector: E) -> frozenset[str]:
        return self._models_of.get(connector, frozenset())

    def get_route(self, model: str, exclude: E | None = None, accepts: Callable[[E], bool] | None = None) -> E:
        """The least busy live connector for the model that still has a free slot (and that
        ``accepts`` the request, when given)."""
        serving = self._serving.get(model)
        candidates = serving
        if serving and (exclude is not None or accepts is not None):
            candidates = [c for c in serving if c is not exclude and (accepts is None or accepts(c))]
        if not candidates:
            raise (ModelUnavailable if model in self._known else ModelNotFound)(model)
        assert serving is not None
        best = min(candidates, key=_load)
        if best.max_concurrent is not None and best.occupied >= best.max_concurrent:
            raise AtCapacity(model)
        if len(serving) > 1:  # ties go round-robin: the chosen one moves to the back
            serving.remove(best)
            serving.append(best)
        return best


# An uncapped connector counts as having room for this many requests: uncapped ones are
# preferred to capped ones at the same count, and still share the load among themselves.
UNCAPPED = 1024


def _load(connector: Endpoint) -> float:
    return connector.occupied / (connector.max_concurrent or UNCAPPED)
