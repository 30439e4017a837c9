"""The manifest of a built image: what its files must be, read by the gateway before a VM uses them.

An image directory (a base image ``IMAGES_DIR/<image>/``, a warm layer ``IMAGES_DIR/warm/<t>/<id>/``) holds
a ``manifest.json`` beside its files, written by the build (``images/manifest.py``, ``images/warm.py``):

    {"name": "tiny", "built_at": "2025-01-01T00:00:00Z",
     "files": {"vmlinuz": {"sha256": "...", "size": 123}, ...},
     "sources": {"linux-image-6.1.0-56-cloud-amd64": "6.1.192-2", ...},
     "kernel_release": "6.1.0-56-cloud-amd64"}

Only ``files`` is checked; the rest records how the image was made (a warm layer's adds its sizes,
accelerator, QEMU version and inputs). This module is the format's one definition, shared by the runtime
(the gateway's image checks, the catalog) and the build scripts under images/; it needs only the
standard library, because images/build-tiny.sh runs those scripts with the system's python3.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    """The sha256 of a file, hex, read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check(directory: Path) -> tuple[bool, str]:
    """Whether every file ``directory``'s manifest lists is there with its size and sha256; (False, why) if not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return False, f"{manifest_path} does not exist"
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return False, f"{manifest_path} is unreadable: {exc}"
    if not files:
        return False, f"{manifest_path} lists no files"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return False, f"{path} is missing"
        if path.stat().st_size != entry.get("size"):
            return False, f"{path} has the wrong size"
        if sha256_of(path) != entry.get("sha256"):
            return False, f"{path} does not match its sha256"
    return True, "ok"
