#!/usr/bin/env python3
"""Pick kernel modules (and everything they depend on) out of an unpacked kernel package.

Debian's linux-image packages ship no modules.dep (depmod runs in the package's
postinst), so the dependencies are read from each module's own ``.modinfo`` ELF
section (``depends=`` and ``softdep=pre:``). Modules may be plain ``.ko`` or
compressed ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz``; they are written out
uncompressed so the guest can load them with plain busybox ``insmod``.

Usage:
    kmods.py MODDIR DEST MODULE [MODULE...]

MODDIR is ``<unpacked deb>/lib/modules/<release>``. Into ``DEST/lib/modules/<release>``
this writes the selected modules (same relative paths, uncompressed), a
``modules.dep`` covering exactly those modules (so busybox ``modprobe`` works
too), a copy of ``modules.builtin``, and ``modules.load``: one relative path a
line, in an order in which ``insmod`` succeeds. Requested modules that are
built into the kernel are skipped and named on stderr.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
import sys
from pathlib import Path

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports '_'."""
    return name.replace("-", "_")


def module_name(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return canonical(name[: -len(suffix)])
    raise ValueError(f"not a kernel module: {path}")


def strip_compression(rel: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(".ko" + suffix):
            return rel[: -len(suffix)]
    return rel


def read_module(path: Path) -> bytes:
    """The uncompressed ELF bytes of a module file."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        # Python 3.11 has no zstd in the standard library; the zstd CLI is a build dependency.
        done = subprocess.run(["zstd", "-q", "-d", "-c"], input=raw, capture_output=True, check=True)
        return done.stdout
    return raw


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """key -> values from the .modinfo section of a 64-bit little-endian ELF object."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name_off = struct.unpack_from("<I", elf, base)[0]
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name_off, offset, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name_off, offset, size = section(index)
        name = names[name_off : names.index(b"\0", name_off)]
        if name != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            if b"=" in entry:
                key, value = entry.decode("utf-8", "replace").split("=", 1)
                info.setdefault(key, []).append(value)
    return info


def dependencies(info: dict[str, list[str]]) -> list[str]:
    deps: list[str] = []
    for value in info.get("depends", []):
        deps.extend(canonical(d) for d in value.split(",") if d)
    for value in info.get("softdep", []):
        # "pre: a b post: c" -- only "pre" modules must be loaded first.
        words = value.split()
        current = ""
        for word in words:
            if word.endswith(":"):
                current = word[:-1]
            elif current == "pre":
                deps.append(canonical(word))
    return deps


class Modules:
    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.files: dict[str, Path] = {}
        for path in sorted((moddir / "kernel").rglob("*.ko*")):
            if path.name.endswith(SUFFIXES):
                self.files.setdefault(module_name(path), path)
        self.builtin: set[str] = set()
        builtin_list = moddir / "modules.builtin"
        if builtin_list.exists():
            for line in builtin_list.read_text().split():
                self.builtin.add(module_name(Path(line)))
        self._elf: dict[str, bytes] = {}

    def elf(self, name: str) -> bytes:
        if name not in self._elf:
            self._elf[name] = read_module(self.files[name])
        return self._elf[name]

    def rel(self, name: str) -> str:
        return strip_compression(self.files[name].relative_to(self.moddir).as_posix())

    def resolve(self, wanted: list[str]) -> tuple[list[str], dict[str, list[str]], list[str]]:
        """(load order, deps of each selected module, requested-but-builtin names)."""
        order: list[str] = []
        deps_of: dict[str, list[str]] = {}
        builtin: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, required: bool) -> bool:
            if name in deps_of:
                return True
            if name not in self.files:
                if name in self.builtin:
                    if required:
                        builtin.append(name)
                    return False
                if required:
                    raise SystemExit(f"kmods: no module named {name!r} in {self.moddir}")
                return False  # an optional soft dependency this kernel does not have
            if name in visiting:
                raise SystemExit(f"kmods: dependency cycle through {name!r}")
            visiting.add(name)
            info = modinfo(self.elf(name))
            hard = [canonical(d) for v in info.get("depends", []) for d in v.split(",") if d]
            kept: list[str] = []
            for dep in dependencies(info):
                if visit(dep, required=dep in hard) and dep not in kept:
                    kept.append(dep)
            visiting.discard(name)
            deps_of[name] = kept
            order.append(name)
            return True

        for name in wanted:
            visit(canonical(name), required=True)
        return order, deps_of, builtin

    def closure(self, name: str, deps_of: dict[str, list[str]]) -> list[str]:
        """All modules `name` needs, nearest first (modules.dep order)."""
        seen: list[str] = []
        stack = list(deps_of[name])
        while stack:
            dep = stack.pop(0)
            if dep not in seen:
                seen.append(dep)
                stack.extend(deps_of[dep])
        return seen


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    moddir, dest_root, wanted = Path(argv[1]), Path(argv[2]), argv[3:]
    modules = Modules(moddir)
    order, deps_of, builtin = modules.resolve(wanted)
    dest = dest_root / "lib" / "modules" / moddir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in order:
        target = dest / modules.rel(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(modules.elf(name))
        target.chmod(0o644)
    dep_lines = [
        f"{modules.rel(n)}: {' '.join(modules.rel(d) for d in modules.closure(n, deps_of))}".rstrip() + "\n"
        for n in order
    ]
    (dest / "modules.dep").write_text("".join(dep_lines))
    (dest / "modules.load").write_text("".join(modules.rel(n) + "\n" for n in order))
    if (moddir / "modules.builtin").exists():
        shutil.copyfile(moddir / "modules.builtin", dest / "modules.builtin")
    for name in builtin:
        print(f"kmods: {name} is built into the kernel", file=sys.stderr)
    print(" ".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
