"""The template catalog as the gateway uses it: lookup, image checks against the build manifest,
job rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.errors import ValidationFailed
from gateway.storage import ImageUnavailable, ImageVerifier
from jobspecs import render
from jobspecs.catalog import DEFAULT_CATALOG, Template, load_catalog


class Catalog:
    """Templates by name, loaded once from images/catalog.json and IMAGES_DIR."""

    def __init__(self, images_dir: Path, catalog_path: Path = DEFAULT_CATALOG) -> None:
        self.templates = load_catalog(catalog_path, images_dir)
        self._verifier = ImageVerifier()

    def get(self, name: Any) -> Template:
        if not isinstance(name, str) or name not in self.templates:
            raise ValidationFailed(f"template: unknown template {name!r}",
                                   details={"field": "template", "known": sorted(self.templates)})
        return self.templates[name]

    async def verify(self, template: Template) -> None:
        """Refuse a base image whose files do not match their build manifest."""
        names = [template.disk.name, template.kernel.name, template.initrd.name]
        await self._verifier.verify(template.image_dir, names)

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
        spec = render.VMSpec(
            id=vm["id"], owner=owner, template=template.name, cpu=vm["cpu"], memory_mb=vm["memory_mb"],
            disk_gb=vm["disk_gb"], overlay_path=str(vm["overlay_path"]), hostname=vm["name"])
        return render.render_job(spec, template, render.JobSettings.from_settings(settings))
