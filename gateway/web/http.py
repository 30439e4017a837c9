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
from gateway.web.appkeys import db_key, redis_key, settings_key

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
    """The client's address, as rate limits, login throttling and the audit log see it.

    The peer, unless it is a trusted proxy (TRUSTED_PROXIES): then X-Forwarded-For is read from the right,
    past every trusted proxy, and the first address no trusted proxy added is the client's. Whatever a client
    writes into the header itself stands left of that and is never believed. Without X-Forwarded-For, a
    trusted proxy's X-Real-IP is used.
    """
    return forwarded_client(request.remote, request.headers.get("X-Forwarded-For"),
                            request.headers.get("X-Real-IP"), request.app[settings_key].trusted_proxies)


def forwarded_client(peer: str | None, forwarded_for: str | None, real_ip: str | None,
                     trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str | None:
    """``client_ip`` without the request: the rightmost address that is not a trusted proxy."""
    def parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(value.strip())
        except ValueError:
            return None

    def is_trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in net for net in trusted)

    current = parse(peer) if peer else None
    if current is None or not is_trusted(current):
        return peer
    hops = [hop for hop in (forwarded_for or "").split(",") if hop.strip()] or ([real_ip] if real_ip else [])
    for hop in reversed(hops):
        address = parse(hop)
        if address is None:  # a malformed entry: nothing left of it can be trusted either
            break
        current = address
        if not is_trusted(address):
            break
    return str(current)


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
