"""The gateway's side of console access: publish where a running VM's VNC listens, issue
short-lived single-use tokens bound to one VM and one user, and revoke them — outstanding tokens
and live sessions alike, per VM (``revoke_vm``: stop, destroy) or per user (``revoke_user``:
logout, password reset, disable). websockify's plugin (console/token_plugin.py) redeems the
tokens and ends live sessions when told to. See docs/CONSOLE.md."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from console import redis_keys
from drivers.base import VncTarget


@dataclass(frozen=True)
class ConsoleGrant:
    url: str
    token: str
    expires_at: float


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def publish_target(redis: aioredis.Redis, vm_id: str, target: VncTarget) -> None:
    await redis.set(redis_keys.vnc_target_key(vm_id), json.dumps(target.to_json()))


async def issue_token(redis: aioredis.Redis, vm_id: str, user_id: str, ttl: int, ws_url: str,
                      max_session: int = redis_keys.DEFAULT_MAX_SESSION,
                      max_consoles: int = redis_keys.DEFAULT_MAX_CONSOLES,
                      api_token_id: str | None = None) -> ConsoleGrant:
    """A new token for one connection to ``vm_id``'s console, lasting at most ``max_session`` s once open.

    The plugin refuses it if the user then holds ``max_consoles`` live sessions; a session opened with
    an API token (``api_token_id``) ends when that token is revoked."""
    token = redis_keys.new_token()
    digest = redis_keys.hash_token(token)
    expires_at = time.time() + ttl
    # The user's revocation generation now: a logout between here and the redemption refuses the token
    # even if the redemption read it before the logout deleted it.
    generation = await redis.get(redis_keys.user_generation_key(user_id))
    record = json.dumps({"vm_id": vm_id, "user_id": user_id, "expires_at": expires_at, "max_session": max_session,
                         "max_consoles": max_consoles, "api_token_id": api_token_id,
                         "user_generation": None if generation is None else _text(generation)})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(redis_keys.token_key(digest), record, ex=ttl)
        pipe.sadd(redis_keys.vm_tokens_key(vm_id), digest)
        pipe.expire(redis_keys.vm_tokens_key(vm_id), ttl + 5)
        pipe.sadd(redis_keys.user_tokens_key(user_id), digest)
        pipe.expire(redis_keys.user_tokens_key(user_id), ttl + 5)
        await pipe.execute()
    return ConsoleGrant(url=f"{ws_url}?token={token}", token=token, expires_at=expires_at)


async def _revoking(redis: aioredis.Redis, set_key: str) -> Pipeline:
    """A transaction that already deletes every token in ``set_key`` and the set; the caller adds the rest."""
    digests = await redis.smembers(set_key)
    pipe = redis.pipeline(transaction=True)
    for digest in digests:
        pipe.delete(redis_keys.token_key(_text(digest)))
    pipe.delete(set_key)
    return pipe


async def revoke_vm(redis: aioredis.Redis, vm_id: str, reason: str = "vm stopped") -> None:
    """Forget where the VM's VNC is, revoke every outstanding token for it and end its live sessions."""
    async with await _revoking(redis, redis_keys.vm_tokens_key(vm_id)) as pipe:
        pipe.delete(redis_keys.vnc_target_key(vm_id))  # live sessions that miss the message see this
        pipe.publish(redis_keys.vm_end_channel(vm_id), reason)
        await pipe.execute()


async def revoke_user(redis: aioredis.Redis, user_id: str, reason: str = "logged out") -> None:
    """Revoke every outstanding console token of a user and end their live console sessions."""
    async with await _revoking(redis, redis_keys.user_tokens_key(user_id)) as pipe:
        pipe.set(redis_keys.user_generation_key(user_id), secrets.token_hex(8), ex=redis_keys.GENERATION_TTL)
        pipe.publish(redis_keys.user_end_channel(user_id), reason)
        await pipe.execute()


async def revoke_api_token(redis: aioredis.Redis, token_id: str, reason: str = "API token revoked") -> None:
    """End the live console sessions opened with one API token; tokens it got and not yet redeemed are
    refused when they are (the plugin checks the same key)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(redis_keys.api_token_revoked_key(token_id), "1", ex=redis_keys.GENERATION_TTL)
        pipe.publish(redis_keys.api_token_end_channel(token_id), reason)
        await pipe.execute()


async def live_sessions(redis: aioredis.Redis, user_id: str) -> int:
    """How many console sessions the user holds open now (leases not yet lapsed)."""
    return int(await redis.zcount(redis_keys.user_sessions_key(user_id), f"({time.time()}", "+inf"))


async def has_target(redis: aioredis.Redis, vm_id: str) -> bool:
    return bool(await redis.exists(redis_keys.vnc_target_key(vm_id)))


async def target_of(redis: aioredis.Redis, vm_id: str) -> VncTarget | None:
    """The console target published for ``vm_id`` (None: none, or one that cannot be read)."""
    raw = await redis.get(redis_keys.vnc_target_key(vm_id))
    try:
        return VncTarget.from_json(json.loads(raw)) if raw is not None else None
    except (ValueError, KeyError, TypeError):
        return None
