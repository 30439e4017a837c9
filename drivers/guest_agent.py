"""A client of the QEMU guest agent (qemu-guest-agent in the guest, a unix socket on the host): files in
and out of a running VM (gateway/web/files.py, docs/CONSOLE.md "Files").

The protocol is QMP's JSON without the greeting: one command per line, one answer per line. A session
starts with ``guest-sync-delimited``, whose answer the agent precedes with a 0xFF byte, so that whatever a
previous client left half-read is skipped. QEMU serves one client on the socket at a time; the caller
holds a per-VM lock around a session.

The guest is not trusted: every answer is read with a line limit (``MAX_LINE``) and a timeout, and one that
is not the JSON expected is ``GuestAgentError``. File contents travel base64-encoded, ``CHUNK`` bytes a
command.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from drivers.base import DriverError

CHUNK = 48 * 1024  # bytes a guest-file-read/-write carries (base64: 64 KiB a line)
MAX_LINE = 256 * 1024  # the longest answer read from the guest
TIMEOUT = 30.0  # seconds for one command's answer
CONNECT_TIMEOUT = 5.0
EXEC_TIMEOUT = 30.0  # seconds a guest-exec (mv, chown) may take
EXEC_POLL = 0.05


class GuestAgentError(DriverError):
    """The agent did not answer, answered with an error, or answered nonsense; the message is the guest's
    error description (safe to show the VM's owner: it is their guest) or what went wrong."""


class GuestAgent:
    """One session with a VM's guest agent: ``async with GuestAgent(path) as agent: ...``."""

    def __init__(self, socket_path: Path | str, timeout: float = TIMEOUT, sync_timeout: float = TIMEOUT) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.sync_timeout = sync_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> GuestAgent:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise GuestAgentError(f"cannot reach the guest agent: {exc}") from exc
        try:
            await self._sync()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), 1.0)
            self._writer = self._reader = None

    async def _send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        assert self._writer is not None
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()

    async def _line(self, timeout: float | None = None, lenient: bool = False) -> Any:
        assert self._reader is not None
        timeout = self.timeout if timeout is None else timeout
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except TimeoutError as exc:
            raise GuestAgentError(f"the guest agent did not answer within {timeout:.0f} s (is the guest still "
                                  "starting, or is its agent stopped?)") from exc
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise GuestAgentError("the guest agent sent an answer longer than allowed") from exc
        except OSError as exc:
            raise GuestAgentError(f"the guest agent's connection failed: {exc}") from exc
        if not line:
            raise GuestAgentError("the guest agent closed the connection")
        try:
            return json.loads(line.lstrip(b"\xff"))
        except ValueError as exc:
            if lenient:
                return None
            raise GuestAgentError("the guest agent sent an answer that is not JSON") from exc

    async def _sync(self) -> None:
        token = secrets.randbelow(2**31)
        await self._send("guest-sync-delimited", {"id": token})
        for _ in range(64):  # skip what an earlier client left unread, up to the answer to this sync
            answer = await self._line(self.sync_timeout, lenient=True)
            if isinstance(answer, dict) and answer.get("return") == token:
                return
        raise GuestAgentError("the guest agent did not answer the sync")

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; its ``return`` value, or ``GuestAgentError`` with the agent's error."""
        await self._send(command, arguments)
        answer = await self._line()
        if not isinstance(answer, dict):
            raise GuestAgentError(f"{command}: an answer that is not an object")
        if "error" in answer:
            error = answer["error"]
            desc = error.get("desc") if isinstance(error, dict) else None
            raise GuestAgentError(str(desc)[:500] if desc else f"{command} failed")
        if "return" not in answer:
            raise GuestAgentError(f"{command}: an answer without a result")
        return answer["return"]

    # ------------------------------------------------------------------ files

    async def open(self, path: str, mode: str) -> int:
        handle = await self.call("guest-file-open", {"path": path, "mode": mode})
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise GuestAgentError("guest-file-open: no handle")
        return handle

    async def close_file(self, handle: int) -> None:
        await self.call("guest-file-close", {"handle": handle})

    async def size(self, handle: int) -> int:
        """The size of an open file (seek to its end, then back to its start)."""
        end = await self.call("guest-file-seek", {"handle": handle, "offset": 0, "whence": "end"})
        await self.call("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"})
        position = end.get("position") if isinstance(end, dict) else None
        if not isinstance(position, int) or position < 0:
            raise GuestAgentError("guest-file-seek: no position")
        return position

    async def write(self, handle: int, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            piece = data[start:start + CHUNK]
            result = await self.call("guest-file-write", {"handle": handle,
                                                          "buf-b64": base64.b64encode(piece).decode()})
            if not isinstance(result, dict) or result.get("count") != len(piece):
                raise GuestAgentError("the guest wrote less than it was sent (is its disk full?)")

    async def read_chunks(self, handle: int, limit: int) -> AsyncIterator[bytes]:
        """The file's contents, ``CHUNK`` bytes at a time; ``GuestAgentError`` past ``limit`` bytes."""
        total = 0
        while True:
            result = await self.call("guest-file-read", {"handle": handle, "count": CHUNK})
            if not isinstance(result, dict) or not isinstance(result.get("buf-b64"), str):
                raise GuestAgentError("guest-file-read: no data")
            try:
                data = base64.b64decode(result["buf-b64"], validate=True)
            except ValueError as exc:
                raise GuestAgentError("guest-file-read: data that is not base64") from exc
            total += len(data)
            if total > limit:
                raise GuestAgentError(f"the file grew past {limit} bytes while it was read")
            if data:
                yield data
            if result.get("eof") or not data:
                return

    async def run(self, argv: list[str], stdin: bytes | None = None, capture: bool = True) -> bytes:
        """Run a program in the guest (guest-exec) and wait for it: its standard output (at most what one
        answer holds); ``GuestAgentError`` unless it exits 0. ``capture=False`` for a program that leaves
        a process behind holding its output open."""
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": capture}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        started = await self.call("guest-exec", arguments)
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise GuestAgentError("guest-exec: no pid")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXEC_TIMEOUT
        while loop.time() < deadline:
            status = await self.call("guest-exec-status", {"pid": pid})
            if isinstance(status, dict) and status.get("exited"):
                if status.get("exitcode") == 0:
                    out = status.get("out-data")
                    try:
                        return base64.b64decode(out) if isinstance(out, str) else b""
                    except ValueError as exc:
                        raise GuestAgentError("guest-exec-status: output that is not base64") from exc
                err = status.get("err-data")
                try:
                    message = base64.b64decode(err).decode(errors="replace").strip() if isinstance(err, str) else ""
                except ValueError:
                    message = ""
                raise GuestAgentError(f"{Path(argv[0]).name} failed in the guest: {message[:300] or 'exit status'}")
            await asyncio.sleep(EXEC_POLL)
        raise GuestAgentError(f"{Path(argv[0]).name} did not finish in the guest within {EXEC_TIMEOUT:.0f} s")
