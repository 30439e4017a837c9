"""Live VM state as server-sent events: ``GET /api/vms/{vm_id}/events`` (one VM) and
``GET /api/me/events`` (every VM of the caller).

Each event is ``event: state``, ``id: <history id>``, ``data: {vm_id, state, desired_state, error,
reason, at}``. On connect the stream first sends the current state (or, when the client sends
``Last-Event-ID`` as browsers do on reconnect, every change it missed, from Postgres), then each
change as the lifecycle engine publishes it on Redis. A comment line every KEEPALIVE seconds keeps
proxies from closing an idle stream. Without Redis there is no live stream: 503.

A stream lives only as long as what opened it: every RECHECK seconds it looks its caller up again, as a new
request would, and ends once the session is logged out or ended (a password reset), the API token revoked,
or the account disabled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from gateway import store
from gateway.engine import publish
from gateway.errors import ApiError
from gateway.web import auth
from gateway.web.appkeys import db_key, fanout_key
from gateway.web.fanout import ENDED

log = logging.getLogger("vmgate.events")
routes = web.RouteTableDef()

KEEPALIVE = 15.0
RECHECK = 5.0  # seconds between checks that the stream's session or token is still good
MAX_STREAM = 3600.0  # seconds; then the stream ends and the browser reconnects with Last-Event-ID
RETRY_MS = 2000


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _frame(event: dict[str, Any]) -> bytes:
    lines = ["event: state"]
    if event.get("id") is not None:
        lines.append(f"id: {event['id']}")
    lines.append("data: " + json.dumps(event))
    return ("\n".join(lines) + "\n\n").encode()


async def _current(request: web.Request, vm_id: str | None, user_id: str) -> list[dict[str, Any]]:
    """The present state of the VM (or of each of the user's VMs not destroyed), as events."""
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.vms.current_states(cur, user_id, vm_id)
    return [publish.event_of(row) for row in rows]


async def _missed(request: web.Request, after: int, vm_id: str | None, user_id: str) -> list[dict[str, Any]]:
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.vms.events_after(cur, after, vm_id=vm_id, user_id=user_id)
    return [publish.event_of({**row, "id": row["vm_id"]}) for row in rows]


async def _stream(request: web.Request, channel: str, vm_id: str | None, user_id: str) -> web.StreamResponse:
    # Listening before reading Postgres: no change falls between the two (gateway/web/fanout.py).
    async with request.app[fanout_key].listen(channel, user_id) as listener:
        after = _last_event_id(request)
        first = await (_missed(request, after, vm_id, user_id) if after is not None
                       else _current(request, vm_id, user_id))
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        sent = after or 0
        for event in first:
            await response.write(_frame(event))
            sent = max(sent, event["id"] or 0)
        loop = asyncio.get_running_loop()
        ends = loop.time() + MAX_STREAM
        recheck, keepalive = loop.time() + RECHECK, loop.time() + KEEPALIVE
        while loop.time() < ends:
            if loop.time() >= recheck:
                if not await _caller_still(request, user_id):
                    log.info("event stream on %s ends: its session or token is no longer valid", channel)
                    break
                recheck = loop.time() + RECHECK
            try:
                data = await asyncio.wait_for(listener.queue.get(), max(0.0, min(keepalive, recheck) - loop.time()))
            except TimeoutError:
                if loop.time() >= keepalive:
                    await response.write(b": keepalive\n\n")
                    keepalive = loop.time() + KEEPALIVE
                continue
            if data is ENDED:
                log.info("event stream on %s ends: the fan-out ended it (Redis away, or the client fell behind)",
                         channel)
                break  # the browser reconnects and replays from Postgres
            try:
                event = json.loads(data)
            except (TypeError, ValueError):
                continue
            if event.get("id") is not None and event["id"] <= sent:
                continue  # already sent from Postgres
            await response.write(_frame(event))
            sent = max(sent, event.get("id") or sent)
        return response


async def _caller_still(request: web.Request, user_id: str) -> bool:
    """Whether the request's session or token still resolves to ``user_id`` (looked up afresh)."""
    request.pop(auth.CALLER_KEY, None)
    try:
        caller = await auth.find_caller(request)
    except ApiError:  # a revoked or expired token
        return False
    return caller is not None and str(caller.user["id"]) == user_id


@routes.get("/api/vms/{vm_id}/events")
async def vm_events(request: web.Request) -> web.StreamResponse:
    user = await auth.current_user(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        vm = await store.vms.vm_for_owner(cur, request.match_info["vm_id"], str(user["id"]))
    vm_id = str(vm["id"])
    return await _stream(request, publish.vm_channel(vm_id), vm_id, str(user["id"]))


@routes.get("/api/me/events")
async def my_events(request: web.Request) -> web.StreamResponse:
    user = await auth.current_user(request)
    return await _stream(request, publish.user_channel(str(user["id"])), None, str(user["id"]))
