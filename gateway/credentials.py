"""Credentials that need no request: password hashes (Argon2id), session JWTs and API tokens with their hashes.

The web layer (gateway/web/auth.py) puts them in cookies and headers and checks them on each request; the
command line (``vmgate create-admin``) hashes a password without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.config import Settings

# What a login is: an address as people type them (mail delivery is the real check), matched whole
# (``fullmatch``): RFC 5322's dot-atom local part, so no quotes, commas, spaces or angle brackets, which a
# mail header would read as several recipients ("x,victim@example.com"), and a domain of ASCII labels (an
# IDN as punycode), so that Python's and Postgres's lower() agree; and a password of MIN_PASSWORD or more.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_RE = re.compile(rf"(?=[^@]{{1,64}}@){_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
MIN_PASSWORD, MAX_PASSWORD = 10, 1024
JWT_ALGORITHM = "HS256"
API_TOKEN_PREFIX = "vg_"  # noqa: S105 - a public prefix, not a secret
# Usable (neither revoked nor expired) API tokens a user may hold at once.
MAX_LIVE_TOKENS = 50

# argon2-cffi's defaults are Argon2id with RFC 9106's low-memory profile (64 MiB, 3 passes, 4 lanes), and so
# are the settings' (ARGON2_MEMORY_KIB, ARGON2_TIME_COST); ``configure`` applies the settings at start-up.
_hasher = PasswordHasher()
# Verified against when an email is unknown, so a login takes as long either way (made with the same cost).
_DUMMY_HASH = _hasher.hash("not a real password, only here to spend the same time")


def configure(settings: Settings) -> None:
    """Hash new passwords at the settings' cost. Hashes made at another cost still verify (each hash carries
    its parameters)."""
    global _hasher, _DUMMY_HASH
    if (_hasher.memory_cost, _hasher.time_cost) == (settings.argon2_memory_kib, settings.argon2_time_cost):
        return
    _hasher = PasswordHasher(memory_cost=settings.argon2_memory_kib, time_cost=settings.argon2_time_cost)
    _DUMMY_HASH = _hasher.hash("not a real password, only here to spend the same time")


def email_key(address: str) -> str:
    """The one form of an address for lookups and rate-limit keys (the store compares ``lower(email)``)."""
    return address.strip().lower()


# ---- passwords -------------------------------------------------------------------------------------

async def hash_password(password: str) -> str:
    """Hash off the event loop: Argon2id takes tens of milliseconds on purpose."""
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; with no hash (an unknown user) it is False, after as long."""
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


# ---- session JWTs ----------------------------------------------------------------------------------

def issue_session(settings: Settings, user: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
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


# ---- API tokens ------------------------------------------------------------------------------------

def new_api_token() -> tuple[str, str]:
    """A fresh API token and the SHA-256 under which it is stored."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored: API tokens and mailed one-time tokens."""
    return hashlib.sha256(token.encode()).hexdigest()
