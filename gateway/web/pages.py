"""Server-rendered pages of the web console (aiohttp-jinja2; docs/WEB.md).

Pages read what they show straight from Postgres through the same query and shaping functions the
API uses, so a page and ``/api`` never disagree. Everything a page changes goes through ``/api``
(JSON, the session cookie and ``X-CSRF-Token``) from a little JavaScript in ``gateway/web/static``; live
state comes from the API's server-sent events (or polling), and the parts that change are
re-fetched as HTML fragments (``/dashboard/vms``, ``/vms/{id}/panel``, ``/account/tokens``) rendered
by the very templates the full pages include.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
from aiohttp import web

from gateway import credentials, states, store
from gateway.rows import UserRecord
from gateway.web import auth, paging, views
from gateway.web.appkeys import db_key, driver_key, settings_key, templates_key
from gateway.web.quota import admin_views, quota_and_usage
from jobspecs.render import to_hcl

routes = web.RouteTableDef()

# States a VM passes through on its way somewhere; pages show them with a spinner.
TRANSITIONAL = states.TRANSITIONAL
AUDIT_PAGE = 25
ADMIN_PAGE = 50
_NO_STORE = {"Cache-Control": "no-store"}


def _render(template: str, request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, {"transitional": TRANSITIONAL, **context},
                                              status=status)
    response.headers.update(_NO_STORE)
    return response


async def _user_or_login(request: web.Request) -> UserRecord:
    """The logged-in user; anyone else is sent to the log-in page and comes back here afterwards."""
    caller = await auth.find_caller(request)
    if caller is None:
        raise web.HTTPFound("/?next=" + quote(request.path_qs, safe=""))
    return caller.user


async def _user_or_401(request: web.Request) -> UserRecord:
    """For fragments fetched by a page's script: no redirect, a 401 the script turns into a reload."""
    caller = await auth.find_caller(request)
    if caller is None:
        raise web.HTTPUnauthorized()
    return caller.user


def _public_url(request: web.Request) -> str:
    return request.app[settings_key].public_url


# ---- start page, dashboard ---------------------------------------------------------------------

async def _dashboard_context(request: web.Request, user: UserRecord) -> dict[str, Any]:
    user_id = str(user["id"])
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.vms.vms_of(cur, user_id)
        counted = await store.users.usage_of(cur, user_id)
    quota, usage = await quota_and_usage(request.app, user, counted)
    return {"user": views.public_user(user), "vms": [views.public_vm(r, _public_url(request)) for r in rows],
            "quota": quota, "usage": usage}


@routes.get("/")
async def index(request: web.Request) -> web.StreamResponse:
    caller = await auth.find_caller(request)
    if caller is None:
        return _render("index.html", request, {"user": None})
    return _render("dashboard.html", request, await _dashboard_context(request, caller.user))


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.StreamResponse:
    user = await _user_or_login(request)
    return _render("dashboard.html", request, await _dashboard_context(request, user))


@routes.get("/dashboard/vms")
async def dashboard_fragment(request: web.Request) -> web.StreamResponse:
    user = await _user_or_401(request)
    return _render("_dashboard_live.html", request, await _dashboard_context(request, user))


# ---- new VM ------------------------------------------------------------------------------------

@routes.get("/vms/new")
async def new_vm(request: web.Request) -> web.StreamResponse:
    user = await _user_or_login(request)
    context = await _dashboard_context(request, user)
    quota, usage = context["quota"], context["usage"]
    context["left"] = {"vms": quota["vms"] - usage["vms"], "cpu": quota["vcpus"] - usage["vcpus"],
                       "memory_mb": quota["memory_mb"] - usage["memory_mb"],
                       "disk_gb": quota["disk_gb"] - usage["disk_gb"]}
    context["templates"] = await request.app[templates_key].describe()
    context["networks"] = request.app[driver_key].networks()
    return _render("new_vm.html", request, context)


