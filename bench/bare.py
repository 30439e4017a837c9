"""The yardsticks for the API figure, run as ``python -m bench.bare --port N`` so they get a process (and a
core's worth of scheduling) of their own, like the gateway:

- ``GET /api/me/vms``: a bare aiohttp handler answering one small JSON document. No middleware, no
  database, no logging: what aiohttp itself costs per request.
- ``GET /minimal/api/me/vms`` (when ``POSTGRES_URL`` names the gateway's database): the least a handler can
  do to give the gateway's answer. The same session cookie checked the same way (the JWT with
  ``credentials.decode_session``, then the one query for the user unless the session was revoked), the same
  list query, the same rows turned into the same JSON, through an aiopg pool of the gateway's size with the
  same cursor. What it leaves out is the gateway's own share: its middlewares (request ids and traces,
  metrics, the error envelope), the security headers, the access log. The gateway's figure divided by this
  one is the gateway's overhead; divided by the bare one, the price of asking Postgres as well.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiopg
from aiohttp import web

from gateway import credentials, store
from gateway.config import Settings
from gateway.web import views
from gateway.web.app import POOL_MAXSIZE
from gateway.web.auth import SESSION_COOKIE
from gateway.web.http import json_response

BODY = {"vms": [{"vm_id": "00000000-0000-0000-0000-000000000000", "name": "bare", "state": "running"}]}
POOL = web.AppKey("pool", aiopg.Pool)
SETTINGS = web.AppKey("settings", Settings)
UNAUTHORIZED = {"error": {"code": "not_authenticated", "message": "Log in first."}}


async def handle(_request: web.Request) -> web.Response:
    return web.json_response(BODY)


async def minimal(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    token = request.cookies.get(SESSION_COOKIE, "")
    claims = credentials.decode_session(settings, token) if token else None
    if claims is None or not store.db.is_uuid(str(claims["sub"])):
        return web.json_response(UNAUTHORIZED, status=401)
    async with store.db.cursor(request.app[POOL]) as cur:
        user = await store.tokens.session_user(cur, str(claims["sub"]), str(claims["jti"]))
    if user is None or not user["is_active"] or int(user["session_epoch"]) != int(claims["epoch"]):
        return web.json_response(UNAUTHORIZED, status=401)
    async with store.db.cursor(request.app[POOL]) as cur:
        rows = await store.vms.vms_of(cur, str(user["id"]))
    return json_response({"vms": [views.public_vm(r, settings.public_url) for r in rows]})


async def _pool(app: web.Application) -> AsyncIterator[None]:
    """The gateway's pool: same size, same database (gateway/web/app.py)."""
    app[POOL] = await aiopg.create_pool(app[SETTINGS].postgres_url, minsize=1, maxsize=POOL_MAXSIZE, timeout=10)
    try:
        yield
    finally:
        app[POOL].terminate()
        await app[POOL].wait_closed()


def app(settings: Settings | None) -> web.Application:
    application = web.Application()
    application.router.add_get("/api/me/vms", handle)
    if settings is not None:
        application[SETTINGS] = settings
        application.cleanup_ctx.append(_pool)
        application.router.add_get("/minimal/api/me/vms", minimal)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--minimal", action="store_true", help="also serve /minimal/api/me/vms (needs the "
                        "gateway's settings: POSTGRES_URL, JWT_SECRET)")
    args = parser.parse_args()
    settings = Settings.load() if args.minimal else None
    web.run_app(app(settings), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
