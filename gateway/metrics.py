"""Prometheus metrics: request counts and latencies by route, served at /metrics."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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


metrics_key = web.AppKey("metrics", Metrics)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    # The route's pattern, not the path: ids must not explode the label space.
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        metrics = request.app[metrics_key]
        route = _route_name(request)
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.latency.labels(route, request.method).observe(time.perf_counter() - started)


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[metrics_key].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
