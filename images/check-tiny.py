#!/usr/bin/env python3
"""Boot-check a built tiny image the way vmgate runs it (Nomad qemu driver flags + our args).

    .venv/bin/python images/check-tiny.py IMAGE_DIR [--keep] [--accel tcg]

Boots IMAGE_DIR/boot.bin (GRUB, which boots the disk's kernel) with a fresh 1 GiB qcow2 overlay on
IMAGE_DIR/disk.qcow2 (the base is never written), twice, and checks:

  1. the serial log shows "vmgate-tiny: ready" and the shell prompt (time from exec is reported);
  2. the VGA screen (QMP screendump) shows the shell and the VNC socket speaks RFB, with -nographic;
  3. keys typed on tty1 with QMP send-key reach the shell;
  4. the root file system was grown to the overlay's size and user data passed with -fw_cfg ran;
  5. QMP system_powerdown makes QEMU exit by itself (time reported);
  6. a file written in the first boot is there in the second boot from the same overlay.

Prints one JSON object with the figures; exits 1 when a check fails. Needs the qemu.qmp package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from manifest import sha256_of  # images/manifest.py, beside this script
from qemu.qmp import QMPClient

READY = "vmgate-tiny: ready"
PROMPT = "~ # "
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")

# Characters to QMP qcodes (US layout); shifted ones as (True, qcode).
KEYS: dict[str, tuple[bool, str]] = {
    " ": (False, "spc"),
    "\n": (False, "ret"),
    "-": (False, "minus"),
    "_": (True, "minus"),
    "=": (False, "equal"),
    "+": (True, "equal"),
    ".": (False, "dot"),
    ">": (True, "dot"),
    ",": (False, "comma"),
    "<": (True, "comma"),
    "/": (False, "slash"),
    "?": (True, "slash"),
    ";": (False, "semicolon"),
    ":": (True, "semicolon"),
    "'": (False, "apostrophe"),
    '"': (True, "apostrophe"),
    "|": (True, "backslash"),
    "&": (True, "7"),
    "$": (True, "4"),
    "(": (True, "9"),
    ")": (True, "0"),
    "*": (True, "8"),
}
for _c in "abcdefghijklmnopqrstuvwxyz":
    KEYS[_c] = (False, _c)
    KEYS[_c.upper()] = (True, _c)
for _c in "0123456789":
    KEYS[_c] = (False, _c)


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


class Guest:
    def __init__(self, image: Path, overlay: Path, work: Path, cmdline: str, accel: str, userdata: Path) -> None:
        self.work = work
        self.serial = work / "serial.log"
        self.qmp_path = work / "qmp.sock"
        self.vnc_path = work / "vnc.sock"
        for path in (self.serial, self.qmp_path, self.vnc_path):
            path.unlink(missing_ok=True)
        # Same shape as Nomad's qemu driver: -machine, -name, -m, -drive ...,id=image0, -nographic, then args.
        self.argv = [
            "qemu-system-x86_64",
            "-machine",
            f"type=pc,accel={accel}",
            "-name",
            overlay.name,
            "-m",
            "256M",
            "-drive",
            f"file={overlay},if=virtio,id=image0",
            "-nographic",
            "-smp",
            "1",
            "-kernel",
            str(image / "boot.bin"),
            "-smbios",
            "type=11,value=" + cmdline.replace(",", ",,"),
            "-vnc",
            f"unix:{self.vnc_path}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-sandbox",
            "on",
            "-fw_cfg",
            f"name=opt/vmgate/userdata,file={userdata}",
        ]
        self.started = time.monotonic()
        with self.serial.open("wb") as out, (work / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.qmp = QMPClient("check-tiny")

    def log(self) -> str:
        return clean(self.serial.read_text(errors="replace"))

    async def wait_for(self, needle: str, timeout: float, after: int = 0) -> float:
        """Seconds since exec when `needle` first shows in the serial log (searching from offset `after`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log()[after:]:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}) before {needle!r} appeared")
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{needle!r} did not appear in the serial log within {timeout} s")

    async def connect(self) -> None:
        for _ in range(100):
            if self.qmp_path.exists():
                break
            await asyncio.sleep(0.05)
        await self.qmp.connect(str(self.qmp_path))

    async def type(self, text: str) -> None:
        for char in text:
            shifted, code = KEYS[char]
            keys: list[dict[str, str]] = [{"type": "qcode", "data": "shift"}] if shifted else []
            keys.append({"type": "qcode", "data": code})
            await self.qmp.execute("send-key", {"keys": keys, "hold-time": 20})
            await asyncio.sleep(0.01)

    async def powerdown(self, timeout: float = 30) -> float:
        sent = time.monotonic()
        await self.qmp.execute("system_powerdown")
        while self.proc.poll() is None:
            if time.monotonic() - sent > timeout:
                raise RuntimeError(f"QEMU still running {timeout} s after system_powerdown")
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - sent
        try:
            await self.qmp.disconnect()
        except (EOFError, OSError):
            pass  # QEMU closed the socket when it exited, as it should
        return elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def ppm_to_png(ppm: bytes, png_path: Path) -> tuple[int, int, int]:
    """Write a PNG of a binary PPM; return (width, height, number of distinct colours)."""
    header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s", ppm)
    if not header:
        raise ValueError("not a binary PPM")
    width, height = int(header.group(1)), int(header.group(2))
    pixels = ppm[header.end() : header.end() + width * height * 3]
    rows = b"".join(b"\0" + pixels[y * width * 3 : (y + 1) * width * 3] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")
    png_path.write_bytes(png)
    colours = {pixels[i : i + 3] for i in range(0, len(pixels), 3 * 7)}
    return width, height, len(colours)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("VNC server closed the connection")
        data += chunk
    return data


def vnc_hello(path: Path) -> dict[str, Any]:
    """RFB 3.8 handshake with security type None up to ServerInit: what a noVNC client would see first."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        version = recv_exact(sock, 12).decode(errors="replace").strip()
        sock.sendall(b"RFB 003.008\n")
        count = recv_exact(sock, 1)[0]
        types = list(recv_exact(sock, count))
        if 1 not in types:
            raise RuntimeError(f"VNC offers no 'None' security type: {types}")
        sock.sendall(b"\x01")
        if struct.unpack(">I", recv_exact(sock, 4))[0] != 0:
            raise RuntimeError("VNC security handshake failed")
        sock.sendall(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", recv_exact(sock, 4))
        recv_exact(sock, 16)  # pixel format
        name = recv_exact(sock, struct.unpack(">I", recv_exact(sock, 4))[0]).decode(errors="replace")
        return {"version": version, "width": width, "height": height, "name": name}


async def run(image: Path, work: Path, accel: str, overlay: Path, userdata: Path) -> dict[str, Any]:
    catalog = json.loads((Path(__file__).parent / "catalog.json").read_text())
    cmdline = catalog["tiny"]["cmdline"]
    result: dict[str, Any] = {"cmdline": cmdline, "accel": accel}

    # ---- first boot
    guest = Guest(image, overlay, work, f"{cmdline} vmgate.hostname=check-one", accel, userdata)
    try:
        result["ready_s"] = round(await guest.wait_for(READY, 120), 2)
        result["prompt_s"] = round(await guest.wait_for(PROMPT, 30), 2)
        await guest.connect()
        await guest.wait_for("userdata-says-check-one", 30)
        result["userdata"] = "ran"
        result["grow"] = "growing / from" in guest.log()
        await asyncio.sleep(1)  # let tty1's prompt be drawn
        ppm = work / "screen.ppm"
        await guest.qmp.execute("screendump", {"filename": str(ppm)})
        for _ in range(50):
            if ppm.exists() and ppm.stat().st_size > 0:
                break
            await asyncio.sleep(0.05)
        width, height, colours = ppm_to_png(ppm.read_bytes(), work / "screen.png")
        result["screen"] = {"width": width, "height": height, "colours": colours, "png": str(work / "screen.png")}
        if colours < 2:
            raise RuntimeError("the VGA screen is blank")
        result["vnc"] = vnc_hello(guest.vnc_path)
        mark = len(guest.log())
        await guest.type("echo typed-$((6*7)) >/dev/ttyS0\n")
        await guest.wait_for("typed-42", 20, after=mark)
        result["keys"] = "ok"
        await guest.type("df -m / >/dev/ttyS0; echo keep-me >/root/keep.txt; sync\n")
        await guest.wait_for("/dev/vda", 20, after=mark)
        size = re.search(r"/dev/vda\s+(\d+)", guest.log()[mark:])
        result["root_fs_mb"] = int(size.group(1)) if size else None
        await asyncio.sleep(0.5)
        result["powerdown_s"] = round(await guest.powerdown(), 2)
        result["first_boot_exit_code"] = guest.proc.returncode
        (work / "serial-1.log").write_text(guest.serial.read_text(errors="replace"))
    finally:
        guest.kill()

    # ---- second boot from the same overlay
    guest = Guest(image, overlay, work, f"{cmdline} vmgate.hostname=check-two", accel, userdata)
    try:
        result["second_ready_s"] = round(await guest.wait_for(READY, 120), 2)
        result["second_prompt_s"] = round(await guest.wait_for(PROMPT, 30), 2)
        await guest.connect()
        await guest.wait_for("user data already ran", 30)
        mark = len(guest.log())
        await guest.type("cat /root/keep.txt >/dev/ttyS0; hostname >/dev/ttyS0\n")
        await guest.wait_for("keep-me", 20, after=mark)
        await guest.wait_for("check-two", 20, after=mark)
        result["persisted"] = "ok"
        await asyncio.sleep(0.5)
        result["second_powerdown_s"] = round(await guest.powerdown(), 2)
        (work / "serial-2.log").write_text(guest.serial.read_text(errors="replace"))
    finally:
        guest.kill()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="directory with boot.bin, disk.qcow2")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, screen.png)")
    parser.add_argument("--accel", default="tcg", help="QEMU accelerator (default tcg)")
    args = parser.parse_args()
    image: Path = args.image.resolve()
    work = Path(tempfile.mkdtemp(prefix="check-tiny-"))
    overlay = work / "ov.qcow2"
    userdata = work / "userdata.sh"
    userdata.write_text("echo userdata-says-$(hostname)\n")
    try:
        base_sum = sha256_of(image / "disk.qcow2")
        qemu_img = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2"]
        subprocess.run([*qemu_img, "-b", str(image / "disk.qcow2"), str(overlay), "1G"], check=True)
        result = asyncio.run(run(image, work, args.accel, overlay, userdata))
        result["base_unchanged"] = sha256_of(image / "disk.qcow2") == base_sum
        if not result["base_unchanged"]:
            raise RuntimeError("the base image changed")
        result["ok"] = True
        code = 0
    except Exception as exc:  # report every failure the same way
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "work": str(work)}
        args.keep = True
        code = 1
    if args.keep:
        result["work"] = str(work)
    else:
        result.get("screen", {}).pop("png", None)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
