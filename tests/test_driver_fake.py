"""The driver contract (drivers/base.py), checked against FakeDriver here and against LocalDriver with real
QEMU in test_driver_local.py (which imports the ``contract_*`` checks below), plus the loader."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivers import load_driver
from drivers.base import Driver, DriverConfigError, DriverError, JobInvalid
from drivers.fake import FakeDriver
from drivers.local import LocalDriver
from drivers.nomad import NomadConfig, NomadDriver
from gateway.app import driver_from_settings
from gateway.config import ConfigError, Settings
from jobspecs import DEFAULT_CATALOG, JobSettings, VMSpec, load_catalog, render_job

JobFactory = Callable[[str], dict[str, Any]]


def _task(job: dict[str, Any]) -> dict[str, Any]:
    task: dict[str, Any] = job["TaskGroups"][0]["Tasks"][0]
    return task


def bad_jobs(vm_id: str, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Jobs every driver must refuse with JobInvalid before anything runs."""
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


async def contract_idempotency(driver: Driver, vm_id: str, job: dict[str, Any]) -> None:
    """start twice -> one VM; stop twice -> fine; destroy twice -> fine; unknown VMs are no-ops."""
    first = await driver.start(vm_id, job)
    assert first.state == "running" and first.pid and first.vnc is not None
    second = await driver.start(vm_id, job)
    assert second.state == "running" and second.pid == first.pid
    listed = await driver.list_vms()
    assert listed[vm_id].state == "running" and listed[vm_id].pid == first.pid

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


async def contract_bad_jobs(driver: Driver, vm_id: str, job: dict[str, Any]) -> None:
    """Refused jobs leave no VM behind (and a refused start of a stopped VM keeps it stopped)."""
    for problem, bad in bad_jobs(vm_id, job).items():
        with pytest.raises(JobInvalid):
            await driver.start(vm_id, bad)
        assert (await driver.status(vm_id)).state == "missing", problem
    with pytest.raises(JobInvalid):
        await driver.start("../escape", job)
    assert vm_id not in await driver.list_vms()


async def contract_logs_and_health(driver: Driver, vm_id: str, job: dict[str, Any]) -> None:
    await driver.start(vm_id, job)
    assert len((await driver.logs(vm_id, 10)).encode()) <= 10
    assert await driver.logs(vm_id, 0) == ""
    health = await driver.health()
    assert health["ok"] is True and health["running"] >= 1
    await driver.destroy(vm_id)


# ---------------------------------------------------------------- FakeDriver

@pytest.fixture
def fake_job(tmp_path: Path) -> JobFactory:
    template = load_catalog(DEFAULT_CATALOG, tmp_path)["tiny"]

    def make(vm_id: str) -> dict[str, Any]:
        vm = VMSpec.for_template(template, id=vm_id, owner="7", overlay_path=tmp_path / f"{vm_id}.qcow2")
        return render_job(vm, template, JobSettings())

    return make


async def test_fake_idempotency(fake_job: JobFactory) -> None:
    await contract_idempotency(FakeDriver(), "a1", fake_job("a1"))


async def test_fake_bad_jobs(fake_job: JobFactory) -> None:
    await contract_bad_jobs(FakeDriver(), "b1", fake_job("b1"))


async def test_fake_logs_and_health(fake_job: JobFactory) -> None:
    await contract_logs_and_health(FakeDriver(), "c1", fake_job("c1"))


async def test_fake_reports_acpi_stops_and_vnc(fake_job: JobFactory) -> None:
    driver = FakeDriver()
    status = await driver.start("d1", fake_job("d1"))
    assert status.vnc is not None and status.vnc.unix_socket == "/run/vmgate-fake/tasks/d1/vnc.sock"
    assert "vmgate-tiny: ready" in await driver.logs("d1", 1000)
    await driver.stop("d1", 30)
    stopped = await driver.status("d1")
    assert stopped.details["how"] == "acpi" and "ACPI" in (stopped.reason or "")
    assert driver.calls == [("start", "d1"), ("stop", "d1")]


async def test_fake_fail_next_start(fake_job: JobFactory) -> None:
    driver = FakeDriver()
    driver.fail_next_start = "QEMU refused: -bogus"
    with pytest.raises(DriverError, match="-bogus"):
        await driver.start("e1", fake_job("e1"))
    assert (await driver.status("e1")).state == "missing"
    assert driver.fail_next_start is None
    await driver.start("e1", fake_job("e1"))
    await driver.stop("e1", 1)
    driver.fail_next_start = "again"
    with pytest.raises(DriverError):
        await driver.start("e1", fake_job("e1"))
    failed = await driver.status("e1")
    assert failed.state == "stopped" and failed.reason == "start failed: again"


async def test_fake_crash_and_health(fake_job: JobFactory) -> None:
    driver = FakeDriver()
    await driver.start("f1", fake_job("f1"))
    driver.crash("f1", returncode=1)
    crashed = await driver.status("f1")
    assert crashed.state == "stopped" and crashed.details["returncode"] == 1
    driver.write_serial("f1", "panic\n")
    assert (await driver.logs("f1", 100)).endswith("panic\n")
    driver.healthy = False
    assert (await driver.health())["ok"] is False


# ---------------------------------------------------------------- the loader

def test_load_driver(tmp_path: Path) -> None:
    local = load_driver("local", vms_root=tmp_path, qemu_binary="qemu-system-x86_64")
    assert isinstance(local, LocalDriver) and local.vms_root == tmp_path
    assert isinstance(load_driver("fake", vms_root=tmp_path), FakeDriver)
    nomad = NomadConfig(addr="http://127.0.0.1:4646", namespace="vms")
    assert type(load_driver("nomad", vms_root=tmp_path, nomad=nomad)).__name__ == "NomadDriver"  # no Nomad contacted
    with pytest.raises(DriverConfigError, match="unknown driver"):
        load_driver("xen", vms_root=tmp_path)
    with pytest.raises(DriverConfigError, match="NOMAD_CLIENT_KEY"):
        load_driver("nomad", vms_root=tmp_path, nomad=NomadConfig(client_cert=tmp_path / "cert.pem"))


def test_the_gateway_builds_the_driver_from_its_settings(base_settings: Settings, tmp_path: Path) -> None:
    """The gateway's side of the loader: Settings in, a driver out, a driver's config problem as a ConfigError."""
    local = driver_from_settings(dataclasses.replace(base_settings, driver="local", vms_root=tmp_path))
    assert isinstance(local, LocalDriver) and local.vms_root == tmp_path
    fleet = driver_from_settings(dataclasses.replace(base_settings, driver="nomad", nomad_addr="http://10.0.0.9:4646",
                                                     nomad_namespace="vms"))
    assert isinstance(fleet, NomadDriver) and (fleet.addr, fleet.namespace) == ("http://10.0.0.9:4646", "vms")
    half_tls = dataclasses.replace(base_settings, driver="nomad", nomad_client_cert=tmp_path / "cert.pem",
                                   nomad_client_key=None)
    with pytest.raises(ConfigError, match="NOMAD_CLIENT_KEY") as caught:
        driver_from_settings(half_tls)
    assert caught.value.key == "NOMAD_CLIENT_KEY"
