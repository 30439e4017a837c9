"""The driver contract (drivers/base.py), one set of checks run against every driver: the fake (in memory),
the local driver (real QEMU under TCG, the real tiny image; marker ``qemu``) and the Nomad driver (real
``nomad agent -dev`` and ``consul agent -dev``, started by tests/test_fleet_integration.py's fixtures; skipped,
saying why, when they are not on PATH).

What each driver does beyond the contract is tested beside it: tests/test_driver_fake.py (the fake's knobs,
the loader), tests/test_driver_local.py (booting, typing, re-adoption...), tests/test_fleet.py and
tests/test_fleet_integration.py (Nomad). The local params start QEMU but never wait for the guest to boot.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Driver, DriverError, JobInvalid, VMStatus
from drivers.fake import FakeDriver
from drivers.local import LocalDriver
from drivers.nomad import NomadConfig, NomadDriver
from jobspecs import DEFAULT_CATALOG, JobSettings, Template, VMSpec, load_catalog, render_job
from tests.fixtures.qemu import destroy_all, qemu_pids_under, zombie_children
from tests.test_fleet_integration import (
    AS_AGENT,
    MISSING,
    SKIP_REASON,
    Agent,
    agent_dir,
    consul_agent,
    node_rules,
    nomad_agent,
)

__all__ = ["agent_dir", "consul_agent", "node_rules", "nomad_agent"]  # fixtures, imported for the Nomad params

JobFactory = Callable[[str], dict[str, Any]]


def _task(job: dict[str, Any]) -> dict[str, Any]:
    task: dict[str, Any] = job["TaskGroups"][0]["Tasks"][0]
    return task


def bad_jobs(vm_id: str, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Jobs the fake and the local driver refuse with JobInvalid before anything runs."""
    wrong_driver = copy.deepcopy(job)
    _task(wrong_driver)["Driver"] = "docker"
    unknown_var = copy.deepcopy(job)
    _task(unknown_var)["Config"]["args"] += ["-name", "${NOMAD_SECRET_TOKEN}"]
    other_vm = copy.deepcopy(job)
    other_vm["ID"] = other_vm["Name"] = "vm-someone-else"
    low_memory = copy.deepcopy(job)
    _task(low_memory)["Resources"]["MemoryMB"] = 64
    no_qmp = copy.deepcopy(job)
    args = _task(no_qmp)["Config"]["args"]
    del args[args.index("-qmp"):args.index("-qmp") + 2]
    public_vnc = copy.deepcopy(job)
    args = _task(public_vnc)["Config"]["args"]
    args[args.index("-vnc") + 1] = ":0"
    return {"wrong driver": wrong_driver, "unknown interpolation": unknown_var, "job of another VM": other_vm,
            "memory below Nomad's minimum": low_memory, "no QMP socket": no_qmp, "VNC on every interface": public_vnc}


def with_bad_option(job: dict[str, Any]) -> dict[str, Any]:
    """The job with an argument QEMU (and Nomad's args_allowlist) refuses: its start fails."""
    broken = copy.deepcopy(job)
    _task(broken)["Config"]["args"] += ["-no-such-option"]
    return broken


@dataclass
class Case:
    """One driver under the contract, and what the checks need to know of it."""

    driver: Driver
    job: JobFactory  # a runnable job for a VM id
    bad_jobs: Callable[[str, dict[str, Any]], dict[str, dict[str, Any]]]  # jobs it refuses with JobInvalid
    failing: Callable[[dict[str, Any]], dict[str, Any]]  # makes the next start of this job fail ("no-such-option")
    identity: Callable[[VMStatus], Any]  # what tells one run of a VM from another (pid, allocation)
    processes: Callable[[], list[Any]]  # what still runs of its VMs (none once all are stopped)
    files: Callable[[str], list[Path]]  # what is left on disk of a VM the driver forgot
    keeps_failed: bool  # a failed start of a stopped VM leaves it stopped, the failure as its reason
    counts_running: bool  # health() reports "running"


# ---------------------------------------------------------------- the drivers

@pytest.fixture
def fake_job(tmp_path: Path) -> JobFactory:
    """Jobs of tiny VMs for drivers that never open the files (the catalog on an empty images dir)."""
    template = load_catalog(DEFAULT_CATALOG, tmp_path)["tiny"]

    def make(vm_id: str) -> dict[str, Any]:
        vm = VMSpec.for_template(template, id=vm_id, owner="7", overlay_path=tmp_path / f"{vm_id}.qcow2")
        return render_job(vm, template, JobSettings())

    return make


def _fake(request: pytest.FixtureRequest) -> Case:
    driver = FakeDriver()

    def failing(job: dict[str, Any]) -> dict[str, Any]:
        driver.fail_next_start = "QEMU refused: -no-such-option"
        return job

    return Case(driver, request.getfixturevalue("fake_job"), bad_jobs, failing, identity=lambda s: s.pid,
                processes=lambda: [vm_id for vm_id, vm in driver.vms.items() if vm.pid is not None],
                files=lambda vm_id: [], keeps_failed=True, counts_running=True)


def _local(request: pytest.FixtureRequest) -> Case:
    driver: LocalDriver = request.getfixturevalue("local_driver")
    make_overlay = request.getfixturevalue("make_overlay")
    render_tiny = request.getfixturevalue("render_tiny")
    vms_root: Path = request.getfixturevalue("vms_root")

    def job(vm_id: str) -> dict[str, Any]:
        job: dict[str, Any] = render_tiny(vm_id, make_overlay(vm_id))
        return job

    return Case(driver, job, bad_jobs, with_bad_option, identity=lambda s: s.pid,
                processes=lambda: [*qemu_pids_under(vms_root), *zombie_children()],
                files=lambda vm_id: [d for d in (driver.task_dir(vm_id),) if d.exists()],
                keeps_failed=True, counts_running=True)


