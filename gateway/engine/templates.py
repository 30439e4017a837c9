"""The template catalog as the gateway uses it: lookup, image checks against the build manifest,
job rendering (warm when the template has a warm layer that fits the VM: docs/IMAGES.md)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.engine import pagecache
from gateway.engine.storage import ImageUnavailable, ImageVerifier
from gateway.errors import ValidationFailed
from jobspecs import render, starts
from jobspecs.catalog import DEFAULT_CATALOG, WARM_DISK, WARM_STATE, Template, load_catalog
from jobspecs.memory import RAM_FILE

log = logging.getLogger("vmgate.templates")


class Templates:
    """Templates by name, loaded once from images/catalog.json and IMAGES_DIR."""

    def __init__(self, images_dir: Path, catalog_path: Path = DEFAULT_CATALOG) -> None:
        self.templates = load_catalog(catalog_path, images_dir)
        self._verifier = ImageVerifier()
        self._pinned = pagecache.Pinned()
        self._pin_lock = threading.Lock()
        self._released = False

    def get(self, name: Any) -> Template:
        if not isinstance(name, str) or name not in self.templates:
            raise ValidationFailed(f"template: unknown template {name!r}",
                                   details={"field": "template", "known": sorted(self.templates)})
        return self.templates[name]

    @staticmethod
    def _base_files(template: Template) -> list[str]:
        return [template.disk.name, template.boot.name]

    @staticmethod
    def _layer_files(layer: Path) -> list[str]:
        """What a warm layer's VMs read: its disk and state, and the template's RAM that clones map."""
        return [WARM_DISK, WARM_STATE, *([RAM_FILE] if (layer / RAM_FILE).exists() else [])]

    async def verify(self, template: Template) -> None:
        """Refuse a base image whose files do not match their build manifest."""
        await self._verifier.verify(template.image_dir, self._base_files(template))

    def start_files(self) -> list[Path]:
        """What starting a VM reads, per built template: its boot loader and disk, and the current warm
        layer's state and disk."""
        files: list[Path] = []
        for template in self.templates.values():
            if not template.is_built():
                continue
            files += [template.boot, template.disk]
            warm = template.warm_image()
            if warm is not None:
                files += [warm.state, warm.disk]
        return files

    def verify_ahead(self) -> list[str]:
        """Check every built template's files and current warm layer against their manifests now, so that no
        first VM of a template waits for the hashing (the desktop layer's 1 GB RAM file took seconds); return
        the RAM files of the layers that passed (what the local driver's clones map). What fails here is
        logged and fails again, with its message, when a VM needs it. Blocking: in a thread."""
        ram_files = []
        for template in self.templates.values():
            if not template.is_built():
                continue
            warm = template.warm_image()
            try:
                self._verifier.verify_sync(template.image_dir, self._base_files(template))
                if warm is not None:
                    self._verifier.verify_sync(warm.directory, self._layer_files(warm.directory))
                    if warm.ram is not None:
                        ram_files.append(str(warm.ram))
            except ImageUnavailable as exc:
                log.warning("template %s: %s", template.name, exc.message)
        return ram_files

    def keep_in_memory(self, extra: list[Path]) -> None:
        """Lock ``start_files()`` and ``extra`` in memory (gateway.pagecache), letting go of files no longer
        current (a warm layer replaced by `make images`). Blocking: call it in a thread."""
        with self._pin_lock:
            wanted = [*self.start_files(), *extra]
            if self._released or set(wanted) == set(self._pinned.locked) | set(self._pinned.advised):
                return
            old, self._pinned = self._pinned, pagecache.pin(wanted)
            old.release()

    def release_memory(self) -> None:
        """Let go of what ``keep_in_memory`` holds, now and for good (waits for one under way)."""
        with self._pin_lock:
            self._released = True
            self._pinned.release()

    async def describe(self) -> list[dict[str, Any]]:
        """Every template as the API shows it, with whether its image is built and intact."""
        listing = []
        for template in self.templates.values():
            entry = template.to_json()
            try:
                await self.verify(template)
                entry.update(available=True, problem=None)
            except ImageUnavailable as exc:
                entry.update(available=False, problem=exc.message)
            listing.append(entry)
        return listing

    def render(self, template: Template, vm: dict[str, Any], *, owner: str, settings: Settings) -> dict[str, Any]:
        """A new VM's job: warm (its first start restores the template's saved state) when the template
        has a warm layer saved for this VM's sizes, cold otherwise."""
        spec = render.VMSpec(
            id=vm["id"], owner=owner, template=template.name, cpu=vm["cpu"], memory_mb=vm["memory_mb"],
            disk_gb=vm["disk_gb"], overlay_path=str(vm["overlay_path"]), hostname=vm["name"],
            userdata=vm.get("userdata") or "", network=vm.get("network") or "none")
        job_settings = render.JobSettings.from_settings(settings)
        warm = template.warm_image()
        if warm is not None and not render.warm_fits(spec, warm, job_settings):
            warm = None
        return render.render_job(spec, template, job_settings, warm=warm)

    @staticmethod
    def overlay_base(template: Template, job: dict[str, Any]) -> Path:
        """The disk a VM's overlay is made on: the warm layer its job names, else the base disk."""
        layer = (job.get("Meta") or {}).get("warm_layer")
        if isinstance(layer, str) and layer.isalnum():
            return template.warm_root / layer / WARM_DISK
        return template.disk

    async def verify_warm(self, template: Template, job: dict[str, Any]) -> None:
        """Refuse a warm layer whose disk or state does not match its manifest."""
        base = self.overlay_base(template, job)
        if base != template.disk:
            await self._verifier.verify(base.parent, self._layer_files(base.parent))

    @staticmethod
    def loadvm(job: dict[str, Any], tag: str, settings: Settings) -> dict[str, Any]:
        """The job started from the internal snapshot ``tag`` of the VM's disk (resume, restore)."""
        return starts.loadvm_job(job, tag, render.JobSettings.from_settings(settings))

    @staticmethod
    def resume(job: dict[str, Any], state: Path, settings: Settings) -> dict[str, Any]:
        """The job started from the memory state a suspend saved to ``state``."""
        return starts.resume_job(job, str(state), render.JobSettings.from_settings(settings))

    def idle_suspend_after(self, template_name: str, settings: Settings) -> int:
        """Seconds idle before a VM of this template is suspended (0: never): the template's setting, else
        IDLE_SUSPEND_AFTER."""
        template = self.templates.get(template_name)
        if template is not None and template.idle_suspend_after is not None:
            return template.idle_suspend_after
        return settings.idle_suspend_after

    @staticmethod
    def cold(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
        """The job without the restore of a saved state: what every start but a warm VM's first runs."""
        return starts.cold_job(job, render.JobSettings.from_settings(settings))
