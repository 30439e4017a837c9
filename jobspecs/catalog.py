"""The template catalog: ``images/catalog.json`` joined with the built images under IMAGES_DIR.

A template names a base image directory (``IMAGES_DIR/<image>/``, built by ``images/build-*.sh``
with a ``manifest.json``), the boot loader and disk files in it (the kernel and initrd are in the disk),
the kernel command line, and the sizes a VM may ask for. Loading the catalog never needs the images to be built, so the
gateway can start (and list templates) before ``make images`` finished; ``Template.is_built()``
says whether a template can boot.

A template with ``"warm": true`` also has warm layers (``images/warm.py``, docs/IMAGES.md "Warm
templates"): ``IMAGES_DIR/warm/<template>/<id>/`` holds a disk layer on the base disk and the memory
state saved from the same moment, ``IMAGES_DIR/warm/<template>/current`` names the newest one, and
``Template.warm_image()`` reads it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobspecs.memory import RAM_FILE

# images/catalog.json in this repository.
DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "images" / "catalog.json"

# What a template's kernel command line may hold. The boot loader gets it from QEMU's SMBIOS and splits
# it with GRUB's eval (images/lib.sh), so nothing in it may be GRUB syntax: no quotes, $, ;, braces,
# backslashes or redirections.
CMDLINE_PUNCTUATION = "._,:=/+@%-"
CMDLINE_RE = re.compile(r"[A-Za-z0-9._,:=/+@%-]+( [A-Za-z0-9._,:=/+@%-]+)*")

# Nomad's qemu driver refuses memory outside 128..4000000 MB; no template may promise more.
NOMAD_MEMORY_MB = (128, 4_000_000)

SIZE_NAMES = ("cpu", "memory_mb", "disk_gb")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CatalogError(ValueError):
    """The catalog file is missing or a template in it is malformed."""


@dataclass(frozen=True)
class Sizes:
    """A VM's size: vCPUs, memory in MB, disk in GB."""

    cpu: int
    memory_mb: int
    disk_gb: int


@dataclass(frozen=True)
class Limits:
    """Inclusive (lowest, highest) bounds for each size a VM of a template may ask for."""

    cpu: tuple[int, int]
    memory_mb: tuple[int, int]
    disk_gb: tuple[int, int]

    def bounds(self, size: str) -> tuple[int, int]:
        value: tuple[int, int] = getattr(self, size)
        return value


WARM_DIR = "warm"  # IMAGES_DIR/warm/<template>/<id>/: the warm layers of each template
WARM_CURRENT = "current"  # IMAGES_DIR/warm/<template>/current -> <id>: the one new VMs use
WARM_DISK = "disk.qcow2"
WARM_STATE = "state"
# The state file's path ends up in `-incoming "exec:cat PATH"`, which QEMU runs with /bin/sh.
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9/._-]+$")


@dataclass(frozen=True)
class WarmImage:
    """A warm layer: a disk layer on the template's base disk plus the memory state saved at the same
    moment, and the machine the state fits (a state restores only into the same vCPUs, memory and disk
    size under the same accelerator)."""

    template: str
    id: str
    directory: Path
    disk: Path
    state: Path
    sizes: Sizes
    accelerator: str
    ram: Path | None = None  # the template's RAM as a file, for clones to share (jobspecs/memory.py); local only

    def fits(self, cpu: int, memory_mb: int, disk_gb: int, accelerator: str) -> bool:
        """True when a VM of this size, under this accelerator, can start from this state."""
        return (Sizes(cpu, memory_mb, disk_gb) == self.sizes) and accelerator == self.accelerator

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"


