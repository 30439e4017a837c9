"""What every part of the engine is given (``EngineDeps``), and the few helpers they all use.

The engine never reads a web application: whoever builds it (gateway/web/app.py, or a test) passes the
Postgres pool, the Redis client, the driver, the templates, the settings and the metrics here.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import aiopg
import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry.trace import NoOpTracer, Tracer

from drivers.base import Driver, DriverError
from gateway import store
from gateway.config import Settings
from gateway.engine import console_grants, storage
from gateway.engine.queue import WorkQueue
from gateway.engine.templates import Templates
from gateway.errors import ApiError
from gateway.metrics import Metrics
from gateway.tracing import job_context

log = logging.getLogger("vmgate.lifecycle")


@dataclass
class EngineDeps:
    """The engine's collaborators, shared by its parts. ``settings`` may be replaced (a test shortens a
    retention): every part reads it from here at each use."""

    pool: aiopg.Pool
    redis: aioredis.Redis
    driver: Driver
    templates: Templates
    settings: Settings
    metrics: Metrics
    tracer: Tracer = field(default_factory=NoOpTracer)
    queue: WorkQueue = field(init=False)

    def __post_init__(self) -> None:
        self.queue = WorkQueue(self.redis, claim_idle=self.settings.claim_idle)

    async def enqueue(self, vm_id: str, reason: str) -> None:
        """Queue a VM; if Redis is away, the reconciler queues it when Redis is back."""
        try:
            # The job carries the request's trace context and id: the worker's spans and lines join them.
            await self.queue.put(vm_id, reason, context=job_context())
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("could not queue VM %s (%s): %s; the reconciler will", vm_id, reason, exc)

    async def revoke(self, vm_id: str, reason: str = "vm stopped") -> None:
        """End the VM's console sessions and refuse its console tokens."""
        await console_grants.revoke_vm(self.redis, vm_id, reason)


def now() -> dt.datetime:
    """The time, as Postgres's ``timestamptz`` columns come back."""
    return dt.datetime.now(dt.UTC)


def reason_of(exc: BaseException) -> str:
    """What a VM's row and audit entry say about a failure: the message of the errors that are ours to
    explain, only the type of anything else (its message may hold internals)."""
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, DriverError | storage.StorageError | OSError):
        return str(exc)[:1000]
    return f"internal error ({type(exc).__name__})"


def is_outage(exc: BaseException) -> bool:
    """Postgres or Redis away: expected, logged without a traceback, tried again."""
    return store.db.is_db_down(exc) or isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
