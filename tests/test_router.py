"""ModelRouter: 404 vs 503, least busy wins, ties alternate, full connectors are skipped."""

import pytest

from broker.router import AtCapacity, ModelNotFound, ModelRouter, ModelUnavailable, RouteError


class FakeConnector:
    """The three attributes the router reads; identity-hashed like the real sessions."""

    def __init__(self, name: str, in_flight: int = 0, max_concurrent: int = 4):
        self.name = name
        self.in_flight = in_flight
        self.max_concurrent = max_concurrent

    @property
    def occupied(self) -> int:
        return self.in_flight

    def __repr__(self) -> str:
        return f"FakeConnector({self.name!r}, {self.in_flight}/{self.max_concurrent})"


def router_with(
    *pairs: tuple[FakeConnector, set[str]], configured: set[str] | frozenset[str] = frozenset()
) -> ModelRouter:
    router: ModelRouter[FakeConnector] = ModelRouter(frozenset(configured))
    for connector, models in pairs:
        router.set_models(connector, frozenset(models))
    return router


def picks(router: ModelRouter, model: str, n: int) -> list[str]:
    return [router.get_route(model).name for _ in range(n)]


# --- 404 vs 503 -------------------------------------------------------------------------------------


def test_never_known_model_is_not_found() -> None:
    router = router_with((FakeConnector("a"), {"llama3"}), configured={"mistral"})
    with pytest.raises(ModelNotFound) as info:
        router.get_route("gpt-unknown")
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert "gpt-unknown" in str(info.value)


def test_empty_router_knows_nothing() -> None:
    with pytest.raises(ModelNotFound):
        ModelRouter().get_route("llama3")


def test_allowlisted_model_without_live_connector_is_unavailable() -> None:
    router = router_with((FakeConnector("a"), {"llama3"}), configured={"mistral", "llama3"})
    with pytest.raises(ModelUnavailable) as info:
        router.get_route("mistral")
    assert info.value.status == 503
    assert info.value.code == "model_unavailable"
    assert "mistral" in str(info.value)


def test_served_then_removed_model_stays_known() -> None:
    a = FakeConnector("a")
    router = router_with((a, {"llama3"}))
    assert router.get_route("llama3") is a
    router.remove(a)
    for _ in range(3):  # known forever, not just once
        with pytest.raises(ModelUnavailable):
            router.get_route("llama3")
    assert router.models() == []
    assert router.connectors() == []


def test_error_classes() -> None:
    assert issubclass(ModelNotFound, RouteError)
    assert issubclass(ModelUnavailable, RouteError)
    assert issubclass(AtCapacity, RouteError)
    assert (AtCapacity.status, AtCapacity.code) == (429, "capacity_exceeded")


# --- choosing a connector ---------------------------------------------------------------------------


def test_route_is_the_least_busy_connector() -> None:
    a = FakeConnector("a", in_flight=0)
    b = FakeConnector("b", in_flight=3)
    router = router_with((a, {"m"}), (b, {"m"}))
    assert router.get_route("m") is a
    a.in_flight = 4
    b.in_flight = 0
    assert router.get_route("m") is b


def test_accepts_narrows_the_candidates() -> None:
    a = FakeConnector("a")
    b = FakeConnector("b", in_flight=3)
    router = router_with((a, {"m"}), (b, {"m"}))
    assert router.get_route("m", accepts=lambda c: c is b) is b
    with pytest.raises(ModelUnavailable):
        router.get_route("m", accepts=lambda c: False)


def test_least_in_flight_wins() -> None:
    a = FakeConnector("a", in_flight=3)
    b = FakeConnector("b", in_flight=1)
    c = FakeConnector("c", in_flight=2)
    router = router_with((a, {"m"}), (b, {"m"}), (c, {"m"}))
    assert picks(router, "m", 3) == ["b", "b", "b"]
    b.in_flight = 3
    assert picks(router, "m", 2) == ["c", "c"]


def test_ties_alternate() -> None:
    a, b = FakeConnector("a"), FakeConnector("b")
    router = router_with((a, {"m"}), (b, {"m"}))
    chosen = picks(router, "m", 4)
    assert set(chosen) == {"a", "b"}
    assert chosen[0] != chosen[1]
    assert chosen[:2] == chosen[2:]


def test_ties_rotate_through_three() -> None:
    connectors = [FakeConnector(n) for n in "abc"]
    router = router_with(*((c, {"m"}) for c in connectors))
    chosen = picks(router, "m", 6)
    assert sorted(chosen[:3]) == ["a", "b", "c"]
    assert chosen[3:] == chosen[:3]


