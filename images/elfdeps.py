#!/usr/bin/env python3
"""Copy dynamically linked programs and the shared libraries they need between trees.

    elfdeps.py SRC DEST PROGRAM [PROGRAM...]

SRC is a directory where Debian packages were unpacked (``dpkg-deb -x``); each
PROGRAM is a path relative to SRC. Every PROGRAM, its ELF interpreter and the
libraries named by DT_NEEDED (recursively) are copied to the same relative
paths under DEST, symlinks included. A library that is not in SRC is an error:
the guest has nothing but what we put in it.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def elf_links(data: bytes) -> tuple[str | None, list[str]]:
    """(interpreter, DT_NEEDED names) of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for index in range(phnum):
        base = phoff + index * phentsize
        p_type = struct.unpack_from("<I", data, base)[0]
        p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<QQQQ", data, base + 8)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == PT_INTERP:
            interp = data[p_offset : p_offset + p_filesz].split(b"\0")[0].decode()
    if dynamic is None:
        return interp, []

    def file_offset(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        raise ValueError(f"address {vaddr:#x} is in no loadable segment")

    needed_offsets: list[int] = []
    strtab = 0
    offset, size = dynamic
    for entry in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, entry)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed_offsets.append(value)
        elif tag == DT_STRTAB:
            strtab = file_offset(value)
    names = [data[strtab + o : data.index(b"\0", strtab + o)].decode() for o in needed_offsets]
    return interp, names


def copy_path(src_root: Path, dest_root: Path, rel: str) -> Path:
    """Copy SRC/rel to DEST/rel, following a chain of symlinks (each link copied as a link)."""
    rel = rel.lstrip("/")
    seen: set[str] = set()
    while rel not in seen:
        seen.add(rel)
        source, target = src_root / rel, dest_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            link = source.readlink()
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(link)
            rel = _resolve_dots(link.as_posix() if link.is_absolute() else (Path(rel).parent / link).as_posix())
            continue
        if not source.is_file():
            raise SystemExit(f"elfdeps: {rel} is not in {src_root}")
        shutil.copy2(source, target)
        return source
    raise SystemExit(f"elfdeps: symlink loop at {rel}")


def _resolve_dots(rel: str) -> str:
    parts: list[str] = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def find_library(src_root: Path, name: str) -> str:
    for directory in LIB_DIRS:
        candidate = src_root / directory / name
        if candidate.is_file() or candidate.is_symlink():
            return f"{directory}/{name}"
    raise SystemExit(f"elfdeps: no {name} in {src_root} (add the Debian package that ships it)")


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    src_root, dest_root = Path(argv[1]), Path(argv[2])
    queue = list(argv[3:])
    done: set[str] = set()
    while queue:
        rel = queue.pop(0).lstrip("/")
        if rel in done:
            continue
        done.add(rel)
        real = copy_path(src_root, dest_root, rel)
        interp, needed = elf_links(real.read_bytes())
        if interp:
            queue.append(interp)
        queue.extend(find_library(src_root, name) for name in needed)
        print(rel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
