"""Prometheus metrics, in a registry of the app's own (several apps may share a process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The label for a model nobody serves: label values must not come from unchecked input.
UNROUTED = "_unrouted"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "remotellm_requests",
            "User requests by model and HTTP status",
            ["model", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge("remotellm_requests_in_flight", "User requests being relayed", registry=self.registry)
        self.connectors = Gauge(
            "remotellm_connectors_connected", "Connectors with a live tunnel", registry=self.registry
        )
        self.ttfb = Histogram(
            "remotellm_time_to_first_byte_seconds",
            "From request received to the LLM's response head",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
