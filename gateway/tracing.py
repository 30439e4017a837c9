"""Traces (OpenTelemetry) and request ids, from nginx through the gateway, the queue and the engine to QEMU.

A request's id comes from nginx (``X-Request-ID: $request_id``), or is made here when a request reaches the
gateway directly; it is answered in ``X-Request-ID``, logged with every line written while the request is
handled (``request_id`` in the JSON log), and travels with the lifecycle job the request queued, so the
worker's lines carry it too. The trace context travels the same way (W3C ``traceparent`` in the job), so a
create is one trace: the HTTP request, the job's wait in the queue, each engine step, QEMU's start and the
moment its console takes connections (docs/OBSERVABILITY.md, "Traces").

Spans are exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, in batches; otherwise the
tracer is OpenTelemetry's no-op one and nothing is recorded. Each app has its own provider (tests build
several apps in one process; the global provider can be set only once).
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

# The id of the request (or of the request whose job) this task is working for.
REQUEST_ID: ContextVar[str | None] = ContextVar("vmgate_request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"
# nginx's $request_id is 32 hex digits; a UUID or a client's own id of that alphabet is kept too.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{8,64}")


def request_id_from(header: str | None) -> str:
    """The id a request goes by: the forwarded one when it looks like an id, a new one otherwise."""
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    return uuid.uuid4().hex


class Tracing:
    """One app's tracer: exporting over OTLP/HTTP to ``endpoint``, or a no-op when it is empty."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        self.provider: Any = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            self.provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5)))
            self.tracer = self.provider.get_tracer("vmgate")

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def flush(self, timeout_ms: int = 5000) -> None:
        """Export what is buffered now (blocking: call it in a thread)."""
        if self.provider is not None:
            self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Export what is left and stop (blocking)."""
        if self.provider is not None:
            self.provider.shutdown()


def job_context() -> dict[str, str]:
    """What a queued job carries of the current request: its trace context and its id."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    request_id = REQUEST_ID.get()
    if request_id:
        carrier["request_id"] = request_id
    return carrier


def context_of(carrier: dict[str, str]) -> Context:
    """The trace context a job carries (an empty one when it carries none)."""
    return propagate.extract(carrier)
