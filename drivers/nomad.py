"""The fleet driver: each VM is a Nomad job (``vm-<id>``) run by Nomad's built-in qemu task driver.

The gateway renders the job with ``JobSettings.target = "nomad"`` (a dynamic port ``vnc``, a Consul
service ``vmgate-vnc`` with a TCP check, ``-vnc ${NOMAD_IP_vnc}:${VMGATE_VNC_DISPLAY}``), and this
driver speaks to Nomad's HTTP API through python-nomad, which is synchronous: every call runs in a
thread (``asyncio.to_thread``) and every error it raises is mapped, here and only here, onto
``NomadUnavailable`` (Nomad cannot be reached or failed) or ``NomadRefused`` (Nomad answered no: a
bad job, a missing ACL capability).

    start    POST /v1/jobs {"Job": job} (an upsert by job ID: a retried create makes no second job) with a
             new VNC password in its args, then wait until the allocation's qemu task runs; on failure
             the job is purged
    stop     DELETE /v1/job/vm-<id> (no purge): Nomad stops the allocation with graceful_shutdown
             (ACPI) and kill_timeout; the overlay on shared storage is untouched, and start
             registers the stored job again, which places a new allocation on the same overlay
    destroy  stop, then DELETE /v1/job/vm-<id>?purge=true (a purge forgets allocations whose QEMU still runs)
    status   the job and its allocations, mapped by ``status_of`` (a pure function)
    logs     the allocation's stdout: the serial console (-serial stdio)

docs/DRIVERS.md ("The Nomad driver") has the details and the storage choice.

Over 400 lines: on purpose, this is the one module that speaks to Nomad (STYLE 8), its configuration,
the mapping of its errors and the reading of its answers included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import nomad  # python-nomad (the top-level nomad/ folder is operator HCL, not a package)
import requests
from nomad.api import exceptions as nomad_exc

from drivers.base import Driver, DriverConfigError, DriverError, JobInvalid, VMStatus, VncTarget
from jobspecs import vnc_password
from jobspecs.render import VNC_SERVICE

log = logging.getLogger(__name__)

T = TypeVar("T")

TASK_NAME = "qemu"
VNC_PORT_LABEL = "vnc"
REQUEST_TIMEOUT = 10  # seconds per HTTP request to Nomad
START_TIMEOUT = 180.0  # from registration until the qemu task runs (placement, then QEMU's start)
STOP_MARGIN = 30.0  # beyond the guest's timeout: Nomad's kill, the client's report back
POLL = 0.5
LIVE = ("pending", "running")  # allocation client statuses that still hold (or will hold) a QEMU


class NomadUnavailable(DriverError):
    """Nomad could not be reached, timed out, or failed (5xx); retrying later may work."""


class NomadRefused(DriverError):
    """Nomad answered and said no: a bad request (400), a missing ACL capability (403)."""


class NomadNotFound(DriverError):
    """Nomad has no such object (404); the driver turns this into ``missing`` or a no-op."""


def _response_text(resp: requests.Response) -> str:
    text = (resp.text or "").strip()
    return text[:500] or resp.reason or ""


def map_error(exc: BaseException, doing: str) -> DriverError:
    """The typed error for something python-nomad (or requests under it) raised while ``doing``."""
    if isinstance(exc, DriverError):
        return exc
    if isinstance(exc, nomad_exc.BaseNomadException):
        resp = exc.nomad_resp
        if isinstance(resp, requests.Response):
            status = resp.status_code
            text = _response_text(resp)
            if status == 404:
                return NomadNotFound(f"{doing}: not found ({text})")
            if status in (401, 403):
                return NomadRefused(f"{doing}: Nomad refused the request ({status} {text}); the gateway's "
                                    "NOMAD_TOKEN needs the policy in nomad/vmgate-gateway.acl.hcl")
            if 400 <= status < 500:
                return NomadRefused(f"{doing}: Nomad refused the request ({status}): {text}")
            return NomadUnavailable(f"{doing}: Nomad failed ({status}): {text}")
        # A connection error, TLS failure or timeout that python-nomad wrapped.
        return NomadUnavailable(f"{doing}: cannot reach Nomad: {_first_line(resp)}")
    if isinstance(exc, requests.RequestException | OSError):
        return NomadUnavailable(f"{doing}: cannot reach Nomad: {_first_line(exc)}")
    if isinstance(exc, ValueError):  # a body that is not JSON
        return NomadUnavailable(f"{doing}: Nomad sent an answer that is not JSON")
    return DriverError(f"{doing}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(value: Any) -> str:
    return (str(value).strip().splitlines() or [type(value).__name__])[0][:300]


# ---------------------------------------------------------------- pure mapping of Nomad's answers

def vnc_of(alloc: dict[str, Any]) -> VncTarget | None:
    """Where the allocation's ``vnc`` port is: ``AllocatedResources.Shared`` (Nomad >= 0.12), else the
    legacy ``Resources.Networks``."""
    shared = (alloc.get("AllocatedResources") or {}).get("Shared") or {}
    for port in shared.get("Ports") or []:
        if port.get("Label") == VNC_PORT_LABEL and port.get("Value"):
            return VncTarget(host=str(port.get("HostIP") or "127.0.0.1"), port=int(port["Value"]))
    networks = list(shared.get("Networks") or []) + list((alloc.get("Resources") or {}).get("Networks") or [])
    for network in networks:
        for port in list(network.get("DynamicPorts") or []) + list(network.get("ReservedPorts") or []):
            if port.get("Label") == VNC_PORT_LABEL and port.get("Value") and network.get("IP"):
                return VncTarget(host=str(network["IP"]), port=int(port["Value"]))
    return None


def has_vnc_port(job: dict[str, Any]) -> bool:
    """Whether the job asks Nomad for the ``vnc`` port (jobs rendered with target ``nomad`` do)."""
    for group in job.get("TaskGroups") or []:
        for network in group.get("Networks") or []:
            ports = list(network.get("DynamicPorts") or []) + list(network.get("ReservedPorts") or [])
            if any(port.get("Label") == VNC_PORT_LABEL for port in ports):
                return True
    return False


def _task_state(alloc: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = (alloc.get("TaskStates") or {}).get(TASK_NAME) or {}
    return state


def last_event(alloc: dict[str, Any]) -> str | None:
    """The newest task event worth showing a user ("Driver Failure: ...", "Terminated: exit code 1"), with
    the failure before it when Nomad's last word is only that it gives up ("Not Restarting")."""
    shown: list[str] = []
    for event in reversed(_task_state(alloc).get("Events") or []):
        kind = event.get("Type") or ""
        message = event.get("DisplayMessage") or event.get("DriverError") or event.get("Message") or ""
        if kind in ("Received", "Task Setup", "Started", "Killing", "Killed", "Restart Signaled", "Restarting",
                    "Alloc Unhealthy"):  # "Unhealthy because of failed task": the failure before it says which
            continue
        shown.append(f"{kind}: {message}".strip(": ") if message else kind)
        if kind != "Not Restarting" or len(shown) == 2:
            break
    return "; ".join(reversed(shown)) or None


