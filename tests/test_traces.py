"""Traces and request ids (issue 16): with OTEL_EXPORTER_OTLP_ENDPOINT set, a create is one trace from the
HTTP request through its job's wait in the queue and each engine step to the driver's start, exported over
OTLP/HTTP to a collector (here a test server decoding the protobuf); every answer names its request id,
which the log lines of the request and of its job carry. Without an endpoint nothing is exported."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from drivers.fake import FakeDriver
from gateway.config import Settings
from gateway.logs import JsonFormatter
from gateway.web.appkeys import tracing_key
from tests.conftest import Session, fake_gateway

VM = {"template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1}


@pytest.fixture
async def collector(aiohttp_server: Any) -> Any:
    """An OTLP/HTTP trace receiver: ``server.spans`` collects every span posted to /v1/traces."""
    spans: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource in message.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    spans.append({
                        "name": span.name, "service": service, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(), "kind": span.kind,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "events": [e.name for e in span.events],
                        "attributes": {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes},
                    })
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    server = await aiohttp_server(app)
    server.spans = spans
    return server


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """The gateway's log lines as the JSON formatter writes them, formatted when written (as stderr's are)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("vmgate")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


async def flushed(gateway: Any, collector: Any, wanted: set[str]) -> list[dict[str, Any]]:
    """Export what the gateway has buffered; wait until spans named ``wanted`` have all arrived."""
    for _ in range(50):
        await asyncio.to_thread(gateway.app[tracing_key].flush)
        if wanted <= {s["name"] for s in collector.spans}:
            return list(collector.spans)
        await asyncio.sleep(0.1)
    raise AssertionError(f"spans {wanted - {s['name'] for s in collector.spans}} never arrived")


async def test_a_create_is_one_trace_from_request_to_driver(aiohttp_server: Any, app_settings: Settings,
                                                            database_url: str, sessions: Any, collector: Any) -> None:
    settings = dataclasses.replace(app_settings, otlp_endpoint=str(collector.make_url("")).rstrip("/"),
                                   otel_service_name="vmgate-test")
    gateway = await fake_gateway(aiohttp_server, settings, database_url)
    s: Session = sessions(gateway)
    await s.signup_and_login()
    async with s.http.post(gateway.make_url("/api/vms?wait=30"), json=VM,
                           headers={"X-CSRF-Token": s.csrf_token or ""}) as resp:
        assert resp.status == 201, await resp.text()
        request_id = resp.headers["X-Request-ID"]
        vm_id = (await resp.json())["vm_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)

    spans = await flushed(gateway, collector, {"POST /api/vms", "queue.wait", "vm.converge", "qemu.start"})
    server = next(x for x in spans if x["name"] == "POST /api/vms")
    assert server["service"] == "vmgate-test" and server["kind"] == 2  # SPAN_KIND_SERVER
    assert server["attributes"]["vmgate.request_id"] == request_id
    assert server["attributes"]["http.response.status_code"] == 201
    trace = [x for x in spans if x["trace_id"] == server["trace_id"]]
    names = [x["name"] for x in trace]
    # The job's wait and its work hang under the request; the steps under the work; QEMU's start in a step.
    wait = next(x for x in trace if x["name"] == "queue.wait")
    work = next(x for x in trace if x["name"] == "vm.converge")
    assert wait["parent"] == server["span_id"] and work["parent"] == server["span_id"]
    assert wait["attributes"]["vm.id"] == vm_id and wait["end"] >= wait["start"]
    steps = [x for x in trace if x["name"].startswith("vm.step ")]
    assert {x["parent"] for x in steps} == {work["span_id"]}
    assert {"vm.step requested", "vm.step starting"} <= set(names) or {"vm.step provisioning",
                                                                        "vm.step starting"} <= set(names), names
    start = next(x for x in trace if x["name"] == "qemu.start")
    assert start["parent"] in {x["span_id"] for x in steps} and start["attributes"]["vm.start"] in ("warm", "cold")
    assert any("console.ready" in x["events"] for x in steps)
    # The request spans the create up to QEMU's start (it waited for the VM to run). The worker's own span
    # may end a moment after the answer: the request wakes as soon as the worker publishes the VM's new state
    # (publish.watching), before the worker has closed its span.
    assert server["start"] <= wait["start"] <= work["start"] and start["end"] <= server["end"]


async def test_a_callers_trace_and_request_id_are_kept_and_bad_ids_replaced(
        aiohttp_server: Any, app_settings: Settings, database_url: str, collector: Any) -> None:
    settings = dataclasses.replace(app_settings, otlp_endpoint=str(collector.make_url("")).rstrip("/"))
    gateway = await fake_gateway(aiohttp_server, settings, database_url)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.make_url("/api/healthz"), headers={
                "traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-ID": "edge-7f3a9c21"}) as resp:
            assert resp.headers["X-Request-ID"] == "edge-7f3a9c21"
        async with http.get(gateway.make_url("/api/healthz"), headers={"X-Request-ID": "a b\tc<script>"}) as resp:
            replaced = resp.headers["X-Request-ID"]
            assert re.fullmatch(r"[0-9a-f]{32}", replaced)
    spans = await flushed(gateway, collector, {"GET /api/healthz"})
    joined = [x for x in spans if x["name"] == "GET /api/healthz" and x["trace_id"] == trace_id]
    assert len(joined) == 1 and joined[0]["parent"] == parent_id
    assert joined[0]["attributes"]["vmgate.request_id"] == "edge-7f3a9c21"


async def test_the_jobs_log_lines_carry_the_request_id(server: Any, sessions: Any, log_lines: list[str],
                                                       fake_driver: FakeDriver) -> None:
    """Without an endpoint nothing is traced, and the request id still joins the request and its job."""
    assert not server.app[tracing_key].enabled
    s: Session = sessions(server)
    await s.signup_and_login()
    fake_driver.fail_next_start = "no memory left on the host"
    async with s.http.post(server.make_url("/api/vms?wait=30"), json=VM,
                           headers={"X-CSRF-Token": s.csrf_token or ""}) as resp:
        assert resp.status == 503, await resp.text()
        request_id = resp.headers["X-Request-ID"]
    entries = [json.loads(line) for line in log_lines]
    failed = [e for e in entries if e["logger"] == "vmgate.lifecycle" and "no memory left" in e["msg"]]
    assert failed, entries
    assert {e.get("request_id") for e in failed} == {request_id}
