"""The contract every vmgate driver obeys.

A driver turns a rendered Nomad job (the JSON the Nomad HTTP API takes, as built by
``jobspecs.render``) into a running VM and reports what is actually running. The gateway
owns desired state (Postgres) and storage (overlays); a driver owns processes or
allocations. Every call is idempotent: calling it twice has the effect of calling it once.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

ActualState = Literal["running", "stopped", "missing"]


class DriverConfigError(Exception):
    """A driver cannot be built from the configuration it was given; ``key`` names the setting at fault
    (its environment variable, e.g. ``NOMAD_CLIENT_KEY``), ``problem`` says what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class DriverError(Exception):
    """A driver could not do what was asked; the message is safe to show a user."""


class NotSupported(DriverError):
    """This driver cannot do that (Nomad cannot save a running VM's memory); the message says why."""


class JobInvalid(DriverError):
    """The job cannot be run by this driver (wrong task driver, unknown interpolation...)."""


@dataclass(frozen=True)
class VncTarget:
    """Where a VM's VNC server listens: a unix socket path, or a host and port.

    ``consul_service`` (fleet VMs) tells websockify to take the VM's healthy instance of that Consul
    service (tagged ``vm-<id>``), which must be the allocation ``alloc_id`` at ``host``/``port``, where
    Nomad runs the VM. ``password`` is the VNC password QEMU asks for (fleet VMs, new at each start:
    jobspecs/vnc_password.py); websockify answers it, the browser never sees it. Never in a repr.
    """

    unix_socket: str | None = None
    host: str | None = None
    port: int | None = None
    consul_service: str | None = None
    alloc_id: str | None = None
    password: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        if self.unix_socket:
            return {"unix_socket": self.unix_socket}
        data: dict[str, Any] = {"host": self.host, "port": self.port}
        for name in ("consul_service", "alloc_id", "password"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VncTarget:
        if data.get("unix_socket"):
            return cls(unix_socket=str(data["unix_socket"]))
        optional = {name: str(data[name]) for name in ("consul_service", "alloc_id", "password") if data.get(name)}
        return cls(host=str(data["host"]), port=int(data["port"]), **optional)


@dataclass
class VMStatus:
    """What the driver sees of one VM right now."""

    state: ActualState
    pid: int | None = None
    vnc: VncTarget | None = None
    # Why a VM that is not running stopped, when the driver knows (exit code, signal...).
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Driver(abc.ABC):
    """Runs VMs described by rendered Nomad jobs.

    ``vm_id`` is the VM's id (the job is named ``vm-<vm_id>``). Methods are coroutines and
    must not block the event loop.
    """

    name: ClassVar[str]
    # True when the driver restarts a crashed VM itself (Nomad's restart block); the gateway's
    # reconciler then only reports what the driver did. False: the reconciler applies the job's
    # restart block (drivers/local).
    manages_restarts: ClassVar[bool] = False
    # True when the driver can save and load a running VM's memory (suspend, memory snapshots) through
    # ``save_state``/``load_state``/``delete_state``. Starting from a saved state needs no support: it is
    # the job's ``-loadvm`` argument.
    saves_memory: ClassVar[bool] = False
    reaches_guest_agent: ClassVar[bool] = False  # guest_agent() gives a socket on this host

    @abc.abstractmethod
    async def start(self, vm_id: str, job: dict[str, Any]) -> VMStatus:
        """Start the VM described by ``job`` and return its status once the hypervisor runs.

        Idempotent: if the VM already runs, return its status without starting a second one.
        On failure raise ``DriverError``; partial work (a process, a socket, a task
        directory) is cleaned up before raising. The disk (overlay) is never touched.
        """

    @abc.abstractmethod
    async def stop(self, vm_id: str, timeout: float) -> None:
        """Stop the VM: ask the guest to power off (ACPI), then stop it hard after ``timeout`` s.

        Idempotent: stopping a stopped or unknown VM is a no-op. Returns once nothing of the
        VM runs. The disk is kept.
        """

    @abc.abstractmethod
    async def destroy(self, vm_id: str) -> None:
        """Stop the VM hard and forget it: no process, no runtime files left.

        Idempotent. The overlay belongs to the gateway and is removed by it, not here.
        """

    @abc.abstractmethod
    async def status(self, vm_id: str) -> VMStatus:
        """Report the actual state of one VM (``missing`` if the driver never heard of it)."""

    @abc.abstractmethod
    async def list_vms(self) -> dict[str, VMStatus]:
        """Report every VM this driver knows of, running or not (used to re-adopt and reconcile)."""

    @abc.abstractmethod
    async def logs(self, vm_id: str, max_bytes: int) -> str:
        """Return up to the last ``max_bytes`` of the VM's serial console output ('' if none)."""

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """Return ``{"ok": bool, ...details}`` about the driver's ability to run VMs."""

    def networks(self) -> tuple[str, ...]:
        """The networks this driver can give a VM (``VMSpec.network``, docs/NETWORK.md); ``none`` always."""
        return ("none",)

    async def tidy(self) -> list[str]:
        """Remove what VMs that are gone left behind outside their task (the collector calls this every
        pass); returns what it removed. Nothing by default."""
        return []

    def paused(self, vm_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The running VM paused, its disks drained and flushed, while the block runs; it runs on after.
        For a consistent copy of its disk while it runs (``vmgate backup``). The caller holds the VM's
        lock. Raises ``NotSupported`` when this driver cannot reach the VM's QEMU."""
        raise NotSupported(f"the {self.name} driver cannot pause a VM for a copy of its disk")

    async def guest_agent(self, vm_id: str) -> Path:
        """The unix socket of the running VM's QEMU guest agent, on this host (drivers/guest_agent.py).
        ``NotSupported`` when the VM has none or the driver cannot reach it from here."""
        raise NotSupported(f"the {self.name} driver cannot reach a VM's guest agent from the gateway")

    async def save_state(self, vm_id: str, tag: str) -> int:
        """Save the running VM's disk and memory as the internal snapshot ``tag`` of its overlay (one of
        that tag is replaced); the VM runs on. Returns the bytes of memory saved. Raises ``NotSupported``
        unless ``saves_memory``."""
        raise NotSupported(f"the {self.name} driver cannot save a running VM's memory")

    async def suspend_to(self, vm_id: str, path: str) -> int:
        """Pause the running VM, save its memory (a migration stream) to the file ``path`` and end QEMU;
        the file appears only once it is complete. Returns its size. The disk is left as it was at the
        pause: starting the job with ``-incoming "exec:cat PATH"`` runs on from there."""
        raise NotSupported(f"the {self.name} driver cannot save a running VM's memory")

    async def load_state(self, vm_id: str, tag: str) -> None:
        """Put the running VM back to its internal snapshot ``tag``: disk and memory, in place."""
        raise NotSupported(f"the {self.name} driver cannot load a saved state into a running VM")

    async def delete_state(self, vm_id: str, tag: str) -> None:
        """Delete the internal snapshot ``tag`` of a running VM's overlay (no-op if there is none)."""
        raise NotSupported(f"the {self.name} driver cannot change a running VM's snapshots")

    async def wait_for_change(self, index: int, wait: float) -> int | None:
        """Block until what the driver runs may have changed since ``index`` (0: answer at once), or
        ``wait`` s passed; return the new index. None: this driver cannot tell, the reconciler only polls."""
        return None

    async def close(self) -> None:
        """Release clients and connections. Running VMs are not affected."""
        return None
