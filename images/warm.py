"""Build the warm layers of the templates that have ``"warm": true`` in images/catalog.json.

    python -m images.warm [--force] [--template NAME]     (`make images` runs it after the base images)

For each such template whose base image is built, this boots the template once on a fresh overlay of
its base disk, with exactly the QEMU command line a VM of the template's default size gets (the job
``jobspecs.render_job`` renders, run by ``drivers.local.LocalDriver``), waits for the guest's ready line
and prompt, saves its memory state with the driver's own suspend (``LocalDriver.suspend_to``: QMP ``stop``,
``migrate`` to the state file, QEMU ended), and freezes the overlay. The result:

    IMAGES_DIR/warm/<template>/<id>/disk.qcow2     the disk layer (backing file: the base's disk.qcow2)
    IMAGES_DIR/warm/<template>/<id>/state          the memory state, saved at the same moment
    IMAGES_DIR/warm/<template>/<id>/manifest.json  sha256 and size of both, the sizes the state fits,
                                                   the accelerator, QEMU's version, what it was made from
    IMAGES_DIR/warm/<template>/current -> <id>     the layer new VMs use

All files are read-only (0444). ``<id>`` is a hash of everything the state depends on (the base image's
files, the job's QEMU arguments, the sizes, the accelerator, QEMU's version): when none of that changed,
the layer is up to date and nothing is done. The build never removes a layer: VMs created from it have
their overlays on its disk (``vmgate prune-layers`` removes those nothing uses, gateway/cli/layers.py).
docs/IMAGES.md ("Warm templates") has the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from drivers.base import DriverError
from drivers.local import LocalDriver, network
from drivers.local.qmp import set_ignore_shared
from jobspecs import memory
from jobspecs.catalog import (
    DEFAULT_CATALOG,
    WARM_CURRENT,
    WARM_DISK,
    WARM_STATE,
    Template,
    load_catalog,
)
from jobspecs.manifest import check as check_manifest
from jobspecs.manifest import sha256_of
from jobspecs.memory import RAM_FILE
from jobspecs.render import ACCELERATORS, FW_CFG_HOSTNAME, JobSettings, VMSpec, render_job

FORMAT = 3  # bump when the way a layer is made changes: every layer is then rebuilt (2, 3: the RAM file)
READY = ("vmgate-tiny: ready", "~ # ")  # a template whose catalog entry says no "ready"
BOOT_TIMEOUT = 300.0  # seconds to the ready line (TCG on a busy host: tiny 3-9 s, debian-12 35-60 s)
LEASE_TIMEOUT = 60.0  # seconds after the ready lines for the guest's DHCP lease (networkd may ask late)
SETTLE = 1.5  # seconds after the prompt, so the shells have drawn and the guest is idle when saved
# What the template boot finds in fw_cfg opt/vmgate/hostname: as long as any hostname (63, a clone
# reads the entry with the size its kernel saw at boot) and never one (':' and '.'), so every clone,
# whatever its name, sees a different entry and renames itself (images/tiny/rootfs/sbin/vmgate-clone-watch).
PLACEHOLDER = "vmgate:warm-template:".ljust(63, ".")
VM_ID = "warm"


def say(message: str) -> None:
    print(f"warm: {message}", file=sys.stderr, flush=True)


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def template_network(settings: JobSettings) -> str:
    """The template boot's network: a DHCP server and nothing else where this host makes VM networks, so
    every clone starts with its lease already taken (drivers/local/network.py); else none (any VM can restore
    a layer saved on either: jobspecs/devices.py)."""
    return "outbound" if settings.target == "local" and network.problem() is None else "none"


def template_job(template: Template, settings: JobSettings, overlay: Path) -> dict[str, Any]:
    """The job of a VM of the template's default size, as the template boot runs it."""
    vm = VMSpec.for_template(template, id=VM_ID, owner="0", overlay_path=overlay, hostname="warm-template",
                             network=template_network(settings))
    job = render_job(vm, template, settings)
    args: list[str] = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    at = args.index(f"name={FW_CFG_HOSTNAME},string={vm.hostname}")
    args[at] = f"name={FW_CFG_HOSTNAME},string={PLACEHOLDER}"
    return job


