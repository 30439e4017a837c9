"""Prometheus metrics: the registry and its series (requests by route, VM operations, queue, VMs by state).
The web layer serves them at /metrics (gateway/web/metrics.py); the engine updates its own series."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per app, so tests that build several apps do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vmgate_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("vmgate_http_request_seconds", "HTTP request latency by route",
                                 ["route", "method"], registry=self.registry)
        self.vm_ops = Counter("vmgate_vm_operations_total", "VM lifecycle operations by outcome",
                              ["operation", "outcome"], registry=self.registry)
        self.queue_depth = Gauge("vmgate_queue_depth", "Lifecycle jobs queued and not yet finished",
                                 registry=self.registry)
        self.queue_pending = Gauge("vmgate_queue_pending", "Lifecycle jobs taken by a worker and not yet finished",
                                   registry=self.registry)
        self.queue_oldest = Gauge("vmgate_queue_oldest_age_seconds", "Age of the oldest unfinished lifecycle job",
                                  registry=self.registry)
        self.vms_by_state = Gauge("vmgate_vms", "VMs by state (at the last reconciler pass)", ["state"],
                                  registry=self.registry)
        # The labelled children of the two per-request metrics, by their labels: prometheus_client's
        # ``labels()`` validates and takes a lock on every call; a dict lookup is enough once a child exists.
        # Bounded by routes x methods x statuses, as the metrics themselves are.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request and its latency under its route pattern, method and status."""
        children = self._request_children.get((route, method, status))
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._request_children[(route, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)
