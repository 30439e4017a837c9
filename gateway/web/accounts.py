"""Account endpoints around mail: confirming an address, resending the link, resetting a password.

Mailed tokens are single-use, expire, and are stored hashed (gateway/web/mail.py). A bad token, whether
forged, expired, already used, or of a disabled account, gets one answer, 400 ``invalid_token``, so
a caller learns nothing from which it was; the audit log keeps the reason. A reset request always
answers 202 and does its work in the background, so neither the answer nor its timing tells
whether the address has an account.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

from aiohttp import web

from gateway import credentials, store
from gateway.engine import console_grants
from gateway.errors import BadRequest, Conflict, ServiceUnavailable
from gateway.web import auth, mail, ratelimit, validation
from gateway.web.appkeys import db_key, mailer_key, redis_key, settings_key
from gateway.web.http import client_ip, json_body, json_response

routes = web.RouteTableDef()

INVALID_LINK_MESSAGE = "This link is invalid, has already been used, or has expired. Ask for a new one."
# Tokens are 43 characters; anything much longer is not one of ours.
MAX_TOKEN = 128


def setup(app: web.Application) -> None:
    """Add the account routes and the mailer. Call it after the Postgres context is registered:
    contexts close in reverse, so background mail work is waited for while the database is open."""

    async def mailer_ctx(app: web.Application) -> AsyncIterator[None]:
        app[mailer_key] = mail.Mailer(app[settings_key])
        yield
        await app[mailer_key].close()

    app.cleanup_ctx.append(mailer_ctx)
    app.router.add_routes(routes)


def _token(body: dict[str, Any]) -> str:
    return validation.string(body, "token", max_len=MAX_TOKEN) or ""


async def _refuse(cur: Any, token: str, purpose: str, action: str, ip: str | None) -> NoReturn:
    reason, user_id = await mail.refusal_reason(cur, token, purpose)
    await store.audit.record(cur, action=action, outcome="denied", user_id=user_id, ip=ip, details={"reason": reason})
    raise BadRequest(INVALID_LINK_MESSAGE, code="invalid_token")


# ---- email verification ----------------------------------------------------------------------------

@routes.post("/api/auth/verify")
async def verify(request: web.Request) -> web.Response:
    """Confirm an address with the token from the verification mail (no login needed)."""
    body = await json_body(request)
    validation.check_unknown(body, {"token"})
    token = _token(body)
    ip = client_ip(request)
    await ratelimit.limit(request, "verify_ip", ip)
    async with store.db.cursor(request.app[db_key]) as cur:
        async with cur.begin():
            user_id = await mail.consume_token(cur, token, "verify")
            if user_id is not None and await store.users.mark_verified(cur, user_id):
                # The first proof that the mailbox's owner holds the account: whatever was made before it
                # (by someone who signed up with this address first) goes. Sessions stay (the verifier may be
                # logged in); a stranger's session ends with the password reset the owner then makes.
                await store.tokens.revoke_api_tokens_of(cur, user_id)
                await console_grants.revoke_user(request.app[redis_key], user_id, reason="address verified")
        if user_id is None:
            await _refuse(cur, token, "verify", "user.verify", ip)
        user = await store.users.user_by_id(cur, user_id)
        await store.audit.record(cur, action="user.verify", outcome="ok", user_id=user_id, ip=ip)
    return json_response({"verified": True, "email": user["email"] if user else None})


@routes.post("/api/auth/verify/resend")
async def resend(request: web.Request) -> web.Response:
    """Mail a fresh verification link to the logged-in user (earlier links stop working)."""
    user = await auth.current_user(request)
    if user["email_verified_at"] is not None:
        raise Conflict("Your email address is already confirmed.", code="already_verified")
    await ratelimit.limit(request, "resend_user", str(user["id"]))
    delivery = await mail.send_account_mail(request.app[db_key], request.app[mailer_key], user, "verify",
                                            client_ip(request), reason="resend")
    if not delivery.ok:
        raise ServiceUnavailable("The mail could not be sent right now. Try again in a few minutes.",
                                 code="mail_unavailable")
    return json_response({"sent": True, "email": user["email"]}, status=202)


# ---- password reset --------------------------------------------------------------------------------

async def _reset_request(app: web.Application, email: str, ip: str | None) -> None:
    """The work behind a reset request, off the request path (see the module docstring)."""
    pool = app[db_key]
    async with store.db.cursor(pool) as cur:
        user = await store.users.user_by_email(cur, email)
        if user is None or not user["is_active"]:
            await store.audit.record(cur, action="user.reset_request", outcome="denied",
                                     user_id=str(user["id"]) if user else None, ip=ip,
                                     details={"reason": "no_account" if user is None else "disabled"})
            return
    await mail.send_account_mail(pool, app[mailer_key], user, "reset", ip, reason="reset_request")


@routes.post("/api/auth/password-reset")
async def password_reset(request: web.Request) -> web.Response:
    """Mail a reset link if the address has an account; the answer is 202 either way."""
    body = await json_body(request)
    validation.check_unknown(body, {"email"})
    email = validation.email(body)
    ip = client_ip(request)
    # Per address as well as per IP: nobody can flood a mailbox with reset mails. The address
    # counts whether or not it has an account, so a 429 tells nothing either.
    await ratelimit.limit(request, "reset_ip", ip)
    await ratelimit.limit(request, "reset_email", email)
    request.app[mailer_key].spawn(_reset_request(request.app, email, ip))
    return json_response({"accepted": True}, status=202)


@routes.post("/api/auth/password-reset/confirm")
async def password_reset_confirm(request: web.Request) -> web.Response:
    """Set a new password with the token from the reset mail; every session of the account ends."""
    body = await json_body(request)
    validation.check_unknown(body, {"token", "password"})
    token = _token(body)
    password = validation.password(body)
    ip = client_ip(request)
    await ratelimit.limit(request, "reset_ip", ip)
    pool = request.app[db_key]
    async with store.db.cursor(pool) as cur:
        # Checked before hashing, so a forged token costs no Argon2 time; spent below, atomically.
        if not await mail.token_is_valid(cur, token, "reset"):
            await _refuse(cur, token, "reset", "user.reset", ip)
    password_hash = await credentials.hash_password(password)
    async with store.db.cursor(pool) as cur:
        async with cur.begin():
            user_id = await mail.consume_token(cur, token, "reset")
            if user_id is not None:
                await store.users.set_password_hash(cur, user_id, password_hash)
                await store.tokens.end_all_sessions(cur, user_id)
                await store.tokens.revoke_api_tokens_of(cur, user_id)
                await store.tokens.spend_email_tokens(cur, user_id, "reset")
                # The link came through the mailbox, which is what verification proves.
                await store.users.mark_verified(cur, user_id)
                # Open consoles end too. Inside the transaction: if Redis is down, nothing changes (503).
                await console_grants.revoke_user(request.app[redis_key], user_id, reason="password reset")
        if user_id is None:
            await _refuse(cur, token, "reset", "user.reset", ip)
        await store.audit.record(cur, action="user.reset", outcome="ok", user_id=user_id, ip=ip)
    return json_response({"password_reset": True})
