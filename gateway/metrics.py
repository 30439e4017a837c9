"""Prometheus metrics: the registry and its series, named after the seed's list (docs/OBSERVABILITY.md).
The web layer serves them at /metrics (gateway/web/metrics.py) and counts requests; the engine counts its
boots, operations and passes; the store times its queries. Every label has a bounded set of values: route
patterns (never paths), methods, statuses, operation names, VM states, ``warm``/``cold``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Where a VM's boot came from: its first start (``create``), a later start, or a resume from suspend.
BOOTS = ("create", "start", "resume")
# Seconds: a warm start takes under one, a cold one under TCG tens, a slow fleet placement minutes.
START_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One registry per app, so tests that build several apps do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vmgate_api_requests_total", "HTTP requests by route pattern, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("vmgate_api_request_duration_seconds", "HTTP request latency by route pattern",
                                 ["route", "method"], registry=r)
        self.vm_ops = Counter("vmgate_vm_operations_total", "VM lifecycle operations the engine finished, by outcome",
                              ["operation", "outcome"], registry=r)
        self.boot_success = Counter("vmgate_vm_boot_success_total",
                                    "QEMU starts that reached a running VM with a console (create, start, resume)",
                                    ["boot"], registry=r)
        self.boot_failure = Counter("vmgate_vm_boot_failure_total",
                                    "QEMU starts that failed (create, start, resume); crashes later are not boots",
                                    ["boot"], registry=r)
        for boot in BOOTS:  # present at 0 from the start, so rates and increase() see the first one
            self.boot_success.labels(boot)
            self.boot_failure.labels(boot)
        self.provision = Histogram("vmgate_vm_provision_duration_seconds",
                                   "Create request accepted -> the VM's disk and job are ready (before QEMU starts)",
                                   buckets=START_BUCKETS, registry=r)
        self.time_to_console = Histogram("vmgate_vm_time_to_console_seconds",
                                         "Create request accepted -> the VM runs and its console takes connections",
                                         ["start"], buckets=START_BUCKETS, registry=r)
        for start in ("warm", "cold"):
            self.time_to_console.labels(start)
        self.resume = Histogram("vmgate_vm_resume_duration_seconds",
                                "Resume of a suspended VM: QEMU start and memory restore until it runs",
                                buckets=START_BUCKETS, registry=r)
        self.reconcile = Histogram("vmgate_controller_reconcile_duration_seconds",
                                   "One reconciler pass: rows read, driver asked, disagreeing VMs queued",
                                   buckets=FAST_BUCKETS, registry=r)
        self.db_query = Histogram("vmgate_db_query_duration_seconds", "One Postgres statement, sent to answered",
                                  buckets=FAST_BUCKETS, registry=r)
        self.queue_depth = Gauge("vmgate_queue_depth", "Lifecycle jobs queued and not yet finished", registry=r)
        self.queue_pending = Gauge("vmgate_queue_pending", "Lifecycle jobs taken by a worker and not yet finished",
                                   registry=r)
        self.queue_oldest = Gauge("vmgate_queue_oldest_age_seconds", "Age of the oldest unfinished lifecycle job",
                                  registry=r)
        self.vms_by_state = Gauge("vmgate_vms", "VMs by state (at the last reconciler pass)", ["state"], registry=r)
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

    def booted(self, boot: str, ok: bool) -> None:
        """Count one QEMU start of kind ``boot`` (one of BOOTS) as a success or a failure."""
        (self.boot_success if ok else self.boot_failure).labels(boot).inc()
