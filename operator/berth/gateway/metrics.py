"""``berth_gateway_*`` Prometheus metrics, on a registry per gateway (tests build several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["namespace", "model", "key_id"]
        self.requests = Counter(
            "berth_gateway_requests",
            "Requests answered by the gateway",
            [*labels, "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "berth_gateway_tokens", "Tokens from upstream usage", [*labels, "kind"], registry=self.registry
        )
        self.rate_limited = Counter(
            "berth_gateway_rate_limited",
            "Requests refused by a quota",
            ["namespace", "key_id", "limit"],
            registry=self.registry,
        )
        self.retries = Counter(
            "berth_gateway_upstream_retries",
            "Attempts moved to another endpoint before the first byte",
            ["namespace", "model", "reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "berth_gateway_in_flight_requests",
            "Requests in flight at this replica",
            ["namespace", "model"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "berth_gateway_waiting_requests",
            "Requests held at this replica while their instance scales up from zero (the operator's "
            "autoscaler counts them as load of the ModelDeployment)",
            ["namespace", "modeldeployment", "model"],
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "berth_gateway_upstream_first_byte_seconds",
            "Gateway receipt to upstream response headers",
            ["namespace", "model"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
