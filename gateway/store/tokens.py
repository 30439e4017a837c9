"""What stands for a user besides their password: cookie sessions (revoked ones, and every one at once through
the user's session epoch), API tokens and mailed one-time tokens. Tokens are stored only as their hashes
(gateway/credentials.py makes them); the caller of a request is resolved in one round trip."""

from __future__ import annotations

import uuid
from typing import Any, cast

import aiopg

from gateway.errors import Conflict, NotFound
from gateway.rows import UserRecord
from gateway.store.db import Row, fetch_all, fetch_found, fetch_one, fetch_returned, is_uuid

# ---- cookie sessions -------------------------------------------------------------------------------


async def session_user(cur: aiopg.Cursor, user_id: str, jti: str) -> UserRecord | None:
    """The user of a cookie session, in one query: None if the user is gone or the session's ``jti`` was
    revoked. Nothing is cached: every request asks Postgres afresh."""
    await cur.execute("SELECT u.* FROM users u WHERE u.id = %s"
                      " AND NOT EXISTS (SELECT 1 FROM revoked_sessions r WHERE r.jti = %s)", (user_id, jti))
    return cast("UserRecord | None", await fetch_one(cur))


async def revoke_session(cur: aiopg.Cursor, jti: str, expires_at: int) -> None:
    """Remember a logged-out session's id until it would have expired anyway (epoch seconds)."""
    await cur.execute("INSERT INTO revoked_sessions (jti, expires_at) VALUES (%s, to_timestamp(%s))"
                      " ON CONFLICT (jti) DO NOTHING", (jti, expires_at))


async def end_all_sessions(cur: aiopg.Cursor, user_id: str) -> None:
    """Invalidate every session of a user (password reset, disable): their JWTs carry an old epoch."""
    await cur.execute("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = %s", (user_id,))


# ---- API tokens ------------------------------------------------------------------------------------

API_TOKEN_COLUMNS = "id, user_id, name, prefix, created_at, expires_at, last_used_at, revoked_at"  # noqa: S105


async def api_token_user(cur: aiopg.Cursor, token_hash: str) -> tuple[str, UserRecord] | None:
    """The id of a live API token and its user's row, recording the token's use, in one statement; None if the
    token is unknown, revoked or expired."""
    # The token's id has a name no users column has.
    await cur.execute(
        "WITH t AS (UPDATE api_tokens SET last_used_at = now() WHERE token_hash = %s AND revoked_at IS NULL"
        " AND expires_at > now() RETURNING id, user_id)"
        " SELECT t.id AS vmgate_api_token_id, u.* FROM t JOIN users u ON u.id = t.user_id", (token_hash,))
    user = await fetch_one(cur)
    if user is None:
        return None
    return str(user.pop("vmgate_api_token_id")), cast(UserRecord, user)


async def create_api_token(cur: aiopg.Cursor, user_id: str, *, name: str, token_hash: str, prefix: str,
                           expires_in: int, max_live: int) -> Row:
    """Store a new token (its hash only) unless the user already has ``max_live`` usable ones."""
    async with cur.begin():
        # Serialises a user's concurrent creates, so the cap holds.
        await cur.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
        await cur.execute("SELECT count(*) AS n FROM api_tokens WHERE user_id = %s AND revoked_at IS NULL"
                          " AND expires_at > now()", (user_id,))
        if int((await fetch_returned(cur))["n"]) >= max_live:
            raise Conflict(f"You already have {max_live} active API tokens; revoke one first.",
                           code="too_many_tokens", details={"max": max_live})
        await cur.execute(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))"
            f" RETURNING {API_TOKEN_COLUMNS}",
            (str(uuid.uuid4()), user_id, name, token_hash, prefix, expires_in))
        return await fetch_returned(cur)


