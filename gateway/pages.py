"""Server-rendered pages: the start page, a VM's console (noVNC from the npm package), and the
address-verification and password-reset pages that mailed links open."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from gateway import auth, db
from gateway.keys import db_key

routes = web.RouteTableDef()


@routes.get("/")
@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    caller = await auth.find_caller(request)
    return {"user": auth.public_user(caller.user) if caller else None}


@routes.get("/vms/{vm_id}/console")
async def console_page(request: web.Request) -> web.StreamResponse:
    caller = await auth.find_caller(request)
    if caller is None:
        raise web.HTTPFound("/?next=" + quote(request.path_qs, safe=""))
    user = caller.user
    async with db.cursor(request.app[db_key]) as cur:
        vm = await db.vm_for_owner(cur, request.match_info["vm_id"], str(user["id"]))
    return aiohttp_jinja2.render_template(
        "console.html", request, {"vm": {"id": str(vm["id"]), "name": vm["name"], "state": vm["state"]}})


# The pages a mailed link opens. The token stays in the browser: the page's script posts it to the
# API (a mail scanner fetching the link spends nothing), and the page is never sent as a Referer.
_LINK_PAGE_HEADERS = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@routes.get("/verify")
async def verify_page(request: web.Request) -> web.StreamResponse:
    response = aiohttp_jinja2.render_template("verify.html", request, {})
    response.headers.update(_LINK_PAGE_HEADERS)
    return response


@routes.get("/reset")
async def reset_page(request: web.Request) -> web.StreamResponse:
    response = aiohttp_jinja2.render_template("reset.html", request, {})
    response.headers.update(_LINK_PAGE_HEADERS)
    return response
