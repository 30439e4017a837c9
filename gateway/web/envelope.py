"""The one error middleware: every exception becomes the JSON envelope
``{"error": {"code", "message", "details"}}`` (API paths) or the HTML error page (pages)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp_jinja2
import psycopg2
import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import ApiError

log = logging.getLogger("vmgate.errors")


# aiohttp's own HTTP exceptions (no route, wrong method, body too large...) get these codes.
_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 409: "conflict",
    411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
    415: "unsupported_media_type", 429: "rate_limited",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def wants_json(request: web.Request) -> bool:
    """API paths always get JSON; pages get HTML."""
    return request.path.startswith("/api/") or request.path == "/api" or request.path == "/metrics"


def _respond(request: web.Request, status: int, code: str, message: str,
             details: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> web.StreamResponse:
    if wants_json(request):
        return web.json_response(error_body(code, message, details), status=status, headers=headers)
    response = aiohttp_jinja2.render_template(
        "error.html", request, {"status": status, "code": code, "message": message}, status=status)
    if headers:
        response.headers.update(headers)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into the envelope; unexpected ones are logged, never shown."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _respond(request, exc.status, exc.code, exc.message, exc.details, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return _respond(request, exc.status, code, exc.reason or code.replace("_", " "), None, headers)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        log.error("postgres unavailable on %s %s: %s", request.method, request.path, exc)
        return _respond(request, 503, "postgres_unavailable",
                        "The database is unavailable right now; nothing was changed. Try again shortly.")
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.error("redis unavailable on %s %s: %s", request.method, request.path, exc)
        return _respond(request, 503, "redis_unavailable",
                        "Live state (Redis) is unavailable right now. Try again shortly.")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _respond(request, 500, "internal_error", "The server hit an unexpected error; it has been logged.")
