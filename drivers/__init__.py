"""Drivers turn rendered Nomad jobs into running VMs; ``load_driver`` builds one by name.

The contract is ``drivers.base.Driver``; ``drivers.local`` runs QEMU on this host (the default),
``drivers.nomad`` runs each VM as a job on a Nomad cluster (the fleet), ``drivers.fake`` keeps VMs
in memory for tests. Drivers take their own small configuration (plain arguments, ``NomadConfig``)
and never read the gateway's settings: the gateway builds these from its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.base import Driver, DriverConfigError, DriverError, JobInvalid, VMStatus, VncTarget

if TYPE_CHECKING:
    from drivers.local.network import NetworkConfig
    from drivers.nomad import NomadConfig


def load_driver(kind: str, *, vms_root: Path, qemu_binary: str = "qemu-system-x86_64",
                nomad: NomadConfig | None = None, networks: NetworkConfig | None = None) -> Driver:
    """The driver ``kind`` names (local, nomad or fake), built from the arguments it uses.

    ``vms_root`` and ``qemu_binary`` are the local driver's, ``nomad`` the Nomad driver's (required for
    it), ``networks`` the local driver's VM networks (None: VMs get none). Raises ``DriverConfigError`` for
    a driver that cannot be built from these, and ``TypeError`` if what was built is not a ``Driver``.
    """
    driver: Any
    if kind == "local":
        from drivers.local import LocalDriver

        driver = LocalDriver(vms_root, qemu_binary, networks=networks)
    elif kind == "fake":
        from drivers.fake import FakeDriver

        driver = FakeDriver()
    elif kind == "nomad":
        from drivers.nomad import NomadDriver

        if nomad is None:
            raise DriverConfigError("VMGATE_DRIVER", "the nomad driver needs its NomadConfig (NOMAD_ADDR...)")
        driver = NomadDriver(nomad)
    else:
        raise DriverConfigError("VMGATE_DRIVER", f"unknown driver {kind!r}; expected local or nomad")
    if not isinstance(driver, Driver):
        raise TypeError(f"{type(driver).__name__} does not implement drivers.base.Driver")
    return driver


__all__ = ["Driver", "DriverConfigError", "DriverError", "JobInvalid", "VMStatus", "VncTarget", "load_driver"]
