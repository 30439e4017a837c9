"""API tokens for scripts and GitOps: ``/api/me/tokens``.

A token is shown once, at creation; only its SHA-256 and a short prefix (to tell tokens apart)
are stored. It authenticates as ``Authorization: Bearer <token>`` (see gateway/web/auth.py) until it
expires or is revoked. Creating one needs a logged-in browser session: a token that could mint
tokens would let a leaked token outlive its own revocation.
"""

from __future__ import annotations

from aiohttp import web

from gateway import credentials, store
from gateway.engine import console_grants
from gateway.errors import Forbidden, ValidationFailed
from gateway.web import auth, paging, validation, views
from gateway.web.appkeys import db_key, redis_key
from gateway.web.http import client_ip, json_body, json_response

routes = web.RouteTableDef()

MIN_EXPIRES_IN = 3600
MAX_EXPIRES_IN = 365 * 86400
DEFAULT_EXPIRES_IN = 30 * 86400
MAX_NAME = 64
# Characters of the token kept in clear: "vg_" and 8 of its 43 random ones.
PREFIX_LENGTH = len(credentials.API_TOKEN_PREFIX) + 8


@routes.post("/api/me/tokens")
async def create_token(request: web.Request) -> web.Response:
    caller = await auth.authenticate(request)
    if caller.method != "cookie":
        raise Forbidden("API tokens are created from a logged-in session, not with another token.",
                        code="session_required")
    if caller.user["email_verified_at"] is None:
        # Whoever signs up first with someone else's address must not keep a way in after the owner takes
        # the account back (a reset, then verification, revoke tokens too; docs/SECURITY.md).
        raise Forbidden("Confirm your email address first: open the link we mailed you, or ask for a new one.",
                        code="email_not_verified")
    body = await json_body(request)
    validation.check_unknown(body, {"name", "expires_in"})
    name = (validation.string(body, "name", max_len=MAX_NAME) or "").strip()
    if not name:
        raise ValidationFailed("name: must not be blank", details={"field": "name"})
    expires_in = validation.integer(body, "expires_in", lo=MIN_EXPIRES_IN, hi=MAX_EXPIRES_IN,
                                    default=DEFAULT_EXPIRES_IN)
    token, token_hash = credentials.new_api_token()
    user_id = str(caller.user["id"])
    async with store.db.cursor(request.app[db_key]) as cur:
        row = await store.tokens.create_api_token(cur, user_id, name=name, token_hash=token_hash,
                                                  prefix=token[:PREFIX_LENGTH], expires_in=expires_in,
                                                  max_live=credentials.MAX_LIVE_TOKENS)
        await store.audit.record(cur, action="token.create", outcome="ok", user_id=user_id, ip=client_ip(request),
                                 details={"token_id": str(row["id"]), "name": name, "prefix": row["prefix"],
                                          "expires_at": row["expires_at"].isoformat()})
    view = views.public_token(row)
    return json_response({"id": view["id"], "name": view["name"], "token": token, "prefix": view["prefix"],
                          "created_at": view["created_at"], "expires_at": view["expires_at"]}, status=201)


@routes.get("/api/me/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    caller = await auth.authenticate(request)
    size, after = paging.limit(request), paging.cursor(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.tokens.api_tokens_of(cur, str(caller.user["id"]), size + 1, after)
    rows, next_cursor = paging.page(rows, size, paging.by_creation)
    return json_response({"tokens": [views.public_token(r, caller.token_id) for r in rows],
                          "next_cursor": next_cursor})


@routes.delete("/api/me/tokens/{token_id}")
async def revoke_token(request: web.Request) -> web.Response:
    caller = await auth.authenticate(request)
    user_id = str(caller.user["id"])
    async with store.db.cursor(request.app[db_key]) as cur:
        async with cur.begin():  # if Redis is down the token stays live (503) rather than half revoked
            row = await store.tokens.revoke_api_token(cur, request.match_info["token_id"], user_id)
            if row["revoked_now"]:
                # Consoles opened with it close too (event streams it holds end at their next re-check).
                await console_grants.revoke_api_token(request.app[redis_key], str(row["id"]))
                await store.audit.record(cur, action="token.revoke", outcome="ok", user_id=user_id,
                                         ip=client_ip(request),
                                         details={"token_id": str(row["id"]), "name": row["name"],
                                                  "prefix": row["prefix"], "via": caller.method})
    return json_response(views.public_token(row, caller.token_id))
