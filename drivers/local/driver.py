"""``LocalDriver``: the driver contract (drivers/base.py) for QEMU processes on this host.

This module is the order of things: what a start, stop, destroy or suspend does, step by step, and what
is left when one fails. The parts it puts in order live beside it: ``job`` (is the job runnable, what is
QEMU's command line), ``taskdir`` (the VM's files, its lock), ``process`` (spawning, recognising,
re-adopting, reaping and recording QEMUs) and ``qmp`` (talking to a running QEMU).

Over 400 lines: every operation on a VM's QEMU, in order, reads best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from drivers.base import Driver, DriverError, JobInvalid, NotSupported, VMStatus
from drivers.local import cgroups, confine, network, vdagent
from drivers.local.confine import PER_VM, dispose, identity
from drivers.local.job import GUEST_AGENT_SOCKET, SNAPSHOT_TAG_RE, VM_ID_RE, QemuTask, build_task, check_vm_id
from drivers.local.memimage import MemoryImages, check_memory_file
from drivers.local.process import Processes, QemuBinary, default_run_as, run
from drivers.local.qmp import (
    QMP_ERRORS,
    QMP_TIMEOUT,
    RESTORE_POLL,
    hmp,
    poke_guest,
    qmp,
    restore_shared,
    save_memory,
    set_ignore_shared,
    snapshot_sizes,
)
from drivers.local.taskdir import (
    POLL,
    VMLocks,
    cap_log,
    exit_message,
    read_exit,
    read_pid,
    remove_runtime,
    stderr_tail,
    tail,
    write_atomic,
)

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 10.0  # seconds from exec until QMP says "running"
ACPI_REPEAT = 3.0  # seconds between ACPI power button presses while a guest shuts down
QUIT_TIMEOUT = 5.0  # after QMP quit or SIGTERM, before SIGKILL
KILL_TIMEOUT = 10.0  # after SIGKILL, before giving up
STOP_MESSAGES = {"acpi": "powered off by the guest (ACPI)", "quit": "stopped with QMP quit",
                 "sigterm": "stopped with SIGTERM", "sigkill": "killed with SIGKILL"}


class LocalDriver(Driver):
    """Runs each VM's job as a QEMU process on this host; see drivers/local/__init__.py."""

    name = "local"
    saves_memory = True
    reaches_guest_agent = True

    def __init__(self, vms_root: Path, qemu_binary: str = "qemu-system-x86_64", *,
                 image_paths: Iterable[str | Path] | None = None, args_allowlist: Iterable[str] | None = None,
                 run_as: str | None = "auto", boot_timeout: float = BOOT_TIMEOUT,
                 networks: network.NetworkConfig | str | None = "auto") -> None:
        """``image_paths``: where image_path may point (default: vms_root), like Nomad's ``image_paths``.
        ``args_allowlist``: flags the job's args may use (default: any), like Nomad's ``args_allowlist``.
        ``run_as``: user QEMU drops to after opening its files (``-runas``); "auto" is a uid of its own
        per VM when running as root (drivers/local/confine.py) and nothing otherwise; None never drops.
        ``networks``: how VMs with ``network: outbound`` get one (drivers/local/network.py); "auto" is the
        defaults with the host's resolvers where this host can make networks; None: no VM gets one."""
        self.vms_root = Path(vms_root).absolute()
        self.tasks_root = self.vms_root / "tasks"
        self.qemu_binary = qemu_binary
        self.image_paths = tuple(str(p) for p in image_paths) if image_paths is not None else (str(self.vms_root),)
        self.args_allowlist = tuple(args_allowlist) if args_allowlist is not None else None
        self.run_as = default_run_as() if run_as == "auto" else run_as
        self.boot_timeout = boot_timeout
        self._qemu = QemuBinary(qemu_binary)
        self._procs = Processes(self.tasks_root, qemu_binary)
        self._memory = MemoryImages()  # sealed copies of template RAM files, for warm clones (memimage.py)
        self._locks = VMLocks(self.tasks_root / ".locks")
        self.network_problem = network.problem() if networks is not None else "networks are off (VM_NETWORK=none)"
        if networks == "auto":
            networks = network.NetworkConfig(dns=network.host_resolvers())
        self.network = networks if isinstance(networks, network.NetworkConfig) and not self.network_problem else None
        self._host_rules: network.NetworkConfig | None = None  # what ensure_host last installed

    def __repr__(self) -> str:
        return f"LocalDriver({str(self.vms_root)!r}, {self.qemu_binary!r})"

    def task_dir(self, vm_id: str) -> Path:
        """The VM's task directory (``${NOMAD_TASK_DIR}``)."""
        check_vm_id(vm_id)
        return self.tasks_root / vm_id

    # ------------------------------------------------------------------ start

    async def start(self, vm_id: str, job: dict[str, Any]) -> VMStatus:
        check_vm_id(vm_id)
        self._procs.trimmer.ensure_running()
        task_dir = self.tasks_root / vm_id
        # A job this driver cannot run is refused whatever the VM's state, before anything is created.
        task = build_task(vm_id, job, task_dir, self._qemu.path(), image_paths=self.image_paths,
                          args_allowlist=self.args_allowlist)
        if task.network == "outbound" and self.network is None:
            raise JobInvalid(f"this host gives VMs no outbound network: {self.network_problem}")
        async with self._locks.hold(vm_id):
            current = self._procs.status(vm_id)
            if current.state == "running":
                return current
            if not os.path.isfile(task.image_path):
                raise JobInvalid(f"config.image_path {task.image_path} does not exist")
            if task.incoming is not None and not os.path.isfile(task.incoming):
                raise JobInvalid(f"-incoming: the saved state {task.incoming} does not exist")
            if task.memory_file is not None and not task.memory_shared:
                check_memory_file(task.memory_file)
            argv = [*task.argv, *await self._qemu.run_as_args(identity(self.run_as, self.tasks_root, vm_id))]
            created = not task_dir.exists()
            pid: int | None = None
            network_done: asyncio.Future[None] | None = None
            self._procs.busy.add(vm_id)
            began = time.monotonic()
            try:
                self.tasks_root.mkdir(parents=True, exist_ok=True, mode=0o700)
                task_dir.mkdir(exist_ok=True, mode=0o700)
                os.chmod(task_dir, 0o700)
                orphan = self._procs.find(task_dir) if not created else None
                if orphan is not None:  # a QEMU whose starter died before writing its pid file
                    self._procs.adopt(vm_id, task_dir, orphan)
                    return self._procs.status(vm_id)
                remove_runtime(task_dir, task)
                cap_log(task_dir / "serial.log")
                # job.json first: a gateway that dies from here on leaves a QEMU the next one can
                # re-adopt with its VNC endpoint, and no record of an earlier exit.
                write_atomic(task_dir / "job.json", json.dumps(job, indent=2) + "\n")
                (task_dir / "exit.json").unlink(missing_ok=True)
                prefix: list[str] = []
                if task.network == "outbound" and self.network is not None:
                    name = await self._network_make(task_dir)
                    prefix = network.enter(name, self.network)
                    # The rest of its network is made while QEMU starts (about 25 ms of the start's 0.2 s):
                    # the guest is held (-S) until that is done.
                    network_done = asyncio.ensure_future(self._network_finish(task_dir, name))
                    argv = [*argv, "-S"]
                memory_fd = None
                if task.memory_file is not None and not task.memory_shared:
                    memory_fd = await asyncio.to_thread(self._memory.descriptor, task.memory_file)
                pid = self._procs.spawn(argv, task, task_dir, prefix, memory_fd)
                write_atomic(task_dir / "qemu.pid", f"{pid}\n")
                if memory_fd is not None and task.incoming is not None:
                    await restore_shared(task.qmp_socket, lambda: self._procs.alive(pid, task_dir),
                                         self.boot_timeout)
                await self._wait_ready(pid, task, task_dir, network_done)
                if memory_fd is not None and task.incoming is not None:
                    await set_ignore_shared(task.qmp_socket, False)  # from now on a VM like any other
                if task.incoming is not None and task.wake_socket is not None:
                    await poke_guest(task.wake_socket)  # a warm clone looks at its name now (devices.py)
                if task.vdagent:
                    await vdagent.plug(task.qmp_socket)
            except BaseException as exc:
                cause: BaseException = exc
                if network_done is not None:  # its thread cannot be stopped: let it end before its work is undone
                    await asyncio.gather(network_done, return_exceptions=True)
                    # A failed finish() removes the namespace and so ends the QEMU in it: that is the reason.
                    if isinstance(exc, Exception) and not network_done.cancelled() and network_done.exception():
                        cause = network_done.exception() or exc
                self._abort_start(pid, task, task_dir, created, cause)
                if isinstance(cause, OSError):
                    raise DriverError(f"could not start QEMU: {cause}") from cause
                if cause is not exc:
                    raise cause from exc
                raise
            finally:
                self._procs.busy.discard(vm_id)
            self._procs.watch(vm_id, pid)
            log.info("VM %s: QEMU pid %d running after %.2f s", vm_id, pid, time.monotonic() - began)
            status = self._procs.status(vm_id)
            status.details["start_seconds"] = round(time.monotonic() - began, 2)
            return status

    async def _network_make(self, task_dir: Path) -> str:
        """The VM's network namespace and tap, made now (and the host's rules, on this driver's first)."""
        assert self.network is not None
        if self.network.uplink and self._host_rules != self.network:
            await self._host_rules_in_place()
        return await asyncio.to_thread(network.make, self.network, task_dir)

    async def _network_finish(self, task_dir: Path, name: str) -> None:
        """The rest of the VM's network, while QEMU starts with the guest held; and the host's rules looked
        at again (another checkout's `make down` removes them once no VM of the host is left), put back if
        they are gone, before the guest runs (`nft list`, 4-5 ms, off the start's path)."""
        assert self.network is not None
        await asyncio.gather(asyncio.to_thread(network.finish, self.network, task_dir, name),
                             *([self._host_rules_in_place()] if self.network.uplink else []))

    async def _host_rules_in_place(self) -> None:
        assert self.network is not None
        if self._host_rules != self.network or await asyncio.to_thread(network.host_table, self.network) is None:
            await asyncio.to_thread(network.ensure_host, self.network)
            self._host_rules = self.network

    async def _wait_ready(self, pid: int, task: QemuTask, task_dir: Path,
                          held: Awaitable[None] | None = None) -> None:
        """Wait until QEMU runs the guest. ``held``: QEMU was started with the guest held (-S) until it is done."""
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if not self._procs.alive(pid, task_dir):
                code = self._procs.exit_code(pid)
                last = stderr_tail(task_dir)
                raise DriverError(f"QEMU exited during start ({exit_message(code).removeprefix('QEMU ')}): "
                                  f"{last or 'no output on stderr'}")
            status = None
            if task.qmp_socket.exists():
                with contextlib.suppress(*QMP_ERRORS):
                    reply = await qmp(task.qmp_socket, "query-status", timeout=max(0.5, deadline - time.monotonic()))
                    status = reply.get("status") if isinstance(reply, dict) else None
            if status == "running":
                return
            # Held (-S) and booted up to its first instruction or restored ("inmigrate" before): it runs once
            # what it waits for is done (awaiting that raises if it failed). Or restored from a state saved
            # from a paused VM that recorded its run state (a suspend's): QEMU then stays paused too.
            # images/warm.py saves without it (the VM starts by itself, as under Nomad).
            if (held is not None and status in ("paused", "prelaunch")) or (status == "paused" and task.incoming):
                if held is not None:
                    await held
                with contextlib.suppress(*QMP_ERRORS):
                    await qmp(task.qmp_socket, "cont", timeout=max(0.5, deadline - time.monotonic()))
                    return  # it runs: QEMU answered "cont" (no second look 10 ms later)
            if time.monotonic() >= deadline:
                last = stderr_tail(task_dir)
                raise DriverError(f"QEMU did not report running on its QMP socket within {self.boot_timeout:g} s"
                                  + (f": {last}" if last else ""))
            await asyncio.sleep(RESTORE_POLL if task.incoming is not None or "-loadvm" in task.argv else POLL)

    def _abort_start(self, pid: int | None, task: QemuTask, task_dir: Path, created: bool, exc: BaseException) -> None:
        """Undo a failed start: no process, no sockets, no pid file; a new task dir goes entirely."""
        if pid is not None:
            self._procs.unwatch(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Synchronous on purpose: this also runs when the start is cancelled. SIGKILL takes ms.
            deadline = time.monotonic() + KILL_TIMEOUT
            while self._procs.alive(pid, task_dir) and time.monotonic() < deadline:
                time.sleep(0.01)
        remove_runtime(task_dir, task)
        if created:
            dispose(task_dir, strict=False)
        elif (task_dir / "job.json").exists():
            self._procs.record_exit(task_dir, pid, "start-failed", f"start failed: {exc}")

    # ------------------------------------------------------------------ stop and destroy

    async def _shut_down(self, pid: int, task: QemuTask | None, task_dir: Path, timeout: float) -> str:
        """ACPI power-off, then QMP quit (or SIGTERM), then SIGKILL; returns which one ended QEMU."""
        qmp_socket = task.qmp_socket if task else task_dir / "qmp.sock"
        if (task is None or task.graceful_shutdown) and timeout > 0:
            # Press the power button again every few seconds: a press during early boot, before the
            # guest listens for it (acpid), is lost.
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await qmp(qmp_socket, "system_powerdown", timeout=min(QMP_TIMEOUT, left))
                except QMP_ERRORS as exc:
                    log.warning("VM in %s: system_powerdown failed: %s", task_dir, exc)
                if await self._procs.wait_gone(pid, task_dir, min(ACPI_REPEAT, max(0.0, deadline - time.monotonic()))):
                    return "acpi"
        try:
            await qmp(qmp_socket, "quit")
            how = "quit"
        except QMP_ERRORS:
            how = "sigterm"  # QEMU quits cleanly on SIGTERM too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if await self._procs.wait_gone(pid, task_dir, QUIT_TIMEOUT):
            return how
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if await self._procs.wait_gone(pid, task_dir, KILL_TIMEOUT):
            return "sigkill"
        raise DriverError(f"QEMU (pid {pid}) did not exit after SIGKILL")

    async def stop(self, vm_id: str, timeout: float) -> None:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return
        if not (self.tasks_root / vm_id).is_dir():
            return  # never started here (and no lock file left behind for it)
        async with self._locks.hold(vm_id):
            task_dir = self.tasks_root / vm_id
            pid = read_pid(task_dir)
            task = self._procs.load_task(vm_id, task_dir)
            if pid is None or not self._procs.alive(pid, task_dir):
                if pid is not None:
                    if not read_exit(task_dir):
                        self._procs.record_exit(task_dir, pid, "gone", "QEMU stopped while vmgate was not watching")
                    remove_runtime(task_dir, task)
                return
            self._procs.busy.add(vm_id)
            began = time.monotonic()
            try:
                how = await self._shut_down(pid, task, task_dir, timeout)
                seconds = time.monotonic() - began
                message = STOP_MESSAGES[how]
                self._procs.record_exit(task_dir, pid, how, f"{message} after {seconds:.1f} s", seconds)
                remove_runtime(task_dir, task)
                self._procs.unwatch(pid)
                log.info("VM %s: %s after %.1f s", vm_id, message, seconds)
            finally:
                self._procs.busy.discard(vm_id)

    async def destroy(self, vm_id: str) -> None:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return
        async with self._locks.hold(vm_id, remove=True):
            task_dir = self.tasks_root / vm_id
            pid = read_pid(task_dir)
            if (pid is None or not self._procs.alive(pid, task_dir)) and task_dir.is_dir():
                # No pid file, or a stale one: a QEMU whose starter died before writing it (or whose file an
                # earlier, interrupted removal took) still writes into the directory, and rmtree would race it.
                pid = await asyncio.to_thread(self._procs.find, task_dir) or pid
            self._procs.busy.add(vm_id)
            try:
                if pid is not None and self._procs.alive(pid, task_dir):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    if not await self._procs.wait_gone(pid, task_dir, KILL_TIMEOUT):
                        raise DriverError(f"QEMU (pid {pid}) did not exit after SIGKILL")
                if pid is not None:
                    self._procs.forget(pid)
                await asyncio.to_thread(dispose, task_dir)
            finally:
                self._procs.busy.discard(vm_id)

    # ------------------------------------------------------------------ saved states (qcow2 internal snapshots)

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not SNAPSHOT_TAG_RE.fullmatch(tag):
            raise DriverError(f"bad snapshot tag {tag!r}")

    async def _running_task(self, vm_id: str) -> tuple[int, Path, QemuTask]:
        """The live QEMU of ``vm_id`` and its task; the caller holds the VM's lock."""
        check_vm_id(vm_id)
        task_dir = self.tasks_root / vm_id
        pid = read_pid(task_dir)
        task = self._procs.load_task(vm_id, task_dir)
        if pid is None or task is None or not self._procs.alive(pid, task_dir):
            raise DriverError("the VM is not running")
        return pid, task_dir, task

    @contextlib.asynccontextmanager
    async def paused(self, vm_id: str) -> AsyncIterator[None]:
        _pid, _task_dir, task = await self._running_task(vm_id)
        try:
            running = bool((await qmp(task.qmp_socket, "query-status")).get("running"))
            if running:
                # QEMU's stop drains every disk's requests and flushes them (qcow2's caches included)
                # before it answers: the overlay file is then complete on disk until cont.
                await qmp(task.qmp_socket, "stop")
        except QMP_ERRORS as exc:
            raise DriverError(f"could not pause the VM: {type(exc).__name__}: {exc}") from exc
        try:
            yield
        finally:
            if running:
                try:
                    await qmp(task.qmp_socket, "cont")
                except QMP_ERRORS as exc:
                    log.warning("VM %s: could not let it run on after a pause: %s", vm_id, exc)

    async def guest_agent(self, vm_id: str) -> Path:
        _pid, task_dir, task = await self._running_task(vm_id)
        if task_dir / GUEST_AGENT_SOCKET not in task.sockets:
            raise NotSupported("this VM has no guest agent (its template has none)")
        return task_dir / GUEST_AGENT_SOCKET

    async def save_state(self, vm_id: str, tag: str) -> int:
        self._check_tag(tag)
        async with self._locks.hold(vm_id):
            _pid, _task_dir, task = await self._running_task(vm_id)
            began = time.monotonic()
            async with vdagent.detached(task.qmp_socket, task.vdagent):
                await hmp(task.qmp_socket, f"savevm {tag}")
            size = (await snapshot_sizes(task.qmp_socket, task.image_path)).get(tag)
            if size is None:
                raise DriverError(f"savevm {tag} left no snapshot of that name")
            log.info("VM %s: state saved as %s (%d MiB of memory) in %.2f s", vm_id, tag, size >> 20,
                     time.monotonic() - began)
            return size

    async def suspend_to(self, vm_id: str, path: str,
                         while_paused: Callable[[], Awaitable[None]] | None = None) -> int:
        """``while_paused`` (the warm builder's): run right after the save, while nothing has run since, not
        even the clipboard's re-plug (which writes into the guest's RAM): the moment the RAM file is copied."""
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        async with self._locks.hold(vm_id):
            pid, task_dir, task = await self._running_task(vm_id)
            self._procs.busy.add(vm_id)
            began = time.monotonic()
            try:
                async with vdagent.detached(task.qmp_socket, task.vdagent):
                    await save_memory(task.qmp_socket, partial)
                    if while_paused is not None:
                        await while_paused()
                await self._shut_down(pid, task, task_dir, timeout=0)  # its memory is saved: no ACPI
                os.replace(partial, target)  # complete: now it may be resumed from
                size = target.stat().st_size
                seconds = time.monotonic() - began
                self._procs.record_exit(task_dir, pid, "suspend", f"suspended: memory saved to {target.name} in "
                                                                  f"{seconds:.2f} s", seconds)
                remove_runtime(task_dir, task)
                self._procs.unwatch(pid)
                log.info("VM %s: suspended, %d MiB of memory saved in %.2f s", vm_id, size >> 20, seconds)
                return size
            finally:
                self._procs.busy.discard(vm_id)

    async def load_state(self, vm_id: str, tag: str) -> None:
        self._check_tag(tag)
        async with self._locks.hold(vm_id):
            _pid, _task_dir, task = await self._running_task(vm_id)
            if tag not in await snapshot_sizes(task.qmp_socket, task.image_path):
                raise DriverError(f"the VM's disk has no snapshot {tag}")
            async with vdagent.detached(task.qmp_socket, task.vdagent):
                await hmp(task.qmp_socket, f"loadvm {tag}")

    async def delete_state(self, vm_id: str, tag: str) -> None:
        self._check_tag(tag)
        async with self._locks.hold(vm_id):
            _pid, _task_dir, task = await self._running_task(vm_id)
            if tag in await snapshot_sizes(task.qmp_socket, task.image_path):
                await hmp(task.qmp_socket, f"delvm {tag}")

    # ------------------------------------------------------------------ reports

    async def status(self, vm_id: str) -> VMStatus:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return VMStatus("missing")
        return self._procs.status(vm_id)

    async def list_vms(self) -> dict[str, VMStatus]:
        self._procs.trimmer.ensure_running()  # the VMs a new driver found running are trimmed too
        found: dict[str, VMStatus] = {}
        try:
            entries = sorted(self.tasks_root.iterdir())
        except FileNotFoundError:
            return found
        for entry in entries:
            if VM_ID_RE.fullmatch(entry.name) and entry.is_dir():
                status = self._procs.status(entry.name)
                if status.state != "missing":
                    found[entry.name] = status
        return found

    async def logs(self, vm_id: str, max_bytes: int) -> str:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return ""
        if max_bytes <= 0:
            return ""
        data = await asyncio.to_thread(tail, self.tasks_root / vm_id / "serial.log", max_bytes)
        return data.decode("utf-8", errors="replace")

    async def health(self) -> dict[str, Any]:
        problems: list[str] = []
        report: dict[str, Any] = {"driver": self.name, "vms_root": str(self.vms_root), "run_as": self.run_as}
        try:
            path = self._qemu.path()
            report["qemu_binary"] = path
            version = await self._qemu.version()
            report["qemu_version"] = ".".join(map(str, version))
            accels = await run([path, "-accel", "help"])
            report["accelerators"] = [line.strip() for line in accels.splitlines()[1:] if line.strip()]
        except (DriverError, OSError, TimeoutError) as exc:
            problems.append(f"QEMU is not runnable: {exc}")
        kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        report["kvm_device"] = kvm
        report["accelerator_note"] = (
            "tcg works everywhere (slow: about 4 s to a shell for the tiny image); kvm needs a usable /dev/kvm"
            + (" - one is present, but nested KVM can hang: keep QEMU_ACCELERATOR=tcg unless a kvm VM"
               " was seen to boot here" if kvm else " and there is none here"))
        try:
            self.tasks_root.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.tasks_root / f".health-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            report["vms_root_writable"] = True
        except OSError as exc:
            report["vms_root_writable"] = False
            problems.append(f"VMS_ROOT {self.vms_root} is not writable: {exc.strerror or exc}")
        report["running"] = sum(1 for s in (await self.list_vms()).values() if s.state == "running")
        # Per-VM limits (drivers/local/cgroups.py): which cgroup version, or why QEMUs run without them.
        report["cgroups"] = confine.cgroup_problem or (f"v{cgroups.version()}" if self.run_as == PER_VM else "off")
        report["network"] = "outbound" if self.network is not None else f"none: {self.network_problem}"
        report["problems"] = problems
        report["ok"] = not problems
        return report

    def networks(self) -> tuple[str, ...]:
        return ("outbound", "none") if self.network is not None else ("none",)

    async def tidy(self) -> list[str]:
        """Network namespaces and links of VMs whose QEMU is gone (drivers/local/network.py ``sweep``), and
        the host's rules back if something removed them."""
        if self.network is None:
            return []
        if self._host_rules is not None:  # rules this driver made: put back if gone
            await self._host_rules_in_place()
        return await asyncio.to_thread(network.sweep, self.network, network.SWEEP_GRACE)

    def prepare_memory(self, ram_files: list[str]) -> None:
        """Make the sealed copies of the current warm layers' RAM files now, and drop those of replaced layers
        (memimage.py ``keep``). Blocking: the gateway calls it in a thread when it starts and every minute."""
        for path in ram_files:
            check_memory_file(path)
        self._memory.keep(ram_files)

    async def close(self) -> None:
        self._procs.close()
        self._memory.close()
