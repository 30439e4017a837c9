"""The gateway's side of console access: publish where a running VM's VNC listens, issue
short-lived single-use tokens bound to one VM and one user, and revoke them.
websockify's plugin (console/token_plugin.py) redeems the tokens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from console import keys
from drivers.base import VncTarget


@dataclass(frozen=True)
class ConsoleGrant:
    url: str
    token: str
    expires_at: float


async def publish_target(redis: aioredis.Redis, vm_id: str, target: VncTarget) -> None:
    await redis.set(keys.vnc_target_key(vm_id), json.dumps(target.to_json()))


async def issue_token(redis: aioredis.Redis, vm_id: str, user_id: str, ttl: int, ws_url: str) -> ConsoleGrant:
    token = keys.new_token()
    digest = keys.hash_token(token)
    expires_at = time.time() + ttl
    record = json.dumps({"vm_id": vm_id, "user_id": user_id, "expires_at": expires_at})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.token_key(digest), record, ex=ttl)
        pipe.sadd(keys.vm_tokens_key(vm_id), digest)
        pipe.expire(keys.vm_tokens_key(vm_id), ttl + 5)
        await pipe.execute()
    return ConsoleGrant(url=f"{ws_url}?token={token}", token=token, expires_at=expires_at)


async def revoke_vm(redis: aioredis.Redis, vm_id: str) -> None:
    """Forget where the VM's VNC is and revoke every outstanding token for it."""
    set_key = keys.vm_tokens_key(vm_id)
    digests = await redis.smembers(set_key)
    async with redis.pipeline(transaction=True) as pipe:
        for digest in digests:
            pipe.delete(keys.token_key(digest.decode() if isinstance(digest, bytes) else digest))
        pipe.delete(set_key)
        pipe.delete(keys.vnc_target_key(vm_id))
        await pipe.execute()


async def has_target(redis: aioredis.Redis, vm_id: str) -> bool:
    return bool(await redis.exists(keys.vnc_target_key(vm_id)))
