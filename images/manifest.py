#!/usr/bin/env python3
"""Write and check the manifest.json of a built base image (the format: jobspecs/manifest.py).

    manifest.py check DIR
        exit 0 when DIR/manifest.json exists and every file it lists exists with
        the recorded size and sha256; exit 1 (saying why on stderr) otherwise.

    manifest.py write DIR NAME KERNEL_RELEASE FILE[,FILE...] PKG=VERSION [PKG=VERSION...]
        hash FILEs (relative to DIR) and write DIR/manifest.json.

images/build-tiny.sh runs this file as a script with the system's python3, and images/check-tiny.py imports
it as its sibling ``manifest``: in both, the repository root is not on sys.path, so it is put there first.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

if not __package__:  # a script, or a sibling import: jobspecs/ is found from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobspecs.manifest import MANIFEST, check, sha256_of

__all__ = ["MANIFEST", "check", "sha256_of", "write"]


def write(directory: Path, name: str, kernel_release: str, files: list[str], sources: dict[str, str]) -> None:
    """Hash ``files`` (relative to ``directory``) and write its manifest.json."""
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
