"""Prometheus metrics, in a registry of the app's own (several apps may share a process).

Label values come only from configuration (connector and user names) or from models a
connector serves, never from what a client sent: the series count stays bounded.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The model label of a request refused before it was routed.
UNROUTED = "_unrouted"
# The user label of the unnamed users (user_api_keys).
UNNAMED = "_unnamed"
_Metric = TypeVar("_Metric", Counter, Histogram)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Snapshot:
    """The live state the gauges report, read at scrape time."""

    in_flight: int = 0
    queued: int = 0
    connectors_by_protocol: dict[str, int] = field(default_factory=dict)


class _LiveState(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._snapshot()
        yield GaugeMetricFamily("remotellm_requests_in_flight", "User requests being relayed", state.in_flight)
        yield GaugeMetricFamily(
            "remotellm_requests_queued", "User requests waiting for a free connector slot", state.queued
        )
        connectors = GaugeMetricFamily(
            "remotellm_connectors_connected", "Connectors with a live tunnel, by protocol", labels=["protocol"]
        )
        for protocol, count in sorted(state.connectors_by_protocol.items()):
            connectors.add_metric([protocol], count)
        yield connectors


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        registry = self.registry = CollectorRegistry()
        self._children: dict[tuple[object, ...], Counter | Histogram] = {}
        registry.register(_LiveState(snapshot))
        self.requests = Counter(
            "remotellm_requests",
            "User requests by model, HTTP status and connector",
            ["model", "status", "connector"],
            registry=registry,
        )
        self.duration = Histogram(
            "remotellm_request_duration_seconds",
            "From request received to response complete",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "remotellm_time_to_first_byte_seconds",
            "From request received to the LLM's response head",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "remotellm_relayed_bytes", "Body bytes relayed, by direction", ["direction"], registry=registry
        )
        self.registrations = Counter(
            "remotellm_tunnel_registrations",
            "Connector registrations (each reconnect is one), by connector",
            ["connector"],
            registry=registry,
        )
        self.polls = Counter(
            "remotellm_tunnel_polls", "Polls opened (they are recycled), by connector", ["connector"], registry=registry
        )
        self.auth_failures = Counter(
            "remotellm_auth_failures", "Refused keys and tokens, by kind", ["kind"], registry=registry
        )
        self.tokens = Counter(
            "remotellm_tokens",
            "Tokens used, by user, model and kind (prompt, completion)",
            ["user", "model", "kind"],
            registry=registry,
        )
        self.limit_rejections = Counter(
            "remotellm_limit_rejections",
            "Requests refused by a user's limit, by user and limit (unavailable: the limits store was down)",
            ["user", "limit"],
            registry=registry,
        )

    def child(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(*labels)``, looked up once: prometheus_client's own lookup costs
        microseconds, and every request does several (the label sets are bounded, see above)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(_Metric, found)

    def render(self) -> bytes:
        return generate_latest(self.registry)
