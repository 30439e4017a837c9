"""Keep the files a warm start reads in memory (docs/IMAGES.md, "Keeping the warm layer in memory").

A warm VM's start reads its template's saved memory state (~97 MB for `tiny`) and disk layer. From the page
cache that is a tenth of a second; from this machine's disk, after the kernel paged the file out (DAMON
pages out page cache left idle for about a minute), it took 2-7 s. So the gateway maps those files and
``mlock``s them: they stay resident as long as it runs. Without the right to lock memory (not root, no
CAP_IPC_LOCK, RLIMIT_MEMLOCK too small) it asks the kernel to read them ahead instead (``WILLNEED``), which
helps once and is logged.

Python's ``mmap`` has no ``mlock``; libc's, through ctypes, on a read-only shared mapping of the file.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("vmgate.pagecache")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass
class Pinned:
    """Files mapped and locked in memory (``locked``), and those only read ahead (``advised``)."""

    locked: dict[Path, tuple[int, int]] = field(default_factory=dict)  # path -> (address, size)
    advised: list[Path] = field(default_factory=list)

    @property
    def locked_bytes(self) -> int:
        return sum(size for _, size in self.locked.values())

    def release(self) -> None:
        for address, size in self.locked.values():
            _libc.munmap(address, size)
        self.locked.clear()


def _lock(path: Path) -> tuple[int, int] | str:
    """Map ``path`` read-only and lock it; (address, size), or why not."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return "empty"
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, MAP_FAILED):
            return os.strerror(ctypes.get_errno())
        if _libc.mlock(address, size) != 0:
            error = os.strerror(ctypes.get_errno())
            _libc.munmap(address, size)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            return error
        return address, size
    finally:
        os.close(fd)  # the mapping keeps the file


def pin(paths: Iterable[Path]) -> Pinned:
    """Lock every existing file of ``paths`` in memory (blocking: reads what is not cached yet)."""
    pinned = Pinned()
    for path in dict.fromkeys(Path(p) for p in paths):
        try:
            result = _lock(path)
        except OSError as exc:
            log.warning("cannot keep %s in memory: %s", path, exc.strerror or exc)
            continue
        if isinstance(result, str):
            log.warning("cannot lock %s in memory (%s); read ahead instead, it may be paged out later", path, result)
            pinned.advised.append(path)
        else:
            pinned.locked[path] = result
    if pinned.locked:
        log.info("kept in memory: %s (%d MiB)", ", ".join(p.name for p in pinned.locked), pinned.locked_bytes >> 20)
    return pinned
