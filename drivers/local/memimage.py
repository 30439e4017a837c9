"""Template RAM files as sealed memory, for warm clones to map copy-on-write (jobspecs/memory.py).

QEMU opens a ``memory-backend-file``'s path for reading and writing, whatever ``share`` says, and keeps that
descriptor: a QEMU that a guest took over could then write into the file every clone maps. So QEMU never
gets the layer's file. The driver copies it once (its data only: holes stay holes) into a memfd, seals
the memfd against every write, growth and shrinking (``F_SEAL_WRITE`` and friends: refused to root too),
and hands each clone that descriptor; QEMU maps it privately, which a write seal allows. The copy lives
in memory once for all the clones of this driver, and as long as any of them runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
from pathlib import Path

from drivers.base import DriverError, JobInvalid

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
CHUNK = 1 << 20


def check_memory_file(path: str) -> None:
    """Refuse a RAM file that is not a warm layer's: its folder's manifest.json must list it, and nobody but
    its owner may write it (a job naming any other file would put that file in a guest's memory)."""
    file = Path(path)
    try:
        files = json.loads((file.parent / "manifest.json").read_text())["files"]
        st = file.stat()
    except (OSError, ValueError, KeyError, TypeError):
        raise JobInvalid(f"the memory file {path} is not a warm layer's (no manifest lists it)") from None
    if file.name not in files or not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
        raise JobInvalid(f"the memory file {path} is not a warm layer's read-only RAM file")


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy the data extents of ``src`` into ``dst`` at the same offsets (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        hole = os.lseek(src, data, os.SEEK_HOLE)
        at = data
        while at < hole:
            chunk = os.pread(src, min(CHUNK, hole - at), at)
            if not chunk:
                return
            os.pwrite(dst, chunk, at)
            at += len(chunk)
        offset = hole


def sealed_copy(path: Path) -> int:
    """A new memfd holding ``path``'s bytes, sealed against any change; the caller owns the descriptor."""
    fd = os.memfd_create(f"vmgate-ram:{path.parent.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            os.ftruncate(fd, size)
            _copy_data(f.fileno(), fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class MemoryImages:
    """The sealed copies this driver made, one per RAM file (as it is now: a rebuilt file gets a new one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[tuple[str, int, int, int], int] = {}
        self._closed = False  # a keep() still running in its thread when the driver closed makes nothing more

    @staticmethod
    def _key(path: str) -> tuple[str, int, int, int]:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)

    def descriptor(self, path: str) -> int:
        """The sealed memfd of the RAM file ``path`` (made on first use); stays open until ``close``."""
        key = self._key(path)
        with self._lock:
            if self._closed:
                raise DriverError("the driver is closed")
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = sealed_copy(Path(path))
            return fd

    def keep(self, paths: list[str]) -> None:
        """Have the sealed copies of ``paths`` made now, so that no warm start waits for one (the first clone
        of the desktop template waited about 1 s for its 471 MB), and let go of the copies of every other
        file (a layer `make images` replaced; the clones running keep theirs mapped)."""
        wanted = {self._key(path): path for path in paths}
        with self._lock:
            for key in [key for key in self._fds if key not in wanted]:
                os.close(self._fds.pop(key))
        for path in wanted.values():
            self.descriptor(path)

    def close(self) -> None:
        """Let go of every copy (the clones running keep theirs mapped)."""
        with self._lock:
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
