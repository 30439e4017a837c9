"""What every route module shares about HTTP: JSON in and out, who is asking from where, the ``?wait=``
parameter, and the caller's own VM named by the path."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from aiohttp import web

from gateway import states, store
from gateway.engine import activity
from gateway.errors import ApiError, BadRequest, ValidationFailed
from gateway.rows import UserRecord, VmRow
from gateway.web import auth
from gateway.web.appkeys import db_key, redis_key

MAX_WAIT = 120  # seconds a request may ask to wait for its VM to settle (?wait=)
BACKGROUND_HEADER = "X-Vmgate-Background"


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as JSON, never cached."""
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 4xx: 415 for another media type, 400 for bad JSON or a non-object."""
    if request.content_type != "application/json":
        raise ApiError("Send the body as JSON with Content-Type: application/json.",
                       status=415, code="unsupported_media_type")
    raw = await request.read()  # aiohttp answers 413 itself past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    return body


def client_ip(request: web.Request) -> str | None:
    """The client's address; X-Real-IP is believed only from a loopback peer (our nginx)."""
    peer = request.remote
    try:
        from_proxy = peer is not None and ipaddress.ip_address(peer).is_loopback
    except ValueError:
        from_proxy = False
    forwarded = request.headers.get("X-Real-IP")
    if from_proxy and forwarded:
        try:
            return str(ipaddress.ip_address(forwarded.strip()))
        except ValueError:
            return peer
    return peer


def is_background(request: web.Request) -> bool:
    """A request the web console sends by itself (a poll, ``X-Vmgate-Background: 1``): not use of the VM,
    or a page left open would keep its VM awake for ever."""
    return request.headers.get(BACKGROUND_HEADER) == "1"


def wait_param(request: web.Request) -> float:
    """``?wait=SECONDS`` (0 to 120): answer once the VM settled, or after that long (then 202)."""
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:
        raise ValidationFailed(f"wait: seconds between 0 and {MAX_WAIT}", details={"field": "wait"})
    return wait


async def owned_vm(request: web.Request) -> tuple[UserRecord, VmRow]:
    """The signed-in user and their VM of the path; a request on a VM counts as its use (idle suspend)."""
    user = await auth.current_user(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        vm = await store.vms.vm_for_owner(cur, request.match_info["vm_id"], str(user["id"]))
    if not is_background(request) and states.holds_quota(vm):
        await activity.touch(request.app[redis_key], str(vm["id"]))
    return user, vm