def current_alloc(allocs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The allocation that is (or will be) the VM: the newest one Nomad wants running, else the newest."""
    if not allocs:
        return None
    by_age = sorted(allocs, key=lambda a: (a.get("CreateIndex") or 0, a.get("ModifyIndex") or 0))
    wanted = [a for a in by_age if a.get("DesiredStatus") == "run" and a.get("ClientStatus") in LIVE]
    return wanted[-1] if wanted else by_age[-1]


def status_of(job: dict[str, Any] | None, allocs: list[dict[str, Any]],
              detail: dict[str, Any] | None = None) -> VMStatus:
    """Map a job (None: Nomad has none) and its allocations onto vmgate's actual states.

    ``detail`` is the full allocation of ``current_alloc`` (the list stubs carry no ports).
    running: the newest wanted allocation runs its qemu task; stopped: the job was stopped
    (``how: stopped``), is waiting for a placement or a start (``how: pending``), or its allocation
    ended (``how: failed`` / ``complete`` / ``lost``, with Nomad's last task event as the reason);
    missing: no job.
    """
    if job is None:
        return VMStatus("missing")
    alloc = current_alloc(allocs)
    details: dict[str, Any] = {"job_status": job.get("Status"), "job_version": job.get("Version")}
    if alloc is not None:
        details.update(alloc_id=alloc.get("ID"), node=alloc.get("NodeName") or alloc.get("NodeID"),
                       client_status=alloc.get("ClientStatus"))
    if job.get("Stop"):
        running = alloc is not None and alloc.get("ClientStatus") == "running"
        details["how"] = "stopping" if running else "stopped"
        return VMStatus("stopped", reason="stopped in Nomad", details=details)
    if alloc is None:
        details["how"] = "pending"
        return VMStatus("stopped", reason="Nomad has not placed the VM yet", details=details)
    client_status = alloc.get("ClientStatus")
    if client_status == "running" and _task_state(alloc).get("State") == "running":
        source = detail if detail is not None and detail.get("ID") == alloc.get("ID") else alloc
        vnc = vnc_of(source)
        # websockify takes the VM's healthy instance in Consul, if it is this allocation at this address, and
        # answers the start's VNC password (jobspecs/vnc_password.py).
        if vnc is not None:
            vnc = dataclasses.replace(vnc, consul_service=VNC_SERVICE, alloc_id=str(alloc.get("ID") or "") or None,
                                      password=vnc_password.password_of(job))
        return VMStatus("running", vnc=vnc, details=details)
    event = last_event(alloc)
    if client_status in LIVE:
        details["how"] = "pending"
        return VMStatus("stopped", reason=event or "waiting for Nomad to start the VM", details=details)
    details["how"] = client_status or "gone"
    return VMStatus("stopped", reason=event or f"the allocation is {client_status}", details=details)


# ---------------------------------------------------------------- the driver

@dataclasses.dataclass(frozen=True)
class NomadConfig:
    """Where the Nomad driver finds Nomad and how it proves who it is (the gateway's NOMAD_* settings)."""

    addr: str = "http://127.0.0.1:4646"  # NOMAD_ADDR
    token: str = ""  # NOMAD_TOKEN: the gateway's ACL token; empty without ACLs
    namespace: str = "default"  # NOMAD_NAMESPACE of the VM jobs
    cacert: Path | None = None  # NOMAD_CACERT: the CA bundle of Nomad's certificate; None: the system's
    client_cert: Path | None = None  # NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY: mutual TLS, both or neither
    client_key: Path | None = None
    outbound: bool = False  # NOMAD_OUTBOUND and VM_NETWORK=outbound: VMs may be outbound (jobspecs/fleet.py)


class NomadDriver(Driver):
    """Runs each VM as the Nomad job ``vm-<id>``; ``client`` replaces python-nomad's (tests)."""

    name = "nomad"
    manages_restarts = True

    def __init__(self, config: NomadConfig, client: Any | None = None) -> None:
        self.namespace = config.namespace
        self.addr = config.addr
        self.outbound = config.outbound
        self.network_problem = None if self.outbound else "fleet nodes give VMs none (NOMAD_OUTBOUND=false)"
        if bool(config.client_cert) != bool(config.client_key):
            raise DriverConfigError("NOMAD_CLIENT_KEY", "NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY go together")
        cert = (str(config.client_cert), str(config.client_key)) if config.client_cert else ()
        # verify: the CA bundle if one is configured, else the system's; never off.
        verify: Any = str(config.cacert) if config.cacert else True
        self.client = client if client is not None else nomad.Nomad(
            address=config.addr, token=config.token or None, namespace=self.namespace,
            verify=verify, cert=cert, timeout=REQUEST_TIMEOUT)

    def __repr__(self) -> str:
        return f"NomadDriver({self.addr!r}, namespace={self.namespace!r})"

    async def _call(self, doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:  # mapped to exactly one typed error
            raise map_error(exc, doing) from exc

    async def wait_for_change(self, index: int, wait: float) -> int | None:
        """A Nomad blocking query on the namespace's allocations: returns when Nomad's allocation index
        moves past ``index`` (an allocation placed, started, restarted, lost...) or after ``wait`` s."""
        def query() -> int:
            response = self.client.allocations.request(
                method="get", params={"index": index, "wait": f"{max(1, int(wait))}s", "namespace": self.namespace},
                timeout=wait + REQUEST_TIMEOUT)
            # An empty table has index 0, and a query at index 0 never blocks: start from 1 at least.
            return max(1, int(response.headers.get("X-Nomad-Index", index)))

        return await self._call("watching Nomad's allocations", query)

    @staticmethod
    def job_id(vm_id: str) -> str:
        return f"vm-{vm_id}"

    async def _job(self, vm_id: str) -> dict[str, Any] | None:
        try:
            job: dict[str, Any] = await self._call(f"reading job vm-{vm_id}", self.client.job.get_job,
                                                   self.job_id(vm_id), namespace=self.namespace)
        except NomadNotFound:
            return None
        return job

    async def _allocs(self, vm_id: str) -> list[dict[str, Any]]:
        try:
            allocs: list[dict[str, Any]] = await self._call(
                f"listing allocations of vm-{vm_id}", self.client.job.get_allocations, self.job_id(vm_id),
                namespace=self.namespace)
        except NomadNotFound:
            return []
        return allocs or []

    async def _status(self, vm_id: str) -> tuple[VMStatus, list[dict[str, Any]]]:
        job = await self._job(vm_id)
        allocs = await self._allocs(vm_id) if job is not None else []
        detail = None
        alloc = current_alloc(allocs)
        if job is not None and alloc is not None and alloc.get("ClientStatus") == "running":
            detail = await self._call(f"reading allocation {alloc.get('ID')}", self.client.allocation.get_allocation,
                                      alloc["ID"])
        return status_of(job, allocs, detail), allocs

    async def status(self, vm_id: str) -> VMStatus:
        status, _ = await self._status(vm_id)
        return status

    async def start(self, vm_id: str, job: dict[str, Any]) -> VMStatus:
        if not isinstance(job, dict) or job.get("ID") != self.job_id(vm_id):
            raise JobInvalid(f"job ID {job.get('ID') if isinstance(job, dict) else None!r} does not belong to "
                             f"VM {vm_id!r} (expected 'vm-{vm_id}')")
        if not has_vnc_port(job):
            raise JobInvalid(f"job vm-{vm_id} has no '{VNC_PORT_LABEL}' network port: it was rendered for the local "
                             "driver; render it again with VMGATE_DRIVER=nomad (target nomad)")
        if (job.get("Meta") or {}).get("network") == "outbound" and not self.outbound:
            raise JobInvalid(f"fleet nodes give VMs no outbound network: {self.network_problem}")
        status, _ = await self._status(vm_id)
        if status.state == "running" and status.vnc is not None:
            return status
        try:  # a new VNC password for every start: VNC listens on the node's network
            job = vnc_password.with_password(job, vnc_password.new_password())
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise JobInvalid(f"job vm-{vm_id} has no qemu task with a -vnc argument ({exc})") from None
        answer = await self._call(f"registering job vm-{vm_id}", self.client.jobs.register_job, {"Job": job})
        try:
            return await self._wait_running(vm_id, (answer or {}).get("EvalID"))
        except BaseException:
            # Partial work goes: no job left behind half-started. The overlay is not Nomad's.
            try:
                await self.destroy(vm_id)
            except DriverError as exc:
                log.warning("cleaning up the failed start of vm-%s: %s", vm_id, exc)
            raise

    async def _placement_failure(self, eval_id: str | None) -> str | None:
        """Why Nomad could not place the job, if its evaluation says so."""
        if not eval_id:
            return None
        evaluation = await self._call(f"reading evaluation {eval_id}", self.client.evaluation.get_evaluation,
                                      eval_id)
        failed = (evaluation or {}).get("FailedTGAllocs") or {}
        for group, metric in failed.items():
            reasons = dict(metric.get("ConstraintFiltered") or {}) | dict(metric.get("DimensionExhausted") or {})
            drivers = ", ".join(f"{k} ({v})" for k, v in reasons.items()) or "no node fits"
            return f"Nomad cannot place group {group!r}: {drivers}; nodes evaluated: {metric.get('NodesEvaluated')}"
        return None

    async def _wait_running(self, vm_id: str, eval_id: str | None) -> VMStatus:
        began = time.monotonic()
        deadline = began + START_TIMEOUT
        checked_eval = False
        while True:
            status, allocs = await self._status(vm_id)
            if status.state == "running" and status.vnc is not None:
                return status
            if status.state == "running":
                raise DriverError(f"vm-{vm_id} runs but its allocation has no '{VNC_PORT_LABEL}' port")
            alloc = current_alloc(allocs)
            if alloc is not None:
                event = last_event(alloc) or ""
                if alloc.get("ClientStatus") in ("failed", "lost") or event.startswith(("Driver Failure",
                                                                                       "Failed Validation")):
                    raise DriverError(f"Nomad could not start vm-{vm_id}: {event or alloc.get('ClientStatus')}")
            elif not checked_eval and time.monotonic() - began > 5:
                # No allocation after a few seconds: the evaluation says whether no node fits.
                checked_eval = True
                failure = await self._placement_failure(eval_id)
                if failure:
                    raise DriverError(failure)
            if time.monotonic() > deadline:
                raise DriverError(f"vm-{vm_id} did not start within {START_TIMEOUT:.0f} s "
                                  f"({status.reason or status.details.get('how')})")
            await asyncio.sleep(POLL)

    async def _deregister(self, vm_id: str, *, purge: bool) -> bool:
        """Stop (and with ``purge`` forget) the job; False if Nomad had none."""
        try:
            await self._call(f"stopping job vm-{vm_id}", self.client.job.deregister_job, self.job_id(vm_id),
                             namespace=self.namespace, purge=purge or None)
        except NomadNotFound:
            return False
        return True

    async def _stop_job(self, vm_id: str, timeout: float) -> None:
        """Deregister the job (no purge) and wait until none of its allocations runs a QEMU any more."""
        if not await self._deregister(vm_id, purge=False):
            return
        deadline = time.monotonic() + timeout
        while True:
            live = [a for a in await self._allocs(vm_id) if a.get("ClientStatus") in LIVE]
            if not live:
                return
            if time.monotonic() > deadline:
                raise DriverError(f"vm-{vm_id}: Nomad still reports allocation {live[0].get('ID')} as "
                                  f"{live[0].get('ClientStatus')} after {timeout:.0f} s")
            await asyncio.sleep(POLL)

    async def stop(self, vm_id: str, timeout: float) -> None:
        # The job carries the timeout (kill_timeout = STOP_TIMEOUT): Nomad presses the ACPI button
        # (graceful_shutdown) and kills QEMU after it.
        await self._stop_job(vm_id, timeout=timeout + STOP_MARGIN)

    async def destroy(self, vm_id: str) -> None:
        # Stop first, purge after: a purge removes the allocations from Nomad's state at once while
        # their QEMU still runs, and the gateway removes the overlay as soon as this returns.
        # Nomad has no "stop hard": the allocation still gets kill_timeout to power off.
        job = await self._job(vm_id) or {}
        tasks = [task for group in job.get("TaskGroups") or [] for task in group.get("Tasks") or []]
        kill = max(((task.get("KillTimeout") or 0) / 1e9 for task in tasks), default=0.0)
        await self._stop_job(vm_id, timeout=kill + STOP_MARGIN)
        await self._deregister(vm_id, purge=True)

    async def list_vms(self) -> dict[str, VMStatus]:
        jobs = await self._call("listing jobs", self.client.jobs.get_jobs, prefix="vm-", namespace=self.namespace)
        result: dict[str, VMStatus] = {}
        for job in jobs or []:
            job_id = str(job.get("ID") or "")
            if job_id.startswith("vm-"):
                result[job_id[3:]] = await self.status(job_id[3:])
        return result

    async def logs(self, vm_id: str, max_bytes: int) -> str:
        alloc = current_alloc(await self._allocs(vm_id))
        if alloc is None or max_bytes <= 0:
            return ""
        try:
            text: str = await self._call(f"reading the console log of vm-{vm_id}",
                                         self.client.client.stream_logs.stream, alloc["ID"], TASK_NAME, "stdout",
                                         origin="end", offset=max_bytes, plain=True)
        except NomadNotFound:
            return ""
        data = text.encode(errors="replace")[-max_bytes:]
        return data.decode(errors="replace")

    async def health(self) -> dict[str, Any]:
        try:
            leader = await self._call("asking Nomad for its leader", self.client.status.leader.get_leader)
        except DriverError as exc:
            return {"ok": False, "driver": self.name, "nomad_addr": self.addr, "error": str(exc)}
        network = "outbound" if self.outbound else f"none: {self.network_problem}"
        return {"ok": bool(leader), "driver": self.name, "nomad_addr": self.addr, "leader": leader,
                "namespace": self.namespace, "network": network}

    def networks(self) -> tuple[str, ...]:
        return ("outbound", "none") if self.outbound else ("none",)
