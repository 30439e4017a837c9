"""Administration under ``/api/admin``: every user and VM, quota overrides, disabling accounts, the
whole audit log. Anyone but an admin gets 404 (``auth.require_admin``), so the routes are not advertised.

Disabling a user ends their sessions, revokes their API tokens and stops their running VMs (their
disks are kept). Admin actions are audited under the admin's id with ``details.target_user_id``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.exceptions
from aiohttp import web

from gateway import states, store
from gateway.engine import console_grants
from gateway.errors import ApiError, BadRequest, Conflict, ServiceUnavailable, ValidationFailed
from gateway.rows import UserRow
from gateway.web import auth, paging, validation, views, vms
from gateway.web.appkeys import db_key, engine_key, redis_key, settings_key
from gateway.web.http import client_ip, json_body, json_response
from gateway.web.quota import admin_views

log = logging.getLogger("vmgate.admin")
routes = web.RouteTableDef()

# Largest override an admin may set, per resource (the same bounds as the QUOTA_* settings).
QUOTA_BOUNDS = {"vms": 10000, "vcpus": 100000, "memory_mb": 10**8, "disk_gb": 10**6, "storage_gb": 10**6}
# VMs of a disabled user stopped at once: each stop may wait STOP_TIMEOUT for the guest.
STOP_CONCURRENCY = 4
STOP_WAIT_MARGIN = 30  # seconds beyond STOP_TIMEOUT to wait for a disabled user's VM to stop


def _uuid_param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and not store.db.is_uuid(value):
        raise BadRequest(f"{name} must be a UUID.", details={"field": name})
    return value


# ---- users -----------------------------------------------------------------------------------------

@routes.get("/api/admin/users")
async def list_users(request: web.Request) -> web.Response:
    await auth.require_admin(request)
    size, after = paging.limit(request), paging.cursor(request)
    email = request.query.get("email")
    if email is not None and not 1 <= len(email) <= 254:
        raise BadRequest("email must be 1 to 254 characters.", details={"field": "email"})
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.users.users_page(cur, size + 1, after, email_contains=email)
    rows, next_cursor = paging.page(rows, size, paging.by_creation)
    return json_response({"users": await admin_views(request.app, rows), "next_cursor": next_cursor})


@routes.get("/api/admin/users/{user_id}")
async def get_user(request: web.Request) -> web.Response:
    await auth.require_admin(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        row = await store.users.user_for_admin(cur, request.match_info["user_id"])
    return json_response({"user": (await admin_views(request.app, [row]))[0]})


def _quota_changes(body: dict[str, Any]) -> dict[str, int | None]:
    """The ``quota`` object of a PATCH: some of vms, vcpus, memory_mb, disk_gb; null means the default."""
    quota = body["quota"]
    if not isinstance(quota, dict):
        raise ValidationFailed("quota: must be an object", details={"field": "quota"})
    unknown = sorted(set(quota) - set(QUOTA_BOUNDS))
    if unknown:
        raise ValidationFailed(f"quota: unknown field(s): {', '.join(unknown)}.",
                               details={"field": f"quota.{unknown[0]}", "unknown": unknown})
    changes: dict[str, int | None] = {}
    for name, value in quota.items():
        field = f"quota.{name}"
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValidationFailed(f"{field}: must be an integer or null", details={"field": field})
        if value is not None and not 0 <= value <= QUOTA_BOUNDS[name]:
            raise ValidationFailed(f"{field}: must be between 0 and {QUOTA_BOUNDS[name]}",
                                   details={"field": field, "min": 0, "max": QUOTA_BOUNDS[name]})
        changes[name] = value
    return changes


async def _stop_vms(app: web.Application, owner: UserRow, vm_ids: list[str],
                    ip: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Stop the owner's VMs, a few at a time; returns (stopped ids, failures) instead of raising."""
    gate = asyncio.Semaphore(STOP_CONCURRENCY)

    async def stop_one(vm_id: str) -> dict[str, Any] | None:
        async with gate:
            try:
                await vms.request_action(app, owner, vm_id, "stop", ip,
                                         wait=app[settings_key].stop_timeout + STOP_WAIT_MARGIN)
            except ApiError as exc:
                return {"vm_id": vm_id, "error": {"code": exc.code, "message": exc.message}}
            except Exception:
                log.exception("stopping VM %s of a disabled user failed", vm_id)
                return {"vm_id": vm_id, "error": {"code": "internal_error",
                                                  "message": "Unexpected error; see the gateway log."}}
        return None

    # Shielded: the account is already disabled, so its VMs should stop even if the admin's client goes away.
    results = await asyncio.shield(asyncio.gather(*(stop_one(vm_id) for vm_id in vm_ids)))
    failed = [r for r in results if r is not None]
    failed_ids = {f["vm_id"] for f in failed}
    return [vm_id for vm_id in vm_ids if vm_id not in failed_ids], failed


