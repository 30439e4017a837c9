#!/usr/bin/env python3
"""Write ``vmgate-reseed``: a 192-byte static x86-64 Linux program that reseeds the kernel's RNG.

    reseed.py OUT

The tiny guest has busybox only, and no busybox applet issues ioctls. A VM restored from a warm
template's memory state shares the template's RNG state with every other clone until the kernel
reseeds by itself (up to a minute later). ``vmgate-clone`` mixes fresh bytes from the host
(virtio-rng) into the pool and runs this program, which does

    fd = open("/dev/urandom", O_RDONLY); ioctl(fd, RNDRESEEDCRNG); exit(ioctl's result ? 1 : 0)

(RNDRESEEDCRNG = _IO('R', 0x07), needs CAP_SYS_ADMIN, Linux 4.17+). The machine code below is
written out instruction by instruction; nothing else goes into the file (no libc, no sections).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

BASE = 0x400000
EHDR = 64
PHDR = 56
RNDRESEEDCRNG = 0x5207
SYS_OPEN, SYS_IOCTL, SYS_EXIT = 2, 16, 60


def _code() -> bytes:
    def mov_eax(n: int) -> bytes:
        return b"\xb8" + struct.pack("<I", n)

    exit_fail = b"\xbf\x01\x00\x00\x00" + mov_eax(SYS_EXIT) + b"\x0f\x05"  # mov edi,1; exit
    exit_ok = b"\x31\xff" + mov_eax(SYS_EXIT) + b"\x0f\x05"  # xor edi,edi; exit
    ioctl = (b"\x89\xc7"  # mov edi,eax (the fd)
             + b"\xbe" + struct.pack("<I", RNDRESEEDCRNG)  # mov esi,RNDRESEEDCRNG
             + mov_eax(SYS_IOCTL) + b"\x0f\x05"
             + b"\x85\xc0"  # test eax,eax
             + b"\x75" + bytes([len(exit_ok)]))  # jnz exit_fail
    open_ = (b"\x31\xf6"  # xor esi,esi (O_RDONLY)
             + mov_eax(SYS_OPEN) + b"\x0f\x05"
             + b"\x85\xc0"  # test eax,eax
             + b"\x78" + bytes([len(ioctl) + len(exit_ok)]))  # js exit_fail
    body = open_ + ioctl + exit_ok + exit_fail
    # lea rdi,[rip+disp32]: the path follows the code, disp counts from the end of this instruction.
    return b"\x48\x8d\x3d" + struct.pack("<i", len(body)) + body + b"/dev/urandom\0"


def program() -> bytes:
    """The whole ELF file."""
    code_at = EHDR + PHDR
    code = _code()
    size = code_at + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little endian, version 1, System V
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, BASE + code_at, EHDR, 0, 0, EHDR, PHDR, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE, BASE, size, size, 0x1000)  # PT_LOAD, R+X, the whole file
    return ehdr + phdr + code


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.write_bytes(program())
    out.chmod(0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
