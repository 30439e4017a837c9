"""Every state a VM (and a snapshot) can be in, and what each state allows: the one vocabulary.

The VM row's ``state`` is what the engine last saw or did; ``desired_state`` is what the owner asked for.
The engine moves a VM through the transitional states until its state settles on what is desired:

    requested → provisioning → starting → running → stopping → stopped → destroying → destroyed
    running → suspending → suspended → resuming → running;  stopped/running/suspended → restoring → …
    any → error (with a reason)

``VmState`` is a ``StrEnum``: its members are the strings stored in Postgres and sent by the API, so a
row's plain ``str`` compares equal to them and ``row["state"] in SETTLED`` needs no conversion. A test
pins ``VmState`` to the CHECK constraint of ``vms.state`` (gateway/store/migrations/006_*.sql).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class VmState(StrEnum):
    """A VM's state (the ``vms.state`` column)."""

    REQUESTED = "requested"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    ERROR = "error"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"
    RESTORING = "restoring"


class Desired(StrEnum):
    """What the owner asked a VM to be (the ``vms.desired_state`` column)."""

    RUNNING = "running"
    STOPPED = "stopped"
    DESTROYED = "destroyed"
    SUSPENDED = "suspended"


class SnapshotState(StrEnum):
    """A snapshot's state (the ``snapshots.state`` column)."""

    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"
    DELETED = "deleted"
    ERROR = "error"


S = VmState

#: Every VM state, in the order of a VM's life (the admin filter lists them so).
ALL: tuple[VmState, ...] = tuple(VmState)
#: States the engine leaves alone: nothing is under way.
SETTLED: frozenset[VmState] = frozenset({S.RUNNING, S.STOPPED, S.DESTROYED, S.ERROR, S.SUSPENDED})
#: States with work under way; a VM stuck in one past TRANSITION_TIMEOUT is settled by the collector.
TRANSITIONAL: tuple[VmState, ...] = tuple(s for s in ALL if s not in SETTLED)
#: States whose VM has (or is about to have) a job: ``jobspec export`` writes their files, and removes
#: the files of VMs in any other state.
HAS_JOB: tuple[VmState, ...] = tuple(s for s in ALL if s not in (S.DESTROYED, S.ERROR))
#: States in which a QEMU may be serving a console; console records of VMs in other states are collected.
MAY_HAVE_CONSOLE: frozenset[VmState] = frozenset({S.RUNNING, S.STARTING, S.RESUMING, S.RESTORING})
#: States from which a start (or a console request) resumes the VM instead of booting it.
WAKEABLE: frozenset[VmState] = frozenset({S.SUSPENDED, S.SUSPENDING, S.RESUMING})
#: States the engine sends to ``stopped`` on their own when the owner wants the VM stopped.
STOPPABLE_IN_FLIGHT: frozenset[VmState] = frozenset({S.RUNNING, S.STARTING})
#: States whose VM may be snapshotted, and the desired states that allow it (not on its way out).
SNAPSHOT_FROM: tuple[VmState, ...] = (S.RUNNING, S.STOPPED, S.SUSPENDED)
SNAPSHOT_DESIRED: frozenset[Desired] = frozenset({Desired.RUNNING, Desired.STOPPED, Desired.SUSPENDED})
#: States from which a snapshot may be restored.
RESTORE_FROM: tuple[VmState, ...] = (S.RUNNING, S.STOPPED, S.SUSPENDED, S.ERROR)
#: Snapshot states that count against the owner's snapshot quota, and those that hold a name.
SNAPSHOT_COUNTS: frozenset[SnapshotState] = frozenset({SnapshotState.CREATING, SnapshotState.READY})
SNAPSHOT_BUSY: frozenset[SnapshotState] = frozenset({SnapshotState.CREATING, SnapshotState.DELETING})

# A VM holds a share of its owner's quota unless it is destroyed or its creation failed (`error` with
# desired state `destroyed`: nothing of it is left). A VM in `error` after crashes keeps its disk: it counts.
HOLDS_QUOTA_SQL = "NOT (state = 'destroyed' OR (state = 'error' AND desired_state = 'destroyed'))"


def holds_quota(row: Mapping[str, Any] | None) -> bool:
    """``HOLDS_QUOTA_SQL`` for a row in hand: the VM exists and still owns its disk and quota share."""
    return row is not None and not (row["state"] == S.DESTROYED
                                    or (row["state"] == S.ERROR and row["desired_state"] == Desired.DESTROYED))


def creation_failed(row: Mapping[str, Any]) -> bool:
    """The VM's creation failed and nothing of it is left to start, snapshot or restore."""
    return bool(row["state"] == S.ERROR and row["desired_state"] == Desired.DESTROYED)


def is_settled(row: Mapping[str, Any]) -> bool:
    """In a state the engine leaves alone; a VM suspended on its way back (woken while it was being
    suspended) is not settled yet."""
    return row["state"] in SETTLED and not (row["state"] == S.SUSPENDED and row["desired_state"] == Desired.RUNNING)


@dataclass(frozen=True)
class Action:
    """What an owner's action on a VM asks for."""

    name: str
    enters: VmState  # the transitional state the request puts the VM in
    allowed_from: tuple[VmState, ...]  # the states it may come from (else 409 invalid_state)
    desired: Desired  # the desired state it records
    done: VmState  # the state that means it finished
    past: str  # for messages: "could not be <past>"


#: The action table of ``POST /api/vms/{id}/<action>`` (and DELETE for destroy).
ACTIONS: dict[str, Action] = {
    a.name: a for a in (
        Action("stop", S.STOPPING, (S.RUNNING, S.STARTING, S.SUSPENDED), Desired.STOPPED, S.STOPPED, "stopped"),
        Action("start", S.STARTING, (S.STOPPED, S.ERROR), Desired.RUNNING, S.RUNNING, "started"),
        Action("suspend", S.SUSPENDING, (S.RUNNING,), Desired.SUSPENDED, S.SUSPENDED, "suspended"),
        Action("destroy", S.DESTROYING,
               (S.PROVISIONING, S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED, S.ERROR, S.SUSPENDING, S.SUSPENDED,
                S.RESUMING, S.RESTORING),
               Desired.DESTROYED, S.DESTROYED, "destroyed"),
    )
}
