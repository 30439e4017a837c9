"""Server-rendered pages: the start page and a VM's console (noVNC from the npm package)."""

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
    found = await auth.session_user(request)
    return {"user": auth.public_user(found[0]) if found else None}


@routes.get("/vms/{vm_id}/console")
async def console_page(request: web.Request) -> web.StreamResponse:
    found = await auth.session_user(request)
    if found is None:
        raise web.HTTPFound("/?next=" + quote(request.path_qs, safe=""))
    user = found[0]
    async with db.cursor(request.app[db_key]) as cur:
        vm = await db.vm_for_owner(cur, request.match_info["vm_id"], str(user["id"]))
    return aiohttp_jinja2.render_template(
        "console.html", request, {"vm": {"id": str(vm["id"]), "name": vm["name"], "state": vm["state"]}})
