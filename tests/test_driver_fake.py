"""FakeDriver beyond the contract (its test knobs: failing starts, crashes, the serial console, health), and
the loader. The contract itself is checked against every driver in tests/test_driver_contract.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivers import load_driver
from drivers.base import DriverConfigError, DriverError
from drivers.fake import FakeDriver
from drivers.local import LocalDriver
from drivers.nomad import NomadConfig, NomadDriver
from gateway.config import ConfigError, Settings
from gateway.web.app import driver_from_settings
from tests.test_driver_contract import fake_job

JobFactory = Callable[[str], dict[str, Any]]
__all__ = ["fake_job"]  # the fixture, imported for the tests below


# ---------------------------------------------------------------- FakeDriver's own knobs

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
