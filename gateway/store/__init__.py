"""The store: Postgres, the source of truth. Small query functions that take a cursor first and raise
domain errors (gateway.errors), one module per subject, and the numbered migrations. Imports nothing above it
(engine, web, cli).

    db         the pooled dict cursor and the checks every module shares
    users      accounts, quotas and usage, the administrators' view of users
    vms        admission, reads, state changes and their history, the engine's and admins' lists
    snapshots  users' snapshots of their VMs and retention
    tokens     cookie sessions, API tokens, mailed one-time tokens
    audit      the audit log
    lifecycle  the engine's own statements: advisory locks, clearing a resumed VM's suspend time
    migrate    the numbered migrations in migrations/

Callers outside the store write ``from gateway import store`` and ``store.vms.vm_by_id(cur, ...)``: the
subject names the web layer uses for its own modules (vms, snapshots) stay unambiguous.
"""

from gateway.store import audit, db, lifecycle, snapshots, tokens, users, vms

__all__ = ["audit", "db", "lifecycle", "snapshots", "tokens", "users", "vms"]