def read_warm_image(directory: Path) -> WarmImage | None:
    """The warm layer in ``directory`` (``IMAGES_DIR/warm/<template>/<id>`` or its ``current`` link,
    resolved), or None when there is none or its manifest is unreadable. Files are not hashed here."""
    try:
        real = Path(os.path.realpath(directory))
        manifest = json.loads((real / "manifest.json").read_text())
        sizes = Sizes(**{size: int(manifest["sizes"][size]) for size in SIZE_NAMES})
        image = WarmImage(template=str(manifest["template"]), id=str(manifest["id"]), directory=real,
                          disk=real / WARM_DISK, state=real / WARM_STATE, sizes=sizes,
                          accelerator=str(manifest["accelerator"]),
                          ram=real / RAM_FILE if RAM_FILE in manifest.get("files", {}) else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _SAFE_PATH_RE.fullmatch(str(image.state)):
        return None
    return image


@dataclass(frozen=True)
class Template:
    """One bootable template: files of a built base image plus how to boot it and how big it may be."""

    name: str
    title: str
    description: str
    image_dir: Path
    boot: Path  # GRUB as QEMU's -kernel; it boots the disk's /vmlinuz and /initrd.img (images/lib.sh)
    disk: Path
    cmdline: str
    limits: Limits
    defaults: Sizes
    warm: bool = False  # catalog "warm": new VMs of the default size start from a saved memory state
    # catalog "idle_suspend_after": seconds idle before a VM of this template is suspended (0 never);
    # None: the installation's IDLE_SUSPEND_AFTER.
    idle_suspend_after: int | None = None
    # catalog "ready": what the serial console shows once a boot is done, in order (the warm layer's
    # builder waits for all of it before it saves the state: images/warm.py)
    ready: tuple[str, ...] = ()
    # catalog "desktop": a graphical desktop (virtio-gpu that follows the console's size, an absolute pointer,
    # the clipboard through qemu-vdagent: jobspecs/devices.py)
    desktop: bool = False
    # catalog "agent": the guest runs the QEMU guest agent (file upload and download: gateway/engine/files.py)
    agent: bool = False
    # catalog "network": what a new VM gets when its create does not say (outbound or none; docs/NETWORK.md)
    network: str = "outbound"

    @property
    def manifest(self) -> Path:
        return self.image_dir / "manifest.json"

    @property
    def warm_root(self) -> Path:
        """``IMAGES_DIR/warm/<template>``: this template's warm layers and the ``current`` link."""
        return self.image_dir.parent / WARM_DIR / self.name

    def warm_image(self) -> WarmImage | None:
        """The current warm layer, if the template is warm and one was built; None otherwise."""
        if not self.warm:
            return None
        image = read_warm_image(self.warm_root / WARM_CURRENT)
        return image if image is not None and image.template == self.name else None

    def is_built(self) -> bool:
        """True when the image's manifest and the boot loader and disk it boots from exist."""
        return all(path.is_file() for path in (self.manifest, self.boot, self.disk))

    def to_json(self) -> dict[str, Any]:
        """What the API shows about a template (no host paths)."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "limits": {size: list(self.limits.bounds(size)) for size in SIZE_NAMES},
            "defaults": {size: getattr(self.defaults, size) for size in SIZE_NAMES},
            "warm": self.warm,
            "idle_suspend_after": self.idle_suspend_after,
            "desktop": self.desktop,
            "files": self.agent,
            "network": self.network,
        }


def _require(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise CatalogError(f"{where}: missing key {key!r}")
    return entry[key]


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = _require(entry, key, where)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: {key} must be a non-empty string")
    return value


def _file_name(entry: dict[str, Any], key: str, where: str) -> str:
    value = _text(entry, key, where)
    if not _FILE_RE.fullmatch(value):
        raise CatalogError(f"{where}: {key} must be a plain file name inside the image directory, got {value!r}")
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _template(name: str, entry: Any, images_dir: Path, where: str) -> Template:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: expected an object")
    if not _NAME_RE.fullmatch(name):
        raise CatalogError(f"{where}: template names are 1-32 of a-z, 0-9 and '-'")
    image_dir = images_dir / _file_name(entry, "image", where)
    cmdline = _text(entry, "cmdline", where)
    if not CMDLINE_RE.fullmatch(cmdline) or "vmgate.hostname=" in cmdline:
        raise CatalogError(f"{where}: cmdline must be kernel parameters of A-Z a-z 0-9 and {CMDLINE_PUNCTUATION} "
                           "separated by spaces, without vmgate.hostname= (the renderer adds it)")

    raw_limits = _require(entry, "limits", where)
    raw_defaults = _require(entry, "defaults", where)
    if not isinstance(raw_limits, dict) or not isinstance(raw_defaults, dict):
        raise CatalogError(f"{where}: limits and defaults must be objects")
    bounds: dict[str, tuple[int, int]] = {}
    defaults: dict[str, int] = {}
    for size in SIZE_NAMES:
        pair = _require(raw_limits, size, f"{where}: limits")
        if not (isinstance(pair, list) and len(pair) == 2 and all(_int(v) for v in pair)
                and 1 <= pair[0] <= pair[1]):
            raise CatalogError(f"{where}: limits.{size} must be [lowest, highest] with 1 <= lowest <= highest")
        bounds[size] = (pair[0], pair[1])
        default = _require(raw_defaults, size, f"{where}: defaults")
        if not _int(default) or not pair[0] <= default <= pair[1]:
            raise CatalogError(f"{where}: defaults.{size} must be an integer within limits.{size} {pair}")
        defaults[size] = default
    flags = {}
    for flag in ("warm", "desktop", "agent"):
        flags[flag] = entry.get(flag, False)
        if not isinstance(flags[flag], bool):
            raise CatalogError(f"{where}: {flag} must be true or false")
    ready = entry.get("ready", [])
    if not (isinstance(ready, list) and all(isinstance(r, str) and r and r.isprintable() for r in ready)):
        raise CatalogError(f"{where}: ready must be a list of the lines the serial console shows once booted")
    idle = entry.get("idle_suspend_after")
    if idle is not None and not (_int(idle) and 0 <= idle <= 30 * 86400):
        raise CatalogError(f"{where}: idle_suspend_after must be whole seconds from 0 (never) to 2592000")
    network = entry.get("network", "outbound")
    if network not in ("outbound", "none"):
        raise CatalogError(f"{where}: network must be outbound or none")
    low, high = bounds["memory_mb"]
    if low < NOMAD_MEMORY_MB[0] or high > NOMAD_MEMORY_MB[1]:
        raise CatalogError(f"{where}: limits.memory_mb must stay within Nomad's {NOMAD_MEMORY_MB[0]}.."
                           f"{NOMAD_MEMORY_MB[1]} MB")

    return Template(
        name=name,
        title=_text(entry, "title", where),
        description=_text(entry, "description", where),
        image_dir=image_dir,
        boot=image_dir / _file_name(entry, "boot", where),
        disk=image_dir / _file_name(entry, "disk", where),
        cmdline=cmdline,
        limits=Limits(**bounds),
        defaults=Sizes(**defaults),
        idle_suspend_after=idle,
        ready=tuple(ready),
        network=network,
        **flags,
    )


def load_catalog(catalog_path: Path, images_dir: Path) -> dict[str, Template]:
    """Read the catalog and return its templates by name; raises ``CatalogError`` naming the problem.

    ``catalog_path`` is usually ``DEFAULT_CATALOG``; ``images_dir`` is IMAGES_DIR (Settings.images_dir).
    """
    catalog_path = Path(catalog_path)
    images_dir = Path(images_dir).absolute()
    try:
        data = json.loads(catalog_path.read_text())
    except OSError as exc:
        raise CatalogError(f"{catalog_path}: cannot read the catalog: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{catalog_path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise CatalogError(f"{catalog_path}: expected an object of templates by name")
    return {name: _template(name, entry, images_dir, f"{catalog_path}: template {name!r}")
            for name, entry in data.items()}