def test_ties_only_among_the_least_busy() -> None:
    a, b, c = FakeConnector("a", 1), FakeConnector("b", 1), FakeConnector("c", 2)
    router = router_with((a, {"m"}), (b, {"m"}), (c, {"m"}))
    chosen = picks(router, "m", 4)
    assert set(chosen) == {"a", "b"}
    assert chosen[0] != chosen[1]


def test_connector_at_capacity_is_skipped() -> None:
    full = FakeConnector("full", in_flight=4, max_concurrent=4)
    busy = FakeConnector("busy", in_flight=3, max_concurrent=4)
    router = router_with((full, {"m"}), (busy, {"m"}))
    assert picks(router, "m", 3) == ["busy", "busy", "busy"]


def test_small_connector_at_capacity_skipped_for_a_busier_big_one() -> None:
    small = FakeConnector("small", in_flight=1, max_concurrent=1)
    big = FakeConnector("big", in_flight=5, max_concurrent=16)
    router = router_with((small, {"m"}), (big, {"m"}))
    assert router.get_route("m") is big


def test_all_at_capacity() -> None:
    a = FakeConnector("a", in_flight=2, max_concurrent=2)
    b = FakeConnector("b", in_flight=5, max_concurrent=5)
    router = router_with((a, {"m"}), (b, {"m"}))
    with pytest.raises(AtCapacity) as info:
        router.get_route("m")
    assert info.value.status == 429
    assert "m" in str(info.value)
    b.in_flight = 4  # a slot frees up
    assert router.get_route("m") is b


def test_single_connector_at_capacity() -> None:
    a = FakeConnector("a", in_flight=1, max_concurrent=1)
    router = router_with((a, {"m"}))
    with pytest.raises(AtCapacity):
        router.get_route("m")


def test_capacity_is_per_model_set_not_global() -> None:
    a = FakeConnector("a", in_flight=0)
    b = FakeConnector("b", in_flight=0)
    router = router_with((a, {"x"}), (b, {"y"}))
    assert picks(router, "x", 3) == ["a", "a", "a"]
    assert picks(router, "y", 3) == ["b", "b", "b"]


# --- bookkeeping ------------------------------------------------------------------------------------


def test_set_models_replaces_a_connectors_models() -> None:
    a = FakeConnector("a")
    router = router_with((a, {"x", "y"}))
    router.set_models(a, frozenset({"y", "z"}))
    assert router.models() == ["y", "z"]
    assert router.models_of(a) == frozenset({"y", "z"})
    assert router.connectors() == [a]
    assert router.get_route("z") is a
    with pytest.raises(ModelUnavailable):  # still known: it was served
        router.get_route("x")


def test_set_models_again_does_not_duplicate_the_connector() -> None:
    a, b = FakeConnector("a"), FakeConnector("b")
    router = router_with((a, {"m"}), (b, {"m"}))
    router.set_models(a, frozenset({"m"}))
    router.set_models(a, frozenset({"m"}))
    chosen = picks(router, "m", 6)
    assert chosen.count("a") == 3
    assert chosen.count("b") == 3
    router.remove(a)
    assert picks(router, "m", 2) == ["b", "b"]


def test_set_models_empty() -> None:
    a = FakeConnector("a")
    router = router_with((a, {"m"}))
    router.set_models(a, frozenset())
    assert router.connectors() == [a]
    assert router.models() == []
    assert router.models_of(a) == frozenset()
    with pytest.raises(ModelUnavailable):
        router.get_route("m")


def test_models_sorted_and_only_live() -> None:
    a, b = FakeConnector("a"), FakeConnector("b")
    router = router_with((a, {"zeta", "alpha"}), (b, {"mid", "alpha"}), configured={"configured-only", "aaa"})
    assert router.models() == ["alpha", "mid", "zeta"]
    router.remove(a)
    assert router.models() == ["alpha", "mid"]
    router.remove(b)
    assert router.models() == []


def test_remove_one_of_two_keeps_the_model_live() -> None:
    a, b = FakeConnector("a"), FakeConnector("b")
    router = router_with((a, {"m"}), (b, {"m"}))
    router.remove(a)
    assert router.models() == ["m"]
    assert picks(router, "m", 3) == ["b", "b", "b"]
    assert router.connectors() == [b]


def test_remove_unknown_connector_is_harmless() -> None:
    a = FakeConnector("a")
    router = router_with((a, {"m"}))
    router.remove(FakeConnector("stranger"))
    router.remove(a)
    router.remove(a)  # twice
    assert router.connectors() == []
    assert router.models() == []
    assert router.models_of(a) == frozenset()
    ModelRouter().remove(a)  # on an empty router too


def test_models_of_unknown_connector() -> None:
    assert ModelRouter().models_of(FakeConnector("x")) == frozenset()
