"""The embedded default driver: runs a VM's rendered Nomad job with QEMU on this host.

It reads the job the way Nomad's qemu task driver (hashicorp/nomad drivers/qemu/driver.go) does and
builds the same command line:

    <qemu> -machine type=<machine_type>,accel=<accelerator> -name <basename(image_path)>
           -m <MemoryMB>M -drive file=<image_path>,if=<drive_interface>,id=image0 -nographic
           [-monitor unix:<task dir>/qm.sock,server=on,wait=off]          (graceful_shutdown)
           [-chardev socket,path=<task dir>/qa.sock,... -device virtio-serial ...] (guest_agent)
           <args, with ${NOMAD_TASK_DIR} & co. interpolated> [-enable-kvm]
           [-runas UID:GID]                                (this driver, when root: the VM's own uid)

Each VM has a task directory ``<vms_root>/tasks/<vm_id>/`` (mode 0700): ``job.json`` (the job it
runs), ``qemu.pid``, ``serial.log`` (QEMU's stdout: the serial console, -serial stdio), ``stderr.log``,
``exit.json`` (how it last stopped) and the unix sockets QEMU listens on (qmp.sock, vnc.sock, qm.sock).
QEMU runs in its own session, not as a child the gateway must keep: a new ``LocalDriver`` on the same
root re-adopts every VM whose ``qemu.pid`` names a live QEMU whose command line points into that
VM's task directory (so a recycled pid is never mistaken for the VM).

Read in this order:

    job.py      is the job one this driver runs; QEMU's command line for it (pure: no files, no processes)
    taskdir.py  the files of a task directory (pid file, exit record, capped logs) and the per-VM lock
    process.py  QEMU processes: spawn in their own session, recognise in /proc, re-adopt, reap, watch,
                record exits; the emulator binary and run-as
    qmp.py      talking to a running QEMU: one QMP command, HMP snapshot commands, saving its memory
    driver.py   LocalDriver: the contract's calls, each in the order its steps must happen

docs/DRIVERS.md describes the files, the stop sequence and how this maps to Nomad.
"""

from drivers.local.driver import LocalDriver
from drivers.local.job import QemuTask, build_task, check_vm_id
from drivers.local.taskdir import SERIAL_LOG_KEEP

__all__ = ["SERIAL_LOG_KEEP", "LocalDriver", "QemuTask", "build_task", "check_vm_id"]
