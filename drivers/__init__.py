"""Drivers turn rendered Nomad jobs into running VMs; ``load_driver`` picks one from the settings.

The contract is ``drivers.base.Driver``; ``drivers.local`` runs QEMU on this host (the default),
``drivers.nomad`` runs each VM as a job on a Nomad cluster (the fleet), ``drivers.fake`` keeps VMs
in memory for tests.
"""

from __future__ import annotations

from typing import Any

from drivers.base import Driver, DriverError, JobInvalid, VMStatus, VncTarget


def load_driver(settings: Any) -> Driver:
    """The driver VMGATE_DRIVER names, built from ``settings`` (gateway.config.Settings).

    Raises ``gateway.config.ConfigError`` (naming VMGATE_DRIVER) for a driver that cannot be used,
    and ``TypeError`` if what was built is not a ``Driver``.
    """
    from gateway.config import ConfigError

    kind = settings.driver
    driver: Any
    if kind == "local":
        from drivers.local import LocalDriver

        driver = LocalDriver(settings.vms_root, settings.qemu_binary)
    elif kind == "fake":
        from drivers.fake import FakeDriver

        driver = FakeDriver()
    elif kind == "nomad":
        from drivers.nomad import NomadDriver

        driver = NomadDriver(settings)
    else:
        raise ConfigError("VMGATE_DRIVER", f"unknown driver {kind!r}; expected local or nomad")
    if not isinstance(driver, Driver):
        raise TypeError(f"{type(driver).__name__} does not implement drivers.base.Driver")
    return driver


__all__ = ["Driver", "DriverError", "JobInvalid", "VMStatus", "VncTarget", "load_driver"]