# ---- one VM ------------------------------------------------------------------------------------

async def _vm_context(request: web.Request, user: UserRecord) -> dict[str, Any]:
    async with store.db.cursor(request.app[db_key]) as cur:
        row = await store.vms.vm_for_owner(cur, request.match_info["vm_id"], str(user["id"]))
        events = await store.vms.vm_events(cur, str(row["id"]))
    vm = views.public_vm(row, _public_url(request))
    history = views.history(events)
    jobspec = row.get("jobspec")
    settings = request.app[settings_key]
    async with store.db.cursor(request.app[db_key]) as cur:
        snapshots = [views.public_snapshot(s) for s in await store.snapshots.snapshots_of(cur, str(row["id"]))]
        used = await store.snapshots.snapshot_usage(cur, str(user["id"]))
    return {"user": views.public_user(user), "vm": vm, "history": history,
            "jobspec_hcl": to_hcl(jobspec) if jobspec else None,
            "saves_memory": request.app[driver_key].saves_memory,
            "idle_suspend_after": request.app[templates_key].idle_suspend_after(row["template"], settings)
            if request.app[driver_key].saves_memory else 0,
            "snapshots": snapshots, "snapshots_busy": any(s["state"] in ("creating", "deleting") for s in snapshots),
            "snapshot_quota": {"snapshots": settings.snapshot_quota, "used": used},
            "retention": {"keep": settings.snapshot_keep, "max_age_seconds": settings.snapshot_max_age},
            "files": _files_context(request, row["template"])}


def _files_context(request: web.Request, template_name: str) -> dict[str, Any] | None:
    """The VM page's file transfer section: for a template with a guest agent the gateway reaches."""
    template = request.app[templates_key].templates.get(template_name)
    settings = request.app[settings_key]
    if template is None or not template.agent or not request.app[driver_key].reaches_guest_agent \
            or not settings.file_transfer_max_mb:
        return None
    return {"max_mb": settings.file_transfer_max_mb, "home": "/home/user" if template.desktop else "/root"}


@routes.get("/vms/{vm_id}")
async def vm_page(request: web.Request) -> web.StreamResponse:
    user = await _user_or_login(request)
    return _render("vm.html", request, await _vm_context(request, user))


@routes.get("/vms/{vm_id}/panel")
async def vm_fragment(request: web.Request) -> web.StreamResponse:
    user = await _user_or_401(request)
    return _render("_vm_panel.html", request, await _vm_context(request, user))


