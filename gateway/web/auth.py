"""Who is calling: a cookie session (a JWT, revocable server-side, with a CSRF token bound to it) or a
bearer API token, resolved in one place, ``current_user``. The credentials themselves (password hashes,
the JWTs, token hashes) are made and checked in gateway/credentials.py; this module is their request side.

Cookie-authenticated unsafe requests (POST, PUT, PATCH, DELETE) must send ``X-CSRF-Token``
equal to the session's CSRF token (readable by the page from the ``vmgate_csrf`` cookie and
returned by login); bearer-token requests need none, since a browser never adds that header
on its own.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import credentials, store
from gateway.config import Settings
from gateway.errors import Forbidden, Unauthorized
from gateway.rows import UserRecord
from gateway.web.appkeys import db_key, settings_key

SESSION_COOKIE = "vmgate_session"
CSRF_COOKIE = "vmgate_csrf"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Caller:
    """The authenticated user of a request and how they authenticated."""

    user: UserRecord
    method: str  # "cookie" or "bearer"
    claims: dict[str, Any] | None = None  # the session's JWT claims (cookie only)
    token_id: str | None = None  # the API token's id (bearer only)


CALLER_KEY = web.RequestKey("vmgate.caller", Caller)


# ---- cookie sessions -------------------------------------------------------------------------------

def set_session_cookies(response: web.StreamResponse, settings: Settings, token: str, csrf: str) -> None:
    common: dict[str, Any] = {"max_age": settings.session_ttl, "secure": settings.secure_cookies,
                              "samesite": "Lax", "path": "/"}
    response.set_cookie(SESSION_COOKIE, token, httponly=True, **common)
    # Readable by the page's JavaScript, which echoes it in X-CSRF-Token (double submit).
    response.set_cookie(CSRF_COOKIE, csrf, httponly=False, **common)


def clear_session_cookies(response: web.StreamResponse, settings: Settings) -> None:
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.del_cookie(name, path="/", secure=settings.secure_cookies, samesite="Lax")


async def revoke_session(request: web.Request, claims: dict[str, Any]) -> None:
    """Remember a logged-out session's id until it would have expired anyway (the collector forgets it then)."""
    async with store.db.cursor(request.app[db_key]) as cur:
        await store.tokens.revoke_session(cur, str(claims["jti"]), int(claims["exp"]))


async def _cookie_caller(request: web.Request, token: str) -> Caller | None:
    settings = request.app[settings_key]
    claims = credentials.decode_session(settings, token)
    if claims is None or not store.db.is_uuid(str(claims["sub"])):
        return None
    # One round trip: the user's row, unless the session was logged out (its jti is in revoked_sessions).
    async with store.db.cursor(request.app[db_key]) as cur:
        user = await store.tokens.session_user(cur, str(claims["sub"]), str(claims["jti"]))
    if user is None or not user["is_active"] or int(user["session_epoch"]) != int(claims["epoch"]):
        return None
    return Caller(user=user, method="cookie", claims=claims)


# ---- API tokens ------------------------------------------------------------------------------------

async def _bearer_caller(request: web.Request, token: str) -> Caller | None:
    if not token.startswith(credentials.API_TOKEN_PREFIX) or len(token) > 200:
        return None
    async with store.db.cursor(request.app[db_key]) as cur:
        found = await store.tokens.api_token_user(cur, credentials.hash_token(token))
    if found is None:
        return None
    token_id, user = found
    if not user["is_active"]:
        return None
    return Caller(user=user, method="bearer", token_id=token_id)


# ---- resolving the caller --------------------------------------------------------------------------

async def find_caller(request: web.Request) -> Caller | None:
    """The request's caller from a bearer token (if sent) or the session cookie; no CSRF check."""
    if CALLER_KEY in request:
        return request[CALLER_KEY]
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, bearer = header.partition(" ")
        if scheme.lower() != "bearer" or not bearer.strip():
            raise Unauthorized("Use `Authorization: Bearer <API token>`.", code="invalid_token")
        caller = await _bearer_caller(request, bearer.strip())
        if caller is None:
            # A bad token is an error, never a silent fall-back to the cookie.
            raise Unauthorized("The API token is invalid, expired or revoked.", code="invalid_token")
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        caller = await _cookie_caller(request, cookie) if cookie else None
    if caller is not None:
        request[CALLER_KEY] = caller
    return caller


def check_csrf(request: web.Request, caller: Caller) -> None:
    """Refuse a cookie-authenticated unsafe request whose X-CSRF-Token does not match the session."""
    if caller.method != "cookie" or request.method not in UNSAFE_METHODS or caller.claims is None:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), str(caller.claims["csrf"]).encode()):
        raise Forbidden(f"Missing or wrong {CSRF_HEADER} header (send the vmgate_csrf cookie's value).",
                        code="csrf_failed")


async def authenticate(request: web.Request) -> Caller:
    """The caller, or 401; for cookie sessions on unsafe methods, also the CSRF check (403)."""
    caller = await find_caller(request)
    if caller is None:
        raise Unauthorized("Log in first.", code="not_authenticated")
    check_csrf(request, caller)
    return caller


async def current_user(request: web.Request) -> UserRecord:
    """The authenticated user (see ``authenticate``)."""
    return (await authenticate(request)).user


async def require_admin(request: web.Request) -> UserRecord:
    """The authenticated admin. Anyone else, logged in or not, gets exactly what an unknown route
    gets, so admin routes are not advertised."""
    try:
        caller = await find_caller(request)
    except Unauthorized:  # a bad bearer token, too, must not tell an admin route from a missing one
        caller = None
    if caller is None or caller.user["role"] != "admin":
        raise web.HTTPNotFound()
    check_csrf(request, caller)
    return caller.user

