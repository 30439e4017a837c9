"""Passwords (Argon2id), sessions (a JWT in an HttpOnly cookie, revocable server-side) and the
``current_user`` lookup every authenticated handler starts with."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway import db
from gateway.config import Settings
from gateway.errors import Unauthorized
from gateway.keys import db_key, redis_key, settings_key

SESSION_COOKIE = "vmgate_session"
JWT_ALGORITHM = "HS256"
REVOKED_PREFIX = "vmgate:session:revoked:"
# The (user, claims) of the request, once looked up.
USER_KEY = web.RequestKey("vmgate.user", tuple)

# argon2-cffi's defaults are Argon2id with RFC 9106's low-memory profile.
_hasher = PasswordHasher()
# Verified against when an email is unknown, so a login takes as long either way.
_DUMMY_HASH = _hasher.hash("not a real password, only here to spend the same time")


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


def issue_session(settings: Settings, user_id: str) -> tuple[str, dict[str, Any]]:
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + settings.session_ttl, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, settings.jwt_secret, algorithm=JWT_ALGORITHM), claims


def decode_session(settings: Settings, token: str) -> dict[str, Any] | None:
    try:
        claims: dict[str, Any] = jwt.decode(token, settings.jwt_secret, algorithms=[JWT_ALGORITHM],
                                            options={"require": ["sub", "exp", "jti"]})
    except jwt.PyJWTError:
        return None
    return claims


def set_session_cookie(response: web.StreamResponse, settings: Settings, token: str) -> None:
    response.set_cookie(SESSION_COOKIE, token, max_age=settings.session_ttl, httponly=True,
                        secure=settings.secure_cookies, samesite="Lax", path="/")


def clear_session_cookie(response: web.StreamResponse, settings: Settings) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", secure=settings.secure_cookies, samesite="Lax")


async def revoke_session(request: web.Request, claims: dict[str, Any]) -> None:
    """Remember a logged-out session's id until it would have expired anyway."""
    ttl = max(1, int(claims["exp"]) - int(time.time()))
    await request.app[redis_key].set(REVOKED_PREFIX + str(claims["jti"]), "1", ex=ttl)


async def session_user(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Return (user row, claims) for the request's session cookie, or None."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    settings = request.app[settings_key]
    claims = decode_session(settings, token)
    if claims is None or not db.is_uuid(str(claims["sub"])):
        return None
    if await request.app[redis_key].exists(REVOKED_PREFIX + str(claims["jti"])):
        return None
    async with db.cursor(request.app[db_key]) as cur:
        user = await db.user_by_id(cur, str(claims["sub"]))
    if user is None or not user["is_active"]:
        return None
    return user, claims


async def current_user(request: web.Request) -> dict[str, Any]:
    """The logged-in user, or 401. Cached on the request."""
    if USER_KEY in request:
        cached: dict[str, Any] = request[USER_KEY][0]
        return cached
    found = await session_user(request)
    if found is None:
        raise Unauthorized("Log in first.", code="not_authenticated")
    request[USER_KEY] = found
    return found[0]


def public_user(user: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(user["id"]),
        "email": user["email"],
        "role": user["role"],
        "email_verified": user.get("email_verified_at") is not None,
        "created_at": user["created_at"].isoformat(),
    }
