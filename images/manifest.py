#!/usr/bin/env python3
"""Write and check the manifest.json of a built base image.

    manifest.py check DIR
        exit 0 when DIR/manifest.json exists and every file it lists exists with
        the recorded size and sha256; exit 1 (saying why on stderr) otherwise.

    manifest.py write DIR NAME KERNEL_RELEASE FILE[,FILE...] PKG=VERSION [PKG=VERSION...]
        hash FILEs (relative to DIR) and write DIR/manifest.json.

The format (read by the gateway):
    {"name": "tiny", "built_at": "2025-01-01T00:00:00Z",
     "files": {"vmlinuz": {"sha256": "...", "size": 123}, ...},
     "sources": {"linux-image-6.1.0-56-cloud-amd64": "6.1.192-2", ...},
     "kernel_release": "6.1.0-56-cloud-amd64"}
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check(directory: Path) -> tuple[bool, str]:
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


def write(directory: Path, name: str, kernel_release: str, files: list[str], sources: dict[str, str]) -> None:
    manifest = {
        "name": name,
        "built_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {
            file: {"sha256": sha256_of(directory / file), "size": (directory / file).stat().st_size} for file in files
        },
        "sources": dict(sorted(sources.items())),
        "kernel_release": kernel_release,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "check":
        ok, why = check(Path(argv[2]))
        if not ok:
            print(why, file=sys.stderr)
        return 0 if ok else 1
    if len(argv) >= 6 and argv[1] == "write":
        sources: dict[str, str] = {}
        for item in argv[6:]:
            package, sep, version = item.partition("=")
            if not sep:
                print(f"manifest.py: expected PKG=VERSION, got {item!r}", file=sys.stderr)
                return 2
            sources[package] = version
        write(Path(argv[2]), argv[3], argv[4], [f for f in argv[5].split(",") if f], sources)
        return 0
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
