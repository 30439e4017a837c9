"""An in-memory driver with the local driver's semantics, for fast gateway tests.

What it promises, call by call (the same as ``LocalDriver``, minus QEMU):

- ``start`` checks the job exactly like the local driver (``build_task``: wrong driver, unknown
  ``${...}``, a job ID that is not ``vm-<vm_id>`` -> ``JobInvalid``), then "boots" after
  ``boot_delay`` seconds. Starting a running VM returns it unchanged (same pid). A failed start
  leaves the VM as it was: missing stays missing, stopped stays stopped (with the failure as reason).
- ``stop`` powers the VM off "by ACPI" (``details["how"] == "acpi"``); stopping a stopped or
  unknown VM does nothing. The serial log and job are kept.
- ``destroy`` forgets the VM entirely (``status`` -> missing); twice is fine.
- ``logs`` returns the tail of a fake serial console ("vmgate-tiny: ready" after a start).

Knobs for tests: ``fail_next_start = "reason"`` makes the next start raise ``DriverError(reason)``;
``healthy = False`` makes ``health()`` report not ok; ``crash(vm_id)`` simulates QEMU dying;
``write_serial(vm_id, text)`` appends to a VM's console. ``calls`` records (method, vm_id).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.base import Driver, DriverError, VMStatus, VncTarget
from drivers.local import build_task, check_vm_id

FAKE_TASKS_ROOT = Path("/run/vmgate-fake/tasks")


@dataclass
class FakeVM:
    job: dict[str, Any]
    pid: int | None
    vnc: VncTarget | None
    serial: str = ""
    exit: dict[str, Any] = field(default_factory=dict)


class FakeDriver(Driver):
    """Keeps VMs in a dict; see the module docstring for the contract it mirrors."""

    name = "fake"

    def __init__(self, *, boot_delay: float = 0.0) -> None:
        self.boot_delay = boot_delay
        self.fail_next_start: str | None = None
        self.healthy = True
        self.offered_networks: tuple[str, ...] = ("outbound", "none")  # as a local driver that can make them
        self.calls: list[tuple[str, str]] = []
        self.vms: dict[str, FakeVM] = {}
        self._pids = itertools.count(40000)
        self._locks: dict[str, asyncio.Lock] = {}

    def networks(self) -> tuple[str, ...]:
        return self.offered_networks

    def _status(self, vm_id: str) -> VMStatus:
        vm = self.vms.get(vm_id)
        if vm is None:
            return VMStatus("missing")
        if vm.pid is not None:
            return VMStatus("running", pid=vm.pid, vnc=vm.vnc, details={"task_dir": str(FAKE_TASKS_ROOT / vm_id)})
        return VMStatus("stopped", reason=vm.exit.get("message"), details=dict(vm.exit))

    async def start(self, vm_id: str, job: dict[str, Any]) -> VMStatus:
        self.calls.append(("start", vm_id))
        check_vm_id(vm_id)
        async with self._locks.setdefault(vm_id, asyncio.Lock()):
            vm = self.vms.get(vm_id)
            if vm is not None and vm.pid is not None:
                return self._status(vm_id)
            task = build_task(vm_id, job, FAKE_TASKS_ROOT / vm_id)
            if self.fail_next_start is not None:
                reason, self.fail_next_start = self.fail_next_start, None
                if vm is not None:
                    vm.exit = {"how": "start-failed", "message": f"start failed: {reason}"}
                raise DriverError(reason)
            if self.boot_delay:
                await asyncio.sleep(self.boot_delay)
            if vm is None:
                vm = self.vms[vm_id] = FakeVM(job=copy.deepcopy(job), pid=None, vnc=task.vnc)
            vm.job, vm.vnc, vm.pid, vm.exit = copy.deepcopy(job), task.vnc, next(self._pids), {}
            vm.serial += "fake QEMU: booting\nvmgate-tiny: ready\n"
            return self._status(vm_id)

    async def stop(self, vm_id: str, timeout: float) -> None:
        self.calls.append(("stop", vm_id))
        vm = self.vms.get(vm_id)
        if vm is None or vm.pid is None:
            return
        vm.serial += "vmgate-tiny: power off\n"
        vm.exit = {"how": "acpi", "message": "powered off by the guest (ACPI) after 0.0 s", "pid": vm.pid,
                   "returncode": 0, "seconds": 0.0}
        vm.pid = None

    async def destroy(self, vm_id: str) -> None:
        self.calls.append(("destroy", vm_id))
        self.vms.pop(vm_id, None)

    async def status(self, vm_id: str) -> VMStatus:
        return self._status(vm_id)

    async def list_vms(self) -> dict[str, VMStatus]:
        return {vm_id: self._status(vm_id) for vm_id in sorted(self.vms)}

    async def logs(self, vm_id: str, max_bytes: int) -> str:
        vm = self.vms.get(vm_id)
        if vm is None or max_bytes <= 0:
            return ""
        return vm.serial.encode()[-max_bytes:].decode("utf-8", errors="replace")

    async def health(self) -> dict[str, Any]:
        return {"ok": self.healthy, "driver": self.name, "running": sum(vm.pid is not None for vm in self.vms.values()),
                "problems": [] if self.healthy else ["FakeDriver.healthy is False"]}

    # ------------------------------------------------------------------ test helpers

    def crash(self, vm_id: str, returncode: int = 1) -> None:
        """Make a running VM's QEMU die, as if it crashed (status: stopped, how "exited")."""
        vm = self.vms[vm_id]
        vm.exit = {"how": "exited", "message": f"QEMU exited with code {returncode}", "pid": vm.pid,
                   "returncode": returncode}
        vm.pid = None

    def write_serial(self, vm_id: str, text: str) -> None:
        """Append ``text`` to the VM's fake serial console."""
        self.vms[vm_id].serial += text
