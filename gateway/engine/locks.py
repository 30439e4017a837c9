"""The engine's Postgres advisory locks: one per VM (two workers, in one gateway or several, never act on
one VM at once) and the reconciler's (one pass at a time across gateways). A lock dies with the
connection that holds it, so a gateway killed mid-step frees its VMs at once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiopg
import psycopg2

from gateway import store

RECONCILER_LOCK = 0x766D67617465  # "vmgate"


class VmLocker:
    """Per-VM advisory locks on one dedicated connection (a session lock must not go back to a pool)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: aiopg.Connection | None = None

    async def _cursor(self) -> Any:
        if self.conn is None or self.conn.closed:
            self.conn = await aiopg.connect(self.dsn, timeout=10)
        return await self.conn.cursor(cursor_factory=store.db.DictCursor)

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str, wait: float) -> AsyncIterator[bool]:
        """Hold the VM's lock; ``wait`` 0 tries once and yields False if another holds it.
        Waiting longer than ``wait`` raises (the job stays queued)."""
        cur = await self._cursor()
        name = f"vmgate:vm:{vm_id}"
        try:
            if wait <= 0:
                got = await store.lifecycle.try_lock(cur, name)
            else:
                await store.lifecycle.lock(cur, name, wait)
                got = True
            try:
                yield got
            finally:
                if got:
                    with contextlib.suppress(psycopg2.Error):
                        await store.lifecycle.unlock(cur, name)
        finally:
            cur.close()

    async def reset(self) -> None:
        """After an error: a fresh connection next time (no lock survives a broken one)."""
        await self.close()

    async def close(self) -> None:
        """Close the connection, releasing any lock still held on it."""
        if self.conn is not None and not self.conn.closed:
            await self.conn.close()
        self.conn = None


@contextlib.asynccontextmanager
async def reconciler_turn(pool: aiopg.Pool) -> AsyncIterator[Any | None]:
    """A transaction holding the reconciler's lock until it ends: yields its cursor, or None when another
    gateway's pass holds the lock (this one then has nothing to do)."""
    async with store.db.cursor(pool) as cur, cur.begin():
        yield cur if await store.lifecycle.try_transaction_lock(cur, RECONCILER_LOCK) else None
