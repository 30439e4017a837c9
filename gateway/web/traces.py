"""The request id and the server span of every request (gateway/tracing.py says how they travel on)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.tracing import REQUEST_ID, REQUEST_ID_HEADER, request_id_from
from gateway.web.appkeys import tracing_key
from gateway.web.metrics import route_name


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = REQUEST_ID.set(request_id_from(request.headers.get(REQUEST_ID_HEADER)))
    try:
        tracing = request.app[tracing_key]
        if not tracing.enabled:  # on every request's path: no span machinery when nothing is exported
            response = await handler(request)
            if not response.prepared:
                response.headers.setdefault(REQUEST_ID_HEADER, REQUEST_ID.get() or "")
            return response
        route = route_name(request)
        tracer = tracing.tracer
        # A caller's traceparent (a client that traces) makes this request a part of its trace.
        with tracer.start_as_current_span(
                f"{request.method} {route}", context=propagate.extract(request.headers), kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "http.route": route,
                            "vmgate.request_id": REQUEST_ID.get() or ""}) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            span.set_attribute("http.response.status_code", response.status)
            if not response.prepared:  # (a streamed answer got it from add_request_id as it started)
                response.headers.setdefault(REQUEST_ID_HEADER, REQUEST_ID.get() or "")
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response
    finally:
        REQUEST_ID.reset(token)


async def add_request_id(_request: web.Request, response: web.StreamResponse) -> None:
    """A streamed answer names its request id too (on_response_prepare runs inside its handler, where the
    middleware's id is set; for the others it runs after the middleware, which sets the header itself)."""
    request_id = REQUEST_ID.get()
    if request_id:
        response.headers.setdefault(REQUEST_ID_HEADER, request_id)