@routes.get("/vms/{vm_id}/console")
async def console_page(request: web.Request) -> web.StreamResponse:
    user = await _user_or_login(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        vm = await store.vms.vm_for_owner(cur, request.match_info["vm_id"], str(user["id"]))
    template = request.app[templates_key].templates.get(vm["template"])
    return _render("console.html", request, {
        "user": views.public_user(user),
        "vm": {"id": str(vm["id"]), "name": vm["name"], "state": vm["state"],
               "desktop": bool(template and template.desktop)}})


# ---- account -----------------------------------------------------------------------------------

async def _tokens_context(request: web.Request, user: UserRecord) -> dict[str, Any]:
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.tokens.api_tokens_of(cur, str(user["id"]), credentials.MAX_LIVE_TOKENS * 4)
    return {"user": views.public_user(user), "tokens": [views.public_token(r) for r in rows]}


@routes.get("/account")
async def account(request: web.Request) -> web.StreamResponse:
    user = await _user_or_login(request)
    before = paging.before(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.audit.audit_of(cur, str(user["id"]), limit=AUDIT_PAGE + 1, before_id=before)
        counted = await store.users.usage_of(cur, str(user["id"]))
    rows, next_before = paging.page(rows, AUDIT_PAGE, lambda row: row["id"])
    context = await _tokens_context(request, user)
    quota, usage = await quota_and_usage(request.app, user, counted)
    context.update(entries=[views.audit_entry(r) for r in rows], next_before=next_before, paged=before is not None,
                   quota=quota, usage=usage)
    return _render("account.html", request, context)


@routes.get("/account/tokens")
async def tokens_fragment(request: web.Request) -> web.StreamResponse:
    user = await _user_or_401(request)
    return _render("_tokens.html", request, await _tokens_context(request, user))


# ---- admin (404 for everyone else, like a page that does not exist) ------------------------------

@routes.get("/admin")
async def admin_home(request: web.Request) -> web.StreamResponse:
    await auth.require_admin(request)
    raise web.HTTPFound("/admin/users")


@routes.get("/admin/users")
async def admin_users(request: web.Request) -> web.StreamResponse:
    me = await auth.require_admin(request)
    after = paging.cursor(request)
    email = request.query.get("email", "").strip()[:254] or None
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.users.users_page(cur, ADMIN_PAGE + 1, after, email_contains=email)
    rows, next_cursor = paging.page(rows, ADMIN_PAGE, paging.by_creation)
    next_url = "/admin/users?" + urlencode({"cursor": next_cursor, **({"email": email} if email else {})}) \
        if next_cursor else None
    return _render("admin_users.html", request, {
        "user": views.public_user(me), "tab": "users", "users": await admin_views(request.app, rows),
        "email": email or "", "next_url": next_url, "paged": after is not None})


@routes.get("/admin/vms")
async def admin_vms(request: web.Request) -> web.StreamResponse:
    me = await auth.require_admin(request)
    after = paging.cursor(request)
    state = request.query.get("state") or None
    if state not in (None, *states.ALL):
        state = None
    include = request.query.get("include_destroyed") == "true"
    user_id = request.query.get("user_id")
    if user_id is not None and not store.db.is_uuid(user_id):
        user_id = None
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.vms.vms_page(cur, ADMIN_PAGE + 1, after, user_id=user_id, state=state,
                                        include_destroyed=include or state == "destroyed")
    rows, next_cursor = paging.page(rows, ADMIN_PAGE, paging.by_creation)
    query = {k: v for k, v in (("user_id", user_id), ("state", state),
                               ("include_destroyed", "true" if include else None)) if v}
    next_url = "/admin/vms?" + urlencode({"cursor": next_cursor, **query}) if next_cursor else None
    public_url = _public_url(request)
    return _render("admin_vms.html", request, {
        "user": views.public_user(me), "tab": "vms", "states": states.ALL, "state": state or "",
        "include_destroyed": include, "next_url": next_url, "paged": after is not None,
        "vms": [{**views.public_vm(r, public_url), "owner_email": r["owner_email"]} for r in rows]})


@routes.get("/admin/slo")
async def admin_slo(request: web.Request) -> web.StreamResponse:
    me = await auth.require_admin(request)
    return _render("admin_slo.html", request, {"user": views.public_user(me), "tab": "slo"})


@routes.get("/admin/queue")
async def admin_queue(request: web.Request) -> web.StreamResponse:
    me = await auth.require_admin(request)
    return _render("admin_queue.html", request, {"user": views.public_user(me), "tab": "queue"})


# ---- the pages a mailed link opens ---------------------------------------------------------------
# The token stays in the browser: the page's script posts it to the API (a mail scanner fetching the
# link spends nothing), and the page is never sent as a Referer.
_LINK_PAGE_HEADERS = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@routes.get("/verify")
async def verify_page(request: web.Request) -> web.StreamResponse:
    response = aiohttp_jinja2.render_template("verify.html", request, {"user": None})
    response.headers.update(_LINK_PAGE_HEADERS)
    return response


@routes.get("/reset")
async def reset_page(request: web.Request) -> web.StreamResponse:
    response = aiohttp_jinja2.render_template("reset.html", request, {"user": None})
    response.headers.update(_LINK_PAGE_HEADERS)
    return response