@routes.patch("/api/admin/users/{user_id}")
async def update_user(request: web.Request) -> web.Response:
    admin = await auth.require_admin(request)
    body = await json_body(request)
    validation.check_unknown(body, {"quota", "is_active"})
    if not body:
        raise ValidationFailed("Send quota, is_active or both.", details={"field": "quota"})
    quota = _quota_changes(body) if "quota" in body else {}
    active = body.get("is_active")
    if "is_active" in body and not isinstance(active, bool):
        raise ValidationFailed("is_active: must be true or false", details={"field": "is_active"})
    target_id = request.match_info["user_id"]
    if active is False and target_id == str(admin["id"]):
        raise Conflict("You cannot disable your own account.", code="cannot_disable_self")
    ip = client_ip(request)
    admin_id = str(admin["id"])
    changed: list[str] = []
    tokens_revoked, to_stop = 0, []
    async with store.db.cursor(request.app[db_key]) as cur:
        async with cur.begin():
            before = await store.users.lock_user(cur, target_id)
            target = {"target_user_id": target_id, "email": before["email"]}
            quota = {name: v for name, v in quota.items() if before[store.users.QUOTA_COLUMNS[name]] != v}
            if quota:
                await store.users.set_quota(cur, target_id, quota)
                changed += [f"quota.{name}" for name in quota]
                before_quota = {n: before[store.users.QUOTA_COLUMNS[n]] for n in quota}
                await store.audit.record(cur, action="admin.user.quota", outcome="ok", user_id=admin_id, ip=ip,
                                         details={**target, "before": before_quota, "after": quota})
            if active is False:
                # Again on a disabled user is harmless and catches a VM that finished starting since.
                await store.users.set_active(cur, target_id, False)
                await store.tokens.end_all_sessions(cur, target_id)
                tokens_revoked = await store.tokens.revoke_api_tokens_of(cur, target_id)
                to_stop = await store.vms.running_vm_ids(cur, target_id)
                if before["is_active"]:
                    changed.append("is_active")
                await store.audit.record(cur, action="admin.user.disable", outcome="ok", user_id=admin_id, ip=ip,
                                         details={**target, "tokens_revoked": tokens_revoked, "vms_to_stop": to_stop})
            elif active is True and not before["is_active"]:
                await store.users.set_active(cur, target_id, True)
                changed.append("is_active")
                await store.audit.record(cur, action="admin.user.enable", outcome="ok", user_id=admin_id, ip=ip,
                                         details=target)
        owner = await store.users.user_by_id(cur, target_id)
    if active is False:
        # Consoles of VMs that are not running (none to stop) end too, and no token outlives the disable.
        await console_grants.revoke_user(request.app[redis_key], target_id, reason="account disabled")
    stopped, failed = await _stop_vms(request.app, owner or before, to_stop, ip) if to_stop else ([], [])
    async with store.db.cursor(request.app[db_key]) as cur:
        row = await store.users.user_for_admin(cur, target_id)
    return json_response({"user": (await admin_views(request.app, [row]))[0], "changed": changed,
                          "tokens_revoked": tokens_revoked, "stopped_vms": stopped, "failed_vms": failed})


# ---- VMs and audit ---------------------------------------------------------------------------------

@routes.get("/api/admin/vms")
async def list_vms(request: web.Request) -> web.Response:
    await auth.require_admin(request)
    size, after = paging.limit(request), paging.cursor(request)
    user_id = _uuid_param(request, "user_id")
    state = request.query.get("state")
    if state is not None and state not in states.ALL:
        raise BadRequest(f"state must be one of {', '.join(states.ALL)}.", details={"field": "state"})
    include = request.query.get("include_destroyed", "false")
    if include not in ("true", "false"):
        raise BadRequest("include_destroyed must be true or false.", details={"field": "include_destroyed"})
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.vms.vms_page(cur, size + 1, after, user_id=user_id, state=state,
                                        include_destroyed=include == "true" or state == "destroyed")
    rows, next_cursor = paging.page(rows, size, paging.by_creation)
    public_url = request.app[settings_key].public_url
    return json_response({"vms": [{**views.public_vm(r, public_url), "user_id": str(r["user_id"]),
                                   "owner_email": r["owner_email"]} for r in rows],
                          "next_cursor": next_cursor})


@routes.get("/api/admin/audit")
async def audit(request: web.Request) -> web.Response:
    await auth.require_admin(request)
    size, before = paging.limit(request), paging.before(request)
    user_id, vm_id = _uuid_param(request, "user_id"), _uuid_param(request, "vm_id")
    action = request.query.get("action")
    if action is not None and not 1 <= len(action) <= 64:
        raise BadRequest("action must be 1 to 64 characters.", details={"field": "action"})
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.audit.audit_page(cur, size + 1, before, user_id=user_id, vm_id=vm_id, action=action)
    rows, next_before = paging.page(rows, size, lambda row: row["id"])
    return json_response({"entries": [views.audit_entry(r, with_user=True) for r in rows], "next_before": next_before})


# ---- the lifecycle queue ---------------------------------------------------------------------------

@routes.get("/api/admin/queue")
async def queue(request: web.Request) -> web.Response:
    """The lifecycle engine's queue: depth, jobs taken but unfinished, the oldest job's age, consumers."""
    await auth.require_admin(request)
    engine = request.app[engine_key]
    try:
        stats = await engine.update_metrics()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise ServiceUnavailable("The queue lives in Redis, which is unreachable.", code="queue_unavailable") from exc
    async with store.db.cursor(request.app[db_key]) as cur:
        transitional = await store.vms.count_in_states(cur, states.TRANSITIONAL)
    settings = request.app[settings_key]
    return json_response({**stats, "vms_in_transition": transitional, "workers_per_gateway": settings.workers,
                          "reconcile_interval": settings.reconcile_interval, "claim_idle": settings.claim_idle})
