"""The one vocabulary of states (gateway/states.py): pinned to the database's CHECK constraints, and
used by `jobspec export`, which once forgot the suspend states and deleted suspended VMs' job files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiopg
import psycopg2
import pytest

from gateway import states
from gateway.config import Settings
from gateway.states import ACTIONS, Desired, SnapshotState, VmState
from gateway.store.migrate import migrate

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def migrated(database_url: str) -> str:
    """The session's database with every migration applied, its VMs and users emptied."""
    async with aiopg.create_pool(database_url, minsize=1, maxsize=1) as pool:
        await migrate(pool)
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE users CASCADE")
        conn.commit()
    return database_url


def check_values(database_url: str, constraint: str) -> set[str]:
    """The quoted values a CHECK constraint allows, read back from Postgres."""
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", (constraint,))
        row = cur.fetchone()
    assert row is not None, f"no constraint {constraint}"
    return set(re.findall(r"'([a-z_]+)'::text", row[0]))


async def test_state_enums_match_the_database(migrated: str) -> None:
    assert check_values(migrated, "vms_state_check") == {s.value for s in VmState}
    assert check_values(migrated, "vms_desired_state_check") == {s.value for s in Desired}
    assert check_values(migrated, "snapshots_state_check") == {s.value for s in SnapshotState}


def test_the_sets_partition_and_agree() -> None:
    assert set(states.ALL) == set(VmState) and len(states.ALL) == len(VmState)
    assert set(states.TRANSITIONAL) | states.SETTLED == set(VmState)
    assert not set(states.TRANSITIONAL) & states.SETTLED
    assert set(VmState) - set(states.HAS_JOB) == {VmState.DESTROYED, VmState.ERROR}
    assert {VmState.SUSPENDING, VmState.SUSPENDED, VmState.RESUMING, VmState.RESTORING} <= set(states.HAS_JOB)
    for action in ACTIONS.values():
        assert action.enters in states.TRANSITIONAL and action.done in states.SETTLED
        assert action.done.value == action.desired.value
        assert set(action.allowed_from) <= set(VmState)
    assert VmState.RUNNING == "running" and "suspended" in states.WAKEABLE  # StrEnum: plain strings compare
    assert states.holds_quota({"state": "error", "desired_state": "running"})
    assert not states.holds_quota({"state": "error", "desired_state": "destroyed"})
    assert not states.is_settled({"state": "suspended", "desired_state": "running"})


def insert_vm_in_every_state(database_url: str) -> dict[str, str]:
    """One VM row per state (with a job), owned by one user; returns state -> vm id."""
    ids: dict[str, str] = {}
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x') RETURNING id",
                    (str(uuid.uuid4()), f"{uuid.uuid4().hex[:8]}@example.test"))
        row = cur.fetchone()
        assert row is not None
        for state in VmState:
            vm_id = str(uuid.uuid4())
            desired = "destroyed" if state in (VmState.DESTROYED, VmState.DESTROYING) else (
                "suspended" if state in (VmState.SUSPENDING, VmState.SUSPENDED) else "running")
            job = {"ID": f"vm-{vm_id}", "Name": f"vm-{vm_id}", "Type": "service", "TaskGroups": []}
            cur.execute("INSERT INTO vms (id, user_id, name, template, cpu, memory_mb, disk_gb, state, desired_state,"
                        " jobspec) VALUES (%s, %s, %s, 'tiny', 1, 256, 1, %s, %s, %s)",
                        (vm_id, row[0], f"vm-{state}", state.value, desired, json.dumps(job)))
            ids[state.value] = vm_id
        conn.commit()
    return ids


@pytest.fixture
def gitops(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "gitops"
    out.mkdir()
    yield out


def test_export_keeps_the_job_files_of_suspended_vms(migrated: str, base_settings: Settings, gitops: Path) -> None:
    ids = insert_vm_in_every_state(migrated)
    for state in (VmState.SUSPENDED, VmState.SUSPENDING):  # exported earlier, while they ran
        (gitops / f"vm-{ids[state]}.nomad.hcl").write_text("# exported while it ran\n")
    env = dict(os.environ, POSTGRES_URL=migrated, REDIS_URL=base_settings.redis_url, NOMAD_ADDR="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "jobspec", "export", str(gitops)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    exported = {p.name for p in gitops.iterdir()}
    assert exported == {f"vm-{ids[s]}.nomad.hcl" for s in states.HAS_JOB}
    for state in (VmState.SUSPENDING, VmState.SUSPENDED, VmState.RESUMING, VmState.RESTORING):
        text = (gitops / f"vm-{ids[state]}.nomad.hcl").read_text()
        assert f'job "vm-{ids[state]}"' in text, state
    assert f"exported {len(states.HAS_JOB)} job(s)" in result.stdout and "removed 0" in result.stdout
