"""Who is calling: passwords (Argon2id), cookie sessions (a JWT, revocable server-side, with a
CSRF token bound to it) and bearer API tokens — resolved in one place, ``current_user``.

Cookie-authenticated unsafe requests (POST, PUT, PATCH, DELETE) must send ``X-CSRF-Token``
equal to the session's CSRF token (readable by the page from the ``vmgate_csrf`` cookie and
returned by login); bearer-token requests need none, since a browser never adds that header
on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.config import Settings
from gateway.errors import Forbidden, Unauthorized
from gateway.store import db
from gateway.web.appkeys import db_key, settings_key

SESSION_COOKIE = "vmgate_session"
CSRF_COOKIE = "vmgate_csrf"
CSRF_HEADER = "X-CSRF-Token"
JWT_ALGORITHM = "HS256"
API_TOKEN_PREFIX = "vg_"  # noqa: S105 - a public prefix, not a secret
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# argon2-cffi's defaults are Argon2id with RFC 9106's low-memory profile.
_hasher = PasswordHasher()
# Verified against when an email is unknown, so a login takes as long either way.
_DUMMY_HASH = _hasher.hash("not a real password, only here to spend the same time")


@dataclass(frozen=True)
class Caller:
    """The authenticated user of a request and how they authenticated."""

    user: dict[str, Any]
    method: str  # "cookie" or "bearer"
    claims: dict[str, Any] | None = None  # the session's JWT claims (cookie only)
    token_id: str | None = None  # the API token's id (bearer only)


CALLER_KEY = web.RequestKey("vmgate.caller", Caller)


# ---- passwords -------------------------------------------------------------------------------------

async def hash_password(password: str) -> str:
    """Hash off the event loop: Argon2id takes tens of milliseconds on purpose."""
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


# ---- cookie sessions -------------------------------------------------------------------------------

def issue_session(settings: Settings, user: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A session JWT for ``user``, carrying their current session epoch and a fresh CSRF token."""
    now = int(time.time())
    claims = {"sub": str(user["id"]), "iat": now, "exp": now + settings.session_ttl, "jti": uuid.uuid4().hex,
              "epoch": int(user.get("session_epoch", 0)), "csrf": secrets.token_urlsafe(32)}
    return jwt.encode(claims, settings.jwt_secret, algorithm=JWT_ALGORITHM), claims


def decode_session(settings: Settings, token: str) -> dict[str, Any] | None:
    """The claims of a session JWT signed with the current key or a former one; None if invalid."""
    for key in (settings.jwt_secret, *settings.jwt_old_secrets):
        try:
            claims: dict[str, Any] = jwt.decode(token, key, algorithms=[JWT_ALGORITHM],
                                                options={"require": ["sub", "exp", "jti", "epoch", "csrf"]})
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            return None
        return claims
    return None


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
    async with db.cursor(request.app[db_key]) as cur:
        await cur.execute("INSERT INTO revoked_sessions (jti, expires_at) VALUES (%s, to_timestamp(%s))"
                          " ON CONFLICT (jti) DO NOTHING", (str(claims["jti"]), int(claims["exp"])))


async def end_all_sessions(cur: Any, user_id: str) -> None:
    """Invalidate every session of a user (password reset, disable): their JWTs carry an old epoch."""
    await cur.execute("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = %s", (user_id,))


# The user of a cookie session, in one query: no row if the user is gone or the session's jti was revoked.
_SESSION_USER_SQL = ("SELECT u.* FROM users u WHERE u.id = %s"
                     " AND NOT EXISTS (SELECT 1 FROM revoked_sessions r WHERE r.jti = %s)")


async def _fetch_user(request: web.Request, sql: str, params: tuple[str, ...]) -> dict[str, Any] | None:
    """The first row of ``sql`` as a dict, or None. A plain cursor and one ``dict(zip(...))``: this runs on
    every authenticated request, and a dict cursor builds its rows a column at a time in Python."""
    async with request.app[db_key].acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, params)
        row = await cur.fetchone()
        if row is None:
            return None
        return dict(zip([column[0] for column in cur.description or ()], row, strict=True))


async def _cookie_caller(request: web.Request, token: str) -> Caller | None:
    settings = request.app[settings_key]
    claims = decode_session(settings, token)
    if claims is None or not db.is_uuid(str(claims["sub"])):
        return None
    # One round trip: the user's row, unless the session was logged out (its jti is in revoked_sessions).
    # Nothing is cached: every request asks Postgres afresh.
    user = await _fetch_user(request, _SESSION_USER_SQL, (str(claims["sub"]), str(claims["jti"])))
    if user is None or not user["is_active"] or int(user["session_epoch"]) != int(claims["epoch"]):
        return None
    return Caller(user=user, method="cookie", claims=claims)


# ---- API tokens ------------------------------------------------------------------------------------

def new_api_token() -> tuple[str, str]:
    """A fresh API token and the SHA-256 under which it is stored."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_api_token(token)


def hash_api_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A live API token's use is recorded and its user's row returned, in one round trip (no row: the token is
# unknown, revoked or expired). The token's id has a name no users column has.
_BEARER_USER_SQL = (
    "WITH t AS (UPDATE api_tokens SET last_used_at = now() WHERE token_hash = %s AND revoked_at IS NULL"
    " AND expires_at > now() RETURNING id, user_id)"
    " SELECT t.id AS vmgate_api_token_id, u.* FROM t JOIN users u ON u.id = t.user_id")


async def _bearer_caller(request: web.Request, token: str) -> Caller | None:
    if not token.startswith(API_TOKEN_PREFIX) or len(token) > 200:
        return None
    user = await _fetch_user(request, _BEARER_USER_SQL, (hash_api_token(token),))
    if user is None:
        return None
    token_id = user.pop("vmgate_api_token_id")
    if not user["is_active"]:
        return None
    return Caller(user=user, method="bearer", token_id=str(token_id))


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


async def current_user(request: web.Request) -> dict[str, Any]:
    """The authenticated user (see ``authenticate``)."""
    return (await authenticate(request)).user


async def require_admin(request: web.Request) -> dict[str, Any]:
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


def public_user(user: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(user["id"]),
        "email": user["email"],
        "role": user["role"],
        "email_verified": user.get("email_verified_at") is not None,
        "is_active": user.get("is_active", True),
        "created_at": user["created_at"].isoformat(),
    }
