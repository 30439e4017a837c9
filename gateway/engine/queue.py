"""The durable work queue: a Redis stream read through a consumer group.

A message says only "bring VM <id> to its desired state" (Postgres holds what that state is), so
running one twice has the effect of running it once. A worker acknowledges a message when the VM
has converged (or cannot); a message a worker took and never acknowledged — the worker died — is
taken over by another worker once it has been idle for ``claim_idle`` seconds. A worker that is
alive keeps its messages fresh (``touch``) so they are not taken from it. Acknowledged messages
are deleted, so the stream's length is the queue's depth. See docs/LIFECYCLE.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from console.redis_keys import PREFIX

STREAM = f"{PREFIX}work"
GROUP = "workers"


def queued_key(vm_id: str) -> str:
    """Set while the reconciler's message for a VM waits, so one pass does not queue it twice."""
    return f"{PREFIX}work:queued:{vm_id}"


# What a message may carry besides the VM: the queuing request's trace context and id (gateway/tracing.py).
CONTEXT_FIELDS = ("traceparent", "tracestate", "request_id")


@dataclass(frozen=True)
class Job:
    id: str
    vm_id: str
    reason: str
    enqueued_at: float
    deliveries: int
    context: dict[str, str] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _age(message_id: str, now: float) -> float:
    """Seconds since a stream id's millisecond timestamp."""
    return max(0.0, now - int(message_id.split("-", 1)[0]) / 1000)


class WorkQueue:
    def __init__(self, redis_client: aioredis.Redis, *, claim_idle: float = 15.0, stream: str = STREAM,
                 group: str = GROUP) -> None:
        self.redis = redis_client
        self.claim_idle_ms = int(claim_idle * 1000)
        self.stream = stream
        self.group = group

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist (after a Redis restart, too)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def put(self, vm_id: str, reason: str, *, once: bool = False,
                  context: dict[str, str] | None = None) -> str | None:
        """Queue work on ``vm_id``. With ``once``, skip it if the reconciler's message for it still waits.
        ``context``: the queuing request's trace context and id (CONTEXT_FIELDS; others are dropped)."""
        if once and not await self.redis.set(queued_key(vm_id), "1", nx=True, ex=max(1, self.claim_idle_ms // 250)):
            return None
        fields = {"vm_id": vm_id, "reason": reason, "at": f"{time.time():.3f}"}
        fields.update({k: v for k, v in (context or {}).items() if k in CONTEXT_FIELDS and v})
        message_id = await self.redis.xadd(self.stream, fields)  # type: ignore[arg-type]
        return _text(message_id)

    async def take(self, consumer: str, block_ms: int = 1000) -> Job | None:
        """The next job for ``consumer``: one abandoned by a dead worker first, else a new one."""
        try:
            return await self._take(consumer, block_ms)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            await self.ensure_group()  # Redis lost the stream (restarted, flushed): start again, empty
            return None

    async def _take(self, consumer: str, block_ms: int) -> Job | None:
        claimed = await self.redis.xautoclaim(self.stream, self.group, consumer, self.claim_idle_ms, "0-0", count=1)
        messages = claimed[1] if claimed and len(claimed) > 1 else []
        entries = [(mid, fields) for mid, fields in messages if fields]
        if not entries:
            read: Any = await self.redis.xreadgroup(self.group, consumer, {self.stream: ">"}, count=1, block=block_ms)
            entries = [entry for _stream, stream_entries in read or [] for entry in stream_entries if entry[1]]
        if not entries:
            return None
        message_id, fields = entries[0]
        message_id = _text(message_id)
        data = {_text(k): _text(v) for k, v in fields.items()}
        pending = await self.redis.xpending_range(self.stream, self.group, min=message_id, max=message_id, count=1)
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        return Job(id=message_id, vm_id=data.get("vm_id", ""), reason=data.get("reason", ""),
                   enqueued_at=float(data.get("at", "0") or 0), deliveries=deliveries,
                   context={k: data[k] for k in CONTEXT_FIELDS if k in data})

    async def touch(self, consumer: str, job: Job) -> None:
        """Reset the job's idle time: this worker is alive and still on it."""
        await self.redis.xclaim(self.stream, self.group, consumer, 0, [job.id], justid=True)

    async def done(self, job: Job) -> None:
        """Acknowledge and delete the job; the reconciler may queue its VM again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, job.id)
            pipe.xdel(self.stream, job.id)
            pipe.delete(queued_key(job.vm_id))
            await pipe.execute()

    async def stats(self) -> dict[str, Any]:
        """Depth, pending (taken, not yet acknowledged), the oldest job's age, and the consumers."""
        now = time.time()
        try:
            depth = int(await self.redis.xlen(self.stream))
            first = await self.redis.xrange(self.stream, count=1)
            summary = await self.redis.xpending(self.stream, self.group)
            consumers = await self.redis.xinfo_consumers(self.stream, self.group)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            return {"depth": 0, "pending": 0, "oldest_age_seconds": None, "consumers": []}
        return {
            "depth": depth,
            "pending": int(summary.get("pending", 0)) if isinstance(summary, dict) else 0,
            "oldest_age_seconds": round(_age(_text(first[0][0]), now), 3) if first else None,
            "consumers": [{"name": _text(c["name"]), "pending": int(c["pending"]),
                           "idle_seconds": round(int(c["idle"]) / 1000, 3)} for c in consumers],
        }