@pytest.fixture
async def nomad_driver(nomad_agent: Agent) -> AsyncIterator[NomadDriver]:
    driver = NomadDriver(NomadConfig(addr=nomad_agent.http))
    yield driver
    await destroy_all(driver)


def _nomad(request: pytest.FixtureRequest) -> Case:
    driver: NomadDriver = request.getfixturevalue("nomad_driver")
    make_overlay = request.getfixturevalue("make_overlay")
    template: Template = request.getfixturevalue("tiny_template")
    vms_root: Path = request.getfixturevalue("vms_root")

    def render(vm_id: str, target: str) -> dict[str, Any]:
        vm = VMSpec.for_template(template, id=vm_id, owner="test", overlay_path=make_overlay(vm_id))
        # The agent's own user runs the task (tests/test_fleet_integration.py's AS_AGENT says why).
        return render_job(vm, template, JobSettings(stop_timeout=30, target=target, task_user=AS_AGENT))

    def refused(vm_id: str, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
        # What the Nomad driver checks itself; the rest of a job is Nomad's to judge, once registered.
        return {"job of another VM": bad_jobs(vm_id, job)["job of another VM"],
                "rendered for the local driver (no vnc port)": render(vm_id, "local")}

    return Case(driver, lambda vm_id: render(vm_id, "nomad"), refused, with_bad_option,
                identity=lambda s: s.details.get("alloc_id"), processes=lambda: qemu_pids_under(vms_root),
                files=lambda vm_id: [], keeps_failed=False, counts_running=False)


DRIVERS = [
    pytest.param(_fake, id="fake"),
    pytest.param(_local, id="local", marks=pytest.mark.qemu),
    pytest.param(_nomad, id="nomad", marks=[pytest.mark.qemu, pytest.mark.skipif(bool(MISSING), reason=SKIP_REASON)]),
]


@pytest.fixture(params=DRIVERS)
def case(request: pytest.FixtureRequest) -> Case:
    build: Callable[[pytest.FixtureRequest], Case] = request.param
    return build(request)


# ---------------------------------------------------------------- the contract

async def test_start_stop_destroy_are_idempotent(case: Case) -> None:
    """start twice -> one VM; stop twice -> fine; destroy twice -> fine; unknown VMs are no-ops."""
    driver, vm_id = case.driver, "idem"
    job = case.job(vm_id)
    first = await driver.start(vm_id, job)
    assert first.state == "running" and case.identity(first) and first.vnc is not None
    second = await driver.start(vm_id, job)
    assert second.state == "running" and case.identity(second) == case.identity(first)
    listed = await driver.list_vms()
    assert listed[vm_id].state == "running" and case.identity(listed[vm_id]) == case.identity(first)

    await driver.stop(vm_id, 1)
    stopped = await driver.status(vm_id)
    assert stopped.state == "stopped" and stopped.pid is None and stopped.reason
    await driver.stop(vm_id, 1)
    assert (await driver.status(vm_id)).state == "stopped"
    assert (await driver.list_vms())[vm_id].state == "stopped"

    again = await driver.start(vm_id, job)  # a stopped VM starts again
    assert again.state == "running"
    await driver.destroy(vm_id)
    assert (await driver.status(vm_id)).state == "missing"
    assert vm_id not in await driver.list_vms()
    await driver.destroy(vm_id)

    await driver.stop("never-seen", 1)
    await driver.destroy("never-seen")
    assert (await driver.status("never-seen")).state == "missing"
    assert await driver.logs("never-seen", 1000) == ""
    assert (await driver.status("../../etc")).state == "missing"
    assert case.processes() == [] and case.files(vm_id) == []


async def test_refused_jobs_leave_no_vm(case: Case) -> None:
    """Refused jobs leave no VM behind (and nothing of one on disk)."""
    driver, vm_id = case.driver, "refused"
    job = case.job(vm_id)
    for problem, bad in case.bad_jobs(vm_id, job).items():
        with pytest.raises(JobInvalid):
            await driver.start(vm_id, bad)
        assert (await driver.status(vm_id)).state == "missing", problem
    with pytest.raises(JobInvalid):
        await driver.start("../escape", job)
    assert vm_id not in await driver.list_vms()
    assert case.files(vm_id) == [] and case.processes() == []


async def test_logs_and_health(case: Case) -> None:
    driver, vm_id = case.driver, "logs"
    await driver.start(vm_id, case.job(vm_id))
    assert len((await driver.logs(vm_id, 10)).encode()) <= 10
    assert await driver.logs(vm_id, 0) == ""
    health = await driver.health()
    assert health["ok"] is True
    if case.counts_running:
        assert health["running"] >= 1
    await driver.destroy(vm_id)
    assert case.processes() == []


async def test_a_failed_start_leaves_nothing(case: Case) -> None:
    """A start that fails raises DriverError and leaves nothing running; a VM that never ran stays missing."""
    driver, vm_id = case.driver, "fails"
    job = case.job(vm_id)
    with pytest.raises(DriverError, match="no-such-option"):
        await driver.start(vm_id, case.failing(job))
    assert (await driver.status(vm_id)).state == "missing"
    assert vm_id not in await driver.list_vms()
    assert case.processes() == [] and case.files(vm_id) == []

    await driver.start(vm_id, job)  # the driver is not left unable to start it
    await driver.stop(vm_id, 0)
    with pytest.raises(DriverError, match="no-such-option"):
        await driver.start(vm_id, case.failing(job))
    failed = await driver.status(vm_id)
    assert failed.state != "running" and case.processes() == []
    if case.keeps_failed:
        assert failed.state == "stopped" and "no-such-option" in (failed.reason or "")
    await driver.destroy(vm_id)
