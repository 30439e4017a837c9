"""What every command shares: the refusal type, exit codes, and running work on a migrated database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiopg

from gateway import store
from gateway.config import Settings
from gateway.store.migrate import migrate

EXIT_REFUSED, EXIT_CONFIG, EXIT_POSTGRES = 1, 2, 3
T = TypeVar("T")


class Refused(Exception):
    """The command cannot do what was asked; the message says why."""


async def apply_migrations(settings: Settings) -> list[int]:
    """Apply pending migrations; the versions applied now."""
    async with aiopg.create_pool(settings.postgres_url, minsize=1, maxsize=1, timeout=10) as pool:
        return await migrate(pool)


async def in_db(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(cursor)`` on a migrated database."""
    async with aiopg.create_pool(settings.postgres_url, minsize=1, maxsize=1, timeout=10) as pool:
        await migrate(pool)
        async with store.db.cursor(pool) as cur:
            return await work(cur)
