"""The REST API under /api. Handlers validate, call the domain modules, and shape JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any

from aiohttp import web

from gateway import credentials, store
from gateway.engine import console_grants
from gateway.errors import ApiError, BadRequest, Conflict, Forbidden, Unauthorized, ValidationFailed
from gateway.web import auth, mail, paging, ratelimit, validation, views, vms
from gateway.web.appkeys import db_key, driver_key, health_key, mailer_key, redis_key, settings_key, templates_key
from gateway.web.http import client_ip, json_body, json_response, owned_vm, wait_param
from gateway.web.quota import quota_and_usage
from jobspecs.render import to_hcl

log = logging.getLogger("vmgate.api")
routes = web.RouteTableDef()

MAX_LOG_BYTES = 1024 * 1024
class TooManyConsoles(ApiError):
    status, code = 429, "too_many_consoles"


CONSOLE_RESUME_WAIT = 30  # seconds a console request waits for its suspended VM to resume


# ---- auth ------------------------------------------------------------------------------------------

@routes.post("/api/auth/signup")
async def signup(request: web.Request) -> web.Response:
    body = await json_body(request)
    validation.check_unknown(body, {"email", "password"})
    email = validation.email(body)
    password = validation.password(body)
    await ratelimit.limit(request, "signup_ip", client_ip(request))
    password_hash = await credentials.hash_password(password)
    async with store.db.cursor(request.app[db_key]) as cur:
        user = await store.users.create_user(cur, email, password_hash)
        await store.audit.record(cur, action="user.signup", outcome="ok", user_id=str(user["id"]),
                                 ip=client_ip(request))
    # A mail that fails keeps the account: the user logs in and asks for the link again.
    delivery = await mail.send_account_mail(request.app[db_key], request.app[mailer_key], user, "verify",
                                            client_ip(request), reason="signup")
    return json_response({"user": views.public_user(user), "verification_mail_sent": delivery.ok}, status=201)


@routes.post("/api/auth/login")
async def login(request: web.Request) -> web.Response:
    body = await json_body(request)
    validation.check_unknown(body, {"email", "password"})
    email = validation.string(body, "email", max_len=254) or ""
    password = validation.string(body, "password", max_len=credentials.MAX_PASSWORD) or ""
    # Counted as a failure before the password is checked (429 when throttled); cleared if it succeeds.
    attempt = await ratelimit.login_attempt(request, email, client_ip(request))
    async with store.db.cursor(request.app[db_key]) as cur:
        user = await store.users.user_by_email(cur, email.strip())
        ok = await credentials.verify_password(user["password_hash"] if user else None, password)
        if not ok or user is None or not user["is_active"]:
            await store.audit.record(cur, action="user.login", outcome="denied",
                                     user_id=str(user["id"]) if user else None, ip=client_ip(request))
            raise Unauthorized("Wrong email or password.", code="invalid_credentials")
        await store.audit.record(cur, action="user.login", outcome="ok", user_id=str(user["id"]), ip=client_ip(request))
    await attempt.succeeded()
    settings = request.app[settings_key]
    token, claims = credentials.issue_session(settings, user)
    response = json_response({"user": views.public_user(user), "csrf_token": claims["csrf"],
                              "expires_at": dt.datetime.fromtimestamp(claims["exp"], dt.UTC).isoformat()})
    auth.set_session_cookies(response, settings, token, claims["csrf"])
    return response


@routes.post("/api/auth/logout")
async def logout(request: web.Request) -> web.Response:
    caller = await auth.find_caller(request)
    settings = request.app[settings_key]
    if caller is not None and caller.claims is not None:
        auth.check_csrf(request, caller)
        user, claims = caller.user, caller.claims
        await auth.revoke_session(request, claims)
        # Every console token the user still holds is revoked and every console they have open closes.
        await console_grants.revoke_user(request.app[redis_key], str(user["id"]))
        async with store.db.cursor(request.app[db_key]) as cur:
            await store.audit.record(cur, action="user.logout", outcome="ok", user_id=str(user["id"]),
                                     ip=client_ip(request))
    response = json_response({"logged_out": True})
    auth.clear_session_cookies(response, settings)
    return response


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    user = await auth.current_user(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        counted = await store.users.usage_of(cur, str(user["id"]))
    quota, usage = await quota_and_usage(request.app, user, counted)
    return json_response({"user": views.public_user(user), "quota": quota, "usage": usage})


@routes.get("/api/me/vms")
async def my_vms(request: web.Request) -> web.Response:
    user = await auth.current_user(request)
    include = request.query.get("include_destroyed", "false")
    if include not in ("true", "false"):
        raise BadRequest("include_destroyed must be true or false.", details={"field": "include_destroyed"})
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.vms.vms_of(cur, str(user["id"]), include_destroyed=include == "true")
    public_url = request.app[settings_key].public_url
    return json_response({"vms": [views.public_vm(r, public_url) for r in rows]})


@routes.get("/api/me/audit")
async def my_audit(request: web.Request) -> web.Response:
    user = await auth.current_user(request)
    size, before = paging.limit(request), paging.before(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.audit.audit_of(cur, str(user["id"]), limit=size + 1, before_id=before)
    rows, next_before = paging.page(rows, size, lambda row: row["id"])
    return json_response({"entries": [views.audit_entry(r) for r in rows], "next_before": next_before})


# ---- templates and VMs -----------------------------------------------------------------------------

@routes.get("/api/templates")
async def templates(request: web.Request) -> web.Response:
    return json_response({"templates": await request.app[templates_key].describe()})


@routes.post("/api/vms")
async def create_vm(request: web.Request) -> web.Response:
    user = await auth.current_user(request)
    if user["email_verified_at"] is None:
        raise Forbidden("Confirm your email address first: open the link we mailed you, or ask for a new one.",
                        code="email_not_verified")
    body = await json_body(request)
    validation.check_unknown(body, {"template", "name", "cpu", "memory_mb", "disk_gb", "userdata", "network"})
    template = request.app[templates_key].get(body.get("template"))
    wanted: dict[str, Any] = {"template": template.name}
    for field in ("cpu", "memory_mb", "disk_gb"):
        lo, hi = template.limits.bounds(field)
        wanted[field] = validation.integer(body, field, lo=lo, hi=hi, default=getattr(template.defaults, field))
    name = validation.string(body, "name", max_len=63, required=False)
    if name is not None and not validation.NAME_RE.fullmatch(name):
        raise ValidationFailed("name: lower-case letters, digits and '-', 1 to 63 characters",
                               details={"field": "name"})
    wanted["name"] = name
    userdata = validation.string(body, "userdata", max_len=vms.MAX_USERDATA, required=False)
    wanted["userdata"] = userdata
    wanted["network"] = vms.network_of(request.app, template, body.get("network"))
    wait = wait_param(request)
    await ratelimit.limit(request, "vm_create_user", str(user["id"]))
    row, running = await vms.create(request.app, user, wanted, client_ip(request), wait=wait)
    response = json_response(views.public_vm(row, request.app[settings_key].public_url), status=201 if running else 202)
    response.headers["Location"] = f"/api/vms/{row['id']}"
    return response


@routes.get("/api/vms/{vm_id}")
async def get_vm(request: web.Request) -> web.Response:
    _, vm = await owned_vm(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        events = await store.vms.vm_events(cur, str(vm["id"]))
    data = views.public_vm(vm, request.app[settings_key].public_url)
    data["history"] = views.history(events)
    return json_response(data)


@routes.patch("/api/vms/{vm_id}")
async def change_vm(request: web.Request) -> web.Response:
    """Change what can change on a VM that is not running: its network (docs/NETWORK.md)."""
    user, vm = await owned_vm(request)
    body = await json_body(request)
    validation.check_unknown(body, {"network"})
    if "network" not in body:
        raise ValidationFailed("network: required (outbound or none)", details={"field": "network"})
    network = vms.network_of(request.app, None, body["network"])
    row = await vms.change_network(request.app, user, vm, network, client_ip(request))
    return json_response(views.public_vm(row, request.app[settings_key].public_url))


async def _vm_action(request: web.Request, action: str) -> web.Response:
    user = await auth.current_user(request)
    wait = wait_param(request)
    if action != "destroy":  # each boots, saves or ends a QEMU; getting rid of a VM is never held back
        await ratelimit.limit(request, "vm_action_user", str(user["id"]))
    row, done = await vms.request_action(request.app, user, request.match_info["vm_id"], action,
                                         client_ip(request), wait=wait)
    return json_response(views.public_vm(row, request.app[settings_key].public_url), status=200 if done else 202)


@routes.post("/api/vms/{vm_id}/stop")
async def stop_vm(request: web.Request) -> web.Response:
    return await _vm_action(request, "stop")


@routes.post("/api/vms/{vm_id}/start")
async def start_vm(request: web.Request) -> web.Response:
    return await _vm_action(request, "start")


@routes.post("/api/vms/{vm_id}/suspend")
async def suspend_vm(request: web.Request) -> web.Response:
    return await _vm_action(request, "suspend")


@routes.delete("/api/vms/{vm_id}")
async def destroy_vm(request: web.Request) -> web.Response:
    return await _vm_action(request, "destroy")


@routes.get("/api/vms/{vm_id}/console")
async def console(request: web.Request) -> web.Response:
    user, vm = await owned_vm(request)
    vm_id = str(vm["id"])
    redis = request.app[redis_key]
    # Counted before anything is done for it: a refused request must not resume a suspended VM either.
    await ratelimit.limit(request, "console_user", str(user["id"]))
    # Opening a suspended VM's console resumes it; the token comes once it runs.
    vm = await vms.awake(request.app, vm, CONSOLE_RESUME_WAIT, poll=0.02)
    if vm["state"] != "running" or not await console_grants.has_target(redis, vm_id):
        raise Conflict(f"The VM is {vm['state']}; start it to open its console.", code="vm_not_running",
                       details={"state": vm["state"]})
    settings = request.app[settings_key]
    # The plugin holds the cap when the token is redeemed; this answers plainly before one is issued.
    open_now = await console_grants.live_sessions(redis, str(user["id"]))
    if open_now >= settings.consoles_per_user:
        raise TooManyConsoles(f"You have {open_now} consoles open; close one first (at most "
                              f"{settings.consoles_per_user} at once).",
                              details={"open": open_now, "limit": settings.consoles_per_user})
    caller = await auth.authenticate(request)
    grant = await console_grants.issue_token(redis, vm_id, str(user["id"]), settings.console_token_ttl,
                                             settings.vnc_public_url, max_session=settings.console_max_session,
                                             max_consoles=settings.consoles_per_user, api_token_id=caller.token_id)
    async with store.db.cursor(request.app[db_key]) as cur:
        await store.audit.record(cur, action="vm.console", outcome="ok", user_id=str(user["id"]), ip=client_ip(request),
                                 vm_id=vm_id)
    return json_response({"url": grant.url, "token": grant.token,
                          "expires_at": dt.datetime.fromtimestamp(grant.expires_at, dt.UTC).isoformat()})


@routes.get("/api/vms/{vm_id}/jobspec")
async def jobspec(request: web.Request) -> web.Response:
    _, vm = await owned_vm(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "hcl"):
        raise BadRequest("format must be json or hcl.", details={"field": "format"})
    if not vm["jobspec"]:
        raise Conflict("This VM has no job spec (its create failed before rendering).", code="no_jobspec")
    if fmt == "hcl":
        return web.Response(text=to_hcl(vm["jobspec"]), content_type="text/plain",
                            headers={"Cache-Control": "no-store"})
    return json_response({"Job": vm["jobspec"]})


@routes.get("/api/vms/{vm_id}/logs")
async def logs(request: web.Request) -> web.Response:
    _, vm = await owned_vm(request)
    raw = request.query.get("max_bytes", "65536")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LOG_BYTES:
        raise BadRequest(f"max_bytes must be an integer from 1 to {MAX_LOG_BYTES}.", details={"field": "max_bytes"})
    text = await request.app[driver_key].logs(str(vm["id"]), int(raw))
    return json_response({"vm_id": str(vm["id"]), "state": vm["state"], "serial": text})


# ---- health ----------------------------------------------------------------------------------------

async def _check(coro: Any, timeout: float = 3.0) -> dict[str, Any]:
    try:
        result = await asyncio.wait_for(coro, timeout)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return result if isinstance(result, dict) else {"ok": True}


HEALTH_TTL = 2.0  # seconds an answer to the public is reused: a flood of health checks runs the checks this often


async def _health(app: web.Application) -> dict[str, Any]:
    async def pg() -> dict[str, Any]:
        async with store.db.cursor(app[db_key]) as cur:
            await store.db.ping(cur)
        return {"ok": True}

    async def rd() -> dict[str, Any]:
        await app[redis_key].ping()
        return {"ok": True}

    checks = {"postgres": await _check(pg()), "redis": await _check(rd()),
              "driver": await _check(app[driver_key].health())}
    down = [name for name, check in checks.items() if not check.get("ok")]
    body: dict[str, Any] = {"status": "ok" if not down else "unavailable", "driver": app[driver_key].name,
                            "checks": checks}
    if down:
        body["down"] = down
    return body


@routes.get("/api/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Up or down for anyone (a load balancer, a probe); what each check said only for an admin, since it
    names versions, paths and errors. The public answer is reused for HEALTH_TTL seconds."""
    app = request.app
    caller = None
    with contextlib.suppress(ApiError):
        caller = await auth.find_caller(request)
    if caller is not None and caller.user["role"] == "admin":
        body = await _health(app)
        return json_response(body, status=503 if body.get("down") else 200)
    now, last = asyncio.get_running_loop().time(), app[health_key]
    if not last or now - last["at"] > HEALTH_TTL:
        last.update(at=now, up=not (await _health(app)).get("down"))
    up = bool(last["up"])
    return json_response({"status": "ok" if up else "unavailable"}, status=200 if up else 503)