def inputs_of(template: Template, settings: JobSettings, qemu: str) -> dict[str, Any]:
    """Everything the saved state depends on; its hash names the layer."""
    base = json.loads(template.manifest.read_text())
    job = template_job(template, settings, Path("/overlay.qcow2"))
    task = job["TaskGroups"][0]["Tasks"][0]
    return {
        "format": FORMAT,
        "template": template.name,
        "base_files": {name: base["files"][name]["sha256"]
                       for name in (template.boot.name, template.disk.name)},
        "config": {k: v for k, v in task["Config"].items() if k != "image_path"},
        "memory_mb": task["Resources"]["MemoryMB"],
        "sizes": dataclasses.asdict(template.defaults),
        "accelerator": settings.accelerator,
        "qemu": qemu,
    }


async def _wait_serial(path: Path, needles: tuple[str, ...], timeout: float, pid_alive: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if all(needle in text for needle in needles):
            return
        if not pid_alive():
            raise RuntimeError(f"QEMU exited during the template boot; serial log tail:\n{text[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {needles!r} on the serial console after {timeout:g} s; tail:\n{text[-1500:]}")
        await asyncio.sleep(0.1)


async def _wait_lease(task_dir: Path, timeout: float, pid_alive: Any) -> None:
    deadline = time.monotonic() + timeout
    while not network.leased(task_dir):
        if not pid_alive() or time.monotonic() > deadline:
            log = task_dir / "dnsmasq.log"
            raise RuntimeError(f"the guest took no DHCP lease within {timeout:g} s; dnsmasq.log: "
                               + (log.read_text(errors="replace")[-800:] if log.exists() else "none"))
        await asyncio.sleep(0.1)


async def boot_and_save(template: Template, settings: JobSettings, qemu_binary: str, out: Path) -> dict[str, float]:
    """Boot the template on ``out``/disk.qcow2 (already created), save ``out``/state; returns timings."""
    scratch = Path(tempfile.mkdtemp(prefix="vgwarm", dir="/tmp"))
    driver = LocalDriver(scratch, qemu_binary, image_paths=[out], run_as=None, boot_timeout=60.0,
                         networks=network.NetworkConfig(uplink=False))
    job = template_job(template, settings, out / WARM_DISK)
    # Without the recorded run state ("paused", after `stop`) the restored VM starts running by itself,
    # with no one to send QMP `cont` (Nomad starts QEMU and leaves it). This is a property of QEMU's
    # migration object, not of the machine: the guest sees the same hardware.
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    args += ["-global", "migration.store-global-state=off"]
    shared = settings.target == "local"
    if shared:  # the RAM in a file of its own, which clones map (jobspecs/memory.py); the state without it
        args += memory.backend_args(template.defaults.memory_mb, f"${{NOMAD_TASK_DIR}}/{RAM_FILE}", share=True)
    state = out / WARM_STATE
    timings: dict[str, float] = {}
    began = time.monotonic()
    try:
        status = await driver.start(VM_ID, job)
        serial = driver.task_dir(VM_ID) / "serial.log"

        def alive() -> bool:
            return status.pid is not None and Path(f"/proc/{status.pid}").exists()

        ready = template.ready or READY
        await _wait_serial(serial, ready[:1], BOOT_TIMEOUT, alive)
        timings["ready_s"] = round(time.monotonic() - began, 2)
        await _wait_serial(serial, ready, 30.0, alive)
        if job["Meta"]["network"] == "outbound":
            await _wait_lease(driver.task_dir(VM_ID), LEASE_TIMEOUT, alive)
        await asyncio.sleep(SETTLE)
        saving = time.monotonic()
        task_dir = driver.task_dir(VM_ID)
        if shared:
            await set_ignore_shared(task_dir / "qmp.sock", True)
        async def keep_ram() -> None:
            # The RAM as the state was saved, copied before anything runs again (holes stay holes): even the
            # desktop's clipboard re-plug after the save writes into the guest's RAM, which the state would
            # no longer match (a clone then fails to load virtio-console's queues).
            await asyncio.to_thread(subprocess.run, ["cp", "--sparse=always", str(task_dir / RAM_FILE),
                                                     str(out / RAM_FILE)], check=True)

        # The driver's own suspend: pause, save the memory to a file, end QEMU (the VMs' suspend path).
        await driver.suspend_to(VM_ID, str(state), while_paused=keep_ram if shared else None)
        timings["save_s"] = round(time.monotonic() - saving, 2)
    finally:
        await driver.destroy(VM_ID)
        await driver.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if not state.is_file() or state.stat().st_size == 0:
        raise RuntimeError("QEMU wrote no memory state")
    return timings


def build(template: Template, settings: JobSettings, qemu_binary: str, force: bool = False) -> Path:
    """Make sure the template's current warm layer matches its inputs; returns its directory."""
    root = template.warm_root
    root.mkdir(parents=True, exist_ok=True)
    qemu = qemu_version(qemu_binary)
    inputs = inputs_of(template, settings, qemu)
    layer_id = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    final = root / layer_id
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir() and not force and check_manifest(final)[0]:
            _point_current(root, layer_id)
            say(f"{template.name}: warm layer {layer_id} up to date")
            return final
        new = Path(tempfile.mkdtemp(prefix=f".{layer_id}.new.", dir=root))
        try:
            os.chmod(new, 0o755)  # noqa: S103 - QEMU may run as nobody (-runas) and reads the layer
            disk = new / WARM_DISK
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template.disk), "-F", "qcow2",
                            str(disk), f"{template.defaults.disk_gb}G"], check=True)
            say(f"{template.name}: booting the template ({template.defaults}) to save warm layer {layer_id}")
            # Made next to its final place and renamed when complete: a layer that exists is whole.
            timings = asyncio.run(boot_and_save(template, settings, qemu_binary, new))
            files: dict[str, dict[str, Any]] = {}
            for name in (WARM_DISK, WARM_STATE, RAM_FILE):
                path = new / name
                if name == RAM_FILE and not path.exists():
                    continue  # a layer for a fleet: its state holds the RAM
                path.chmod(0o444)
                files[name] = {"sha256": sha256_of(path), "size": path.stat().st_size}
            manifest = {
                "name": f"{template.name}-warm",
                "template": template.name,
                "id": layer_id,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
                "sizes": dataclasses.asdict(template.defaults),
                "accelerator": settings.accelerator,
                "qemu": qemu,
                "base": str(template.disk),
                "inputs": inputs,
                "seconds": timings,
            }
            (new / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            (new / "manifest.json").chmod(0o444)
            if final.exists():  # --force, or a broken layer: no VM can use it as it is
                shutil.rmtree(final)
            new.rename(final)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        _point_current(root, layer_id)
        say(f"{template.name}: built warm layer {layer_id} (ready after {timings['ready_s']} s, saved in "
            f"{timings['save_s']} s, state {files[WARM_STATE]['size'] >> 10} KiB)")
        return final


def _point_current(root: Path, layer_id: str) -> None:
    link = root / WARM_CURRENT
    with contextlib.suppress(FileNotFoundError):
        if os.readlink(link) == layer_id:
            return
    tmp = root / f".{WARM_CURRENT}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(layer_id)
    tmp.rename(link)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the layer is up to date")
    parser.add_argument("--template", action="append", help="only this template (repeatable)")
    # The gateway's settings of the same names; make images passes them in the environment (deploy/with-env.sh).
    parser.add_argument("--images-dir", type=Path, default=os.environ.get("IMAGES_DIR") or None,
                        help="the built images, where the warm layers go (default: $IMAGES_DIR)")
    parser.add_argument("--qemu-binary", default=os.environ.get("QEMU_BINARY") or "qemu-system-x86_64",
                        help="the QEMU system emulator (default: $QEMU_BINARY or qemu-system-x86_64)")
    parser.add_argument("--accelerator", default=os.environ.get("QEMU_ACCELERATOR") or "tcg",
                        help="tcg or kvm, what the VMs run with (default: $QEMU_ACCELERATOR or tcg)")
    args = parser.parse_args(argv)
    if args.images_dir is None:
        parser.error("no images directory: pass --images-dir or set IMAGES_DIR "
                     "(deploy/with-env.sh .venv/bin/python -m images.warm sets it from .env)")
    if args.accelerator not in ACCELERATORS:
        parser.error(f"--accelerator {args.accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    # Only the accelerator and the target reach the task's config (what the saved state depends on).
    job_settings = JobSettings(accelerator=args.accelerator, target="local")
    templates = load_catalog(DEFAULT_CATALOG, args.images_dir)
    failed = 0
    for template in templates.values():
        if args.template and template.name not in args.template:
            continue
        if not template.warm:
            say(f"{template.name}: not a warm template (catalog \"warm\": false); new VMs boot cold")
            continue
        if not template.is_built():
            say(f"{template.name}: the base image is not built; skipped")
            failed += 1
            continue
        try:
            build(template, job_settings, args.qemu_binary, force=args.force)
        except (RuntimeError, OSError, subprocess.CalledProcessError, DriverError) as exc:
            say(f"{template.name}: {exc}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
