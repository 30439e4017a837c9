"""QEMU's seccomp sandbox (``-sandbox``) for a VM's job: everything QEMU needs, nothing more.

``on`` blocks the system calls an emulator never needs; on top of it every job denies:

- ``obsolete``: old system calls (e.g. ``readdir``, ``sysfs``, ``ustat``);
- ``elevateprivileges``: ``set*uid``/``set*gid`` and friends: the QEMU of a VM never gains an identity;
- ``spawn``: ``fork``, ``vfork``, ``execve``: a guest that found a hole in a device model cannot start a
  program on the host;
- ``resourcecontrol``: ``setpriority``, ``sched_set*``: it cannot raise its own priority or pin itself.

Two starts need one of them back, and the rest of the job is the same:

- a start from a saved memory state through ``-incoming "exec:cat STATE"`` (warm first starts on a fleet,
  resumes): QEMU runs that command with ``/bin/sh``, so ``spawn=allow``. The local driver opens the state
  file itself and hands QEMU the descriptor (``-incoming fd:3``), and denies spawning again.
- QEMU 7.2 installs the sandbox before it drops root (``-runas``), and the drop is ``setgroups``,
  ``setgid``, ``setuid``: with ``elevateprivileges=deny`` QEMU dies of SIGSYS right there. A driver that
  makes QEMU drop root allows it (the local driver, when it runs as root); once dropped QEMU holds no
  capabilities, so those calls can only lower its privileges, never raise them.
"""

from __future__ import annotations

SANDBOX = "-sandbox"
INCOMING = "-incoming"
OPTIONS = ("obsolete", "elevateprivileges", "spawn", "resourcecontrol")


def value(*, spawn: bool = False, elevate: bool = False) -> str:
    """The ``-sandbox`` value: every option denied but ``spawn`` / ``elevateprivileges`` when asked."""
    allowed = {"spawn": spawn, "elevateprivileges": elevate}
    return "on," + ",".join(f"{name}={'allow' if allowed.get(name) else 'deny'}" for name in OPTIONS)


def spawns(args: list[str]) -> bool:
    """True when QEMU starts a program for this start: an ``-incoming "exec:..."``."""
    return any(args[i] == INCOMING and args[i + 1].startswith("exec:") for i in range(len(args) - 1))


def fit(args: list[str], *, drops_root: bool = False) -> list[str]:
    """``args`` with its ``-sandbox`` value set for what this start does (a copy; unchanged without one)."""
    out = list(args)
    for i in range(len(out) - 1):
        if out[i] == SANDBOX:
            out[i + 1] = value(spawn=spawns(out), elevate=drops_root)
    return out
