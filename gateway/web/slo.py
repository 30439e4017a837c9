"""``GET /api/admin/slo``: the service level objectives' figures over the last hours, from Prometheus.

The gateway asks the Prometheus that scrapes it (PROMETHEUS_URL; `make run` starts one) for the series
its recording rules keep (deploy/prometheus/rules.yml): the share of VM boots that succeed, the p95 time
to console and the share of API answers that are errors. The admin page ``/admin/slo`` draws them. Only
Prometheus has the figures of every gateway of a fleet, hence the question to it rather than to this
process's own counters. Admins only (404 for anyone else); 503 ``metrics_unavailable`` without Prometheus.
"""

from __future__ import annotations

import math
import time
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import BadRequest, ServiceUnavailable
from gateway.web import auth
from gateway.web.appkeys import settings_key
from gateway.web.http import json_response

routes = web.RouteTableDef()

PROMETHEUS_TIMEOUT = 5.0
MAX_HOURS = 24 * 7
POINTS = 120  # points per series, whatever the range
# key, title, query, unit, objective, which side of the objective is good
FIGURES = (
    ("boot_success", "VM boots that succeed (1 h)", "1 - vmgate:vm_boot_failure_ratio:rate1h", "ratio", 0.99, "above"),
    ("time_to_console_p95", "Time to console, p95 (1 h)", "vmgate:vm_time_to_console_seconds:p95_1h", "seconds",
     20.0, "below"),
    ("api_error_ratio", "API answers that are errors (5 min)", "vmgate:api_error_ratio:rate5m", "ratio", 0.01,
     "below"),
)


class MetricsUnavailable(ServiceUnavailable):
    code = "metrics_unavailable"


def _points(result: list[dict[str, Any]]) -> list[list[float]]:
    """[[unix time, value], ...] of the first series, without the NaNs of no-traffic moments."""
    if not result:
        return []
    points = []
    for at, value in result[0].get("values", []):
        number = float(value)
        if math.isfinite(number):
            points.append([float(at), number])
    return points


async def _ask(http: aiohttp.ClientSession, base: str, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
    async with http.get(base + path, params=params) as resp:
        body = await resp.json(content_type=None)
    if resp.status != 200 or body.get("status") != "success":
        raise MetricsUnavailable(f"Prometheus refused the query: {body.get('error', resp.status)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@routes.get("/api/admin/slo")
async def slo(request: web.Request) -> web.Response:
    await auth.require_admin(request)
    try:
        hours = int(request.query.get("hours", "6"))
    except ValueError:
        raise BadRequest("hours must be a whole number.", details={"field": "hours"}) from None
    if not 1 <= hours <= MAX_HOURS:
        raise BadRequest(f"hours must be 1 to {MAX_HOURS}.", details={"field": "hours"})
    base = request.app[settings_key].prometheus_url
    if not base:
        raise MetricsUnavailable("No Prometheus is configured (PROMETHEUS_URL).")
    end = time.time()
    start, step = end - hours * 3600, max(15.0, hours * 3600 / POINTS)
    figures = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROMETHEUS_TIMEOUT)) as http:
            for key, title, query, unit, objective, good in FIGURES:
                window = {"start": f"{start:.0f}", "end": f"{end:.0f}", "step": f"{step:.0f}"}
                series = await _ask(http, base, "/api/v1/query_range", {"query": query, **window})
                points = _points(series)
                figures.append({"key": key, "title": title, "query": query, "unit": unit, "objective": objective,
                                "good": good, "now": points[-1][1] if points else None, "points": points})
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        raise MetricsUnavailable(f"Prometheus at {base} did not answer: {type(exc).__name__}") from exc
    return json_response({"hours": hours, "start": start, "end": end, "step": step, "figures": figures})
