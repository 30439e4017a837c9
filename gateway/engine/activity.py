"""When each VM was last used, for idle suspend (docs/LIFECYCLE.md, "Idle suspend").

A VM is in use while a console session is open on it (websockify's plugin keeps
``console_live_key`` alive for each session, console/token_plugin.py) and for IDLE_SUSPEND_AFTER
seconds after its owner's last API request on it (``touch``, from the API's VM routes; the web
console's own polls say ``X-Vmgate-Background: 1`` and do not count, ``gateway.web.http.is_background``)
or the end of its last console session. Both live in Redis: losing them only makes a VM look idle since
it last changed state (the reconciler counts from the row's ``updated_at`` at the least).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from console import redis_keys

log = logging.getLogger("vmgate.activity")
ACTIVITY_TTL = 31 * 86400  # longer than the longest IDLE_SUSPEND_AFTER


async def touch(redis_client: aioredis.Redis, vm_id: str) -> None:
    """Record use of the VM now. Best effort: with Redis away the request goes on."""
    try:
        await redis_client.set(redis_keys.activity_key(vm_id), f"{time.time():.3f}", ex=ACTIVITY_TTL)
    except (redis.exceptions.RedisError, OSError) as exc:
        log.debug("could not record activity on VM %s: %s", vm_id, exc)


async def forget(redis_client: aioredis.Redis, vm_id: str) -> None:
    """A destroyed VM's records go with it."""
    await redis_client.delete(redis_keys.activity_key(vm_id), redis_keys.console_live_key(vm_id))


async def usage(redis_client: aioredis.Redis, vm_ids: list[str]) -> dict[str, tuple[float, bool]]:
    """For each VM: (epoch of its last recorded use or 0, whether a console session is open on it)."""
    if not vm_ids:
        return {}
    async with redis_client.pipeline(transaction=False) as pipe:
        for vm_id in vm_ids:
            pipe.get(redis_keys.activity_key(vm_id))
            pipe.exists(redis_keys.console_live_key(vm_id))
        replies: list[Any] = await pipe.execute()
    found = {}
    for index, vm_id in enumerate(vm_ids):
        raw, live = replies[2 * index], replies[2 * index + 1]
        try:
            last = float(raw) if raw is not None else 0.0
        except ValueError:
            last = 0.0
        found[vm_id] = (last, bool(live))
    return found
