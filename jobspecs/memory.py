"""A VM's RAM as a file: how warm clones share their template's memory (issue 17).

A warm layer made for the local driver keeps the template's RAM in a file of its own (``ram``, next to
the layer's ``state``): the template boot runs with its RAM in that file (``share=on``), and its state is
saved with QEMU's ``x-ignore-shared`` migration capability, so the state holds the devices only. A clone's
first start maps the file copy-on-write (``share=off``) and restores the small state over it: the pages it
never writes stay the template's, in the page cache once for every clone; a page it writes becomes its
own. The local driver never lets QEMU open the layer's file: it hands QEMU a sealed copy in memory that
no process can write (drivers/local/memimage.py).

The backend's id is the machine's own RAM id (``pc.ram``), so the migration streams of a clone and of a VM
started with plain ``-m`` name the same RAM block: a clone's suspend state restores into a plain job.
"""

from __future__ import annotations

import re

# QEMU's own memory above the guest's (~70 MiB for tiny at boot; TCG's translation cache as it grows, the display,
# slirp): the local driver's cgroup allows the guest's memory plus this (drivers/local/cgroups.py), and so does a
# fleet task's hard limit (memory_max: jobspecs/fleet.py).
QEMU_OVERHEAD_MB = 512

OBJECT = "-object"
MACHINE = "-machine"
BACKEND_ID = "pc.ram"
MACHINE_BACKEND = f"memory-backend={BACKEND_ID}"
RAM_FILE = "ram"  # in a warm layer's folder
# The one -object a job may have: the RAM backend, sized in MiB, on one absolute path.
BACKEND_RE = re.compile(rf"memory-backend-file,id={re.escape(BACKEND_ID)},size=(?P<mb>[0-9]+)M,"
                        r"mem-path=(?P<path>/[A-Za-z0-9_./${}-]+),share=(?P<share>on|off)")


def backend_args(memory_mb: int, path: str, *, share: bool) -> list[str]:
    """The arguments that put a VM's RAM (``memory_mb`` MiB) in the file ``path``: its own, written through
    (``share``: a template boot), or mapped copy-on-write (a clone)."""
    return [OBJECT, f"memory-backend-file,id={BACKEND_ID},size={memory_mb}M,mem-path={path},"
                    f"share={'on' if share else 'off'}", MACHINE, MACHINE_BACKEND]


def without_backend(args: list[str]) -> list[str]:
    """``args`` without the RAM backend (plain ``-m`` memory again), a copy."""
    out: list[str] = []
    skip = 0
    for i, arg in enumerate(args):
        if skip:
            skip -= 1
            continue
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if (arg == OBJECT and BACKEND_RE.fullmatch(nxt)) or (arg == MACHINE and nxt == MACHINE_BACKEND):
            skip = 1
            continue
        out.append(arg)
    return out