async def api_tokens_of(cur: aiopg.Cursor, user_id: str, limit: int,
                        after: tuple[Any, str] | None = None) -> list[Row]:
    """A user's tokens (revoked and expired ones too), newest first, after the cursor (created_at, id)."""
    at, last_id = after if after is not None else (None, None)
    await cur.execute(
        f"SELECT {API_TOKEN_COLUMNS} FROM api_tokens WHERE user_id = %s"
        " AND (%s::timestamptz IS NULL OR (created_at, id) < (%s::timestamptz, %s::uuid))"
        " ORDER BY created_at DESC, id DESC LIMIT %s",
        (user_id, at, at, last_id, limit))
    return await fetch_all(cur)


async def revoke_api_token(cur: aiopg.Cursor, token_id: str, user_id: str) -> Row:
    """Revoke the owner's token (again is a no-op); another user's or a malformed id is NotFound."""
    if not is_uuid(token_id):
        raise NotFound("No such API token.")
    await cur.execute(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s AND user_id = %s"
        f" RETURNING {API_TOKEN_COLUMNS}, (revoked_at = now()) AS revoked_now", (token_id, user_id))
    return await fetch_found(cur, "No such API token.")


async def live_api_tokens_of(cur: aiopg.Cursor, user_id: str) -> int:
    """How many usable (neither revoked nor expired) API tokens the user holds."""
    await cur.execute("SELECT count(*) AS n FROM api_tokens WHERE user_id = %s AND revoked_at IS NULL"
                      " AND expires_at > now()", (user_id,))
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def revoke_api_tokens_of(cur: aiopg.Cursor, user_id: str) -> int:
    """Revoke every usable token of a user; returns how many."""
    await cur.execute("UPDATE api_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL"
                      " AND expires_at > now()", (user_id,))
    return int(cur.rowcount)


# ---- mailed one-time tokens ------------------------------------------------------------------------

async def add_email_token(cur: aiopg.Cursor, user_id: str, purpose: str, token_hash: str, ttl: int) -> None:
    """Store a token for ``purpose``, valid ``ttl`` seconds."""
    await cur.execute(
        "INSERT INTO email_tokens (user_id, purpose, token_hash, expires_at)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
        (user_id, purpose, token_hash, ttl))


async def spend_email_tokens(cur: aiopg.Cursor, user_id: str, purpose: str) -> None:
    """Spend every unused ``purpose`` token of a user."""
    await cur.execute("UPDATE email_tokens SET used_at = now() WHERE user_id = %s AND purpose = %s"
                      " AND used_at IS NULL", (user_id, purpose))


async def email_token_is_valid(cur: aiopg.Cursor, token_hash: str, purpose: str) -> bool:
    """Whether the token would be accepted now (it is not spent; see ``consume_email_token``)."""
    await cur.execute(
        "SELECT 1 FROM email_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = %s AND t.purpose = %s"
        " AND t.used_at IS NULL AND t.expires_at > now() AND u.is_active", (token_hash, purpose))
    return await fetch_one(cur) is not None


async def consume_email_token(cur: aiopg.Cursor, token_hash: str, purpose: str) -> str | None:
    """Spend the token: its user's id if it was for ``purpose``, unused, unexpired and its user is active;
    otherwise None. One UPDATE, so two requests racing with one token cannot both win."""
    await cur.execute(
        "UPDATE email_tokens t SET used_at = now() FROM users u WHERE t.token_hash = %s AND t.purpose = %s"
        " AND t.used_at IS NULL AND t.expires_at > now() AND u.id = t.user_id AND u.is_active"
        " RETURNING t.user_id", (token_hash, purpose))
    row = await fetch_one(cur)
    return str(row["user_id"]) if row else None


async def email_token(cur: aiopg.Cursor, token_hash: str) -> Row | None:
    """A token whatever its state: ``user_id``, ``purpose``, ``used_at``, ``expired`` and its user's
    ``is_active`` (to say why it was refused)."""
    await cur.execute(
        "SELECT t.user_id, t.purpose, t.used_at, t.expires_at <= now() AS expired, u.is_active"
        " FROM email_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = %s", (token_hash,))
    return await fetch_one(cur)
