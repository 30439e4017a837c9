#!/usr/bin/env python3
"""Write ``vmgate-reseed``: a static x86-64 Linux program of about 250 bytes that reseeds the kernel's RNG.

    reseed.py OUT

The tiny guest has busybox only, and no busybox applet issues ioctls. A VM restored from a warm
template's memory state shares the template's RNG state with every other clone until the kernel
reseeds by itself (up to a minute later). ``vmgate_clone`` (lib/vmgate/identity.sh) mixes fresh bytes
from the host (virtio-rng) into the pool and has this program reseed at once. It does

    fd = open("/dev/urandom", O_RDONLY)
    while read(0, &byte, 1) == 1:
        byte = '0' if ioctl(fd, RNDRESEEDCRNG) == 0 else '1'; write(1, &byte, 1)
    exit(0)

so it can wait, started before a warm template's state is saved (``vmgate-clone-watch`` starts it on
two FIFOs), and reseed in a clone without the clone starting a program: the first program a clone
starts costs it about 10 000 translated blocks of the kernel's exec paths (docs/IMAGES.md). By hand:
``echo | vmgate-reseed`` prints 0 when it reseeded.

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
SYS_WRITE, SYS_OPEN, SYS_IOCTL, SYS_EXIT = 1, 2, 16, 60


def _code() -> bytes:
    def mov(reg: int, n: int) -> bytes:  # mov r32,imm32 (0xb8 + register number)
        return bytes([0xB8 + reg]) + struct.pack("<I", n)

    eax, edx, esi, edi = 0, 2, 6, 7
    syscall = b"\x0f\x05"
    buf = b"\x48\x8d\x74\x24\xf0"  # lea rsi,[rsp-16] (the red zone: one byte of it)
    exit_ok = b"\x31\xff" + mov(eax, SYS_EXIT) + syscall  # xor edi,edi; exit
    exit_fail = mov(edi, 1) + mov(eax, SYS_EXIT) + syscall
    reseed = (b"\x89\xdf" + mov(esi, RNDRESEEDCRNG) + mov(eax, SYS_IOCTL) + syscall  # mov edi,ebx; ioctl
              + b"\x85\xc0"  # test eax,eax
              + b"\x0f\x95\xc0"  # setne al
              + b"\x04\x30"  # add al,'0'
              + b"\x88\x44\x24\xf0"  # mov [rsp-16],al
              + mov(edi, 1) + buf + mov(edx, 1) + mov(eax, SYS_WRITE) + syscall)
    read = b"\x31\xff" + buf + mov(edx, 1) + b"\x31\xc0" + syscall  # read(0, buf, 1)
    check = b"\x48\x85\xc0"  # test rax,rax
    loop_len = len(read) + len(check) + 2 + len(reseed) + 2
    loop = (read + check + b"\x7e" + bytes([len(reseed) + 2])  # jle exit_ok (EOF or an error)
            + reseed + b"\xeb" + bytes([(-loop_len) & 0xFF]))  # jmp back to the read
    open_ = (b"\x31\xf6"  # xor esi,esi (O_RDONLY)
             + mov(eax, SYS_OPEN) + syscall
             + b"\x85\xc0"  # test eax,eax
             + b"\x78" + bytes([2 + len(loop) + len(exit_ok)])  # js exit_fail
             + b"\x89\xc3")  # mov ebx,eax (the fd; system calls keep rbx)
    body = open_ + loop + exit_ok + exit_fail
    assert len(loop) < 128 and 2 + len(loop) + len(exit_ok) < 128  # short jumps
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
