"""The lifecycle engine's own queries (gateway/engine): its advisory locks and its housekeeping. Each
takes a cursor first, as gateway.store.db's do; the engine's reads and state changes of VM rows are there.

Session locks are named by text and hashed by Postgres (``hashtextextended``), so every gateway computes
the same key for a name."""

from __future__ import annotations

from typing import Any


async def try_lock(cur: Any, name: str) -> bool:
    """Take the session advisory lock ``name`` if it is free; False if another session holds it."""
    await cur.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS got", (name,))
    row = await cur.fetchone()
    return bool(row["got"])


async def lock(cur: Any, name: str, wait: float) -> None:
    """Take the session advisory lock ``name``, waiting up to ``wait`` seconds (else psycopg2 raises
    LockNotAvailable). The lock timeout stays set on the session: every lock taken on it sets its own."""
    await cur.execute(f"SET lock_timeout = '{int(wait * 1000)}ms'")
    await cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (name,))


async def unlock(cur: Any, name: str) -> None:
    """Release the session advisory lock ``name`` this session holds."""
    await cur.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (name,))


async def try_transaction_lock(cur: Any, key: int) -> bool:
    """Take the advisory lock ``key`` until the cursor's transaction ends; False if another holds it."""
    await cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS leader", (key,))
    row = await cur.fetchone()
    return bool(row["leader"])


async def clear_suspended(cur: Any, vm_id: str) -> None:
    """The VM no longer has saved memory to resume from (its state is unchanged: no history entry)."""
    await cur.execute("UPDATE vms SET suspended_at = NULL WHERE id = %s", (vm_id,))


async def forget_expired_revocations(cur: Any) -> None:
    """Delete the revoked sessions past their expiry: their tokens are refused for their age alone."""
    await cur.execute("DELETE FROM revoked_sessions WHERE expires_at < now()")
