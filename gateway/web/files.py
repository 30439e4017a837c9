"""Files into and out of a running VM: ``PUT`` and ``GET /api/vms/{vm_id}/files?path=/abs/path``
(docs/API.md "Files", docs/CONSOLE.md "Files").

The bytes go through the VM's QEMU guest agent (drivers/guest_agent.py): the local driver's VMs of a
template with ``"agent": true`` (debian-12, debian-12-desktop). What bounds a transfer:

- **size**: FILE_TRANSFER_MAX_MB a file, either way; an upload also needs room in the owner's storage
  quota (it lands in the VM's overlay, which the quota counts), checked before a byte is sent;
- **one at a time per VM** (a Redis lock; QEMU serves one agent client anyway), so a user has at most as
  many transfers at once as VMs (QUOTA_MAX_VMS);
- **the files_user rate limit** (transfers started per user);
- **the guest**: every answer is bounded and timed (a hostile guest can fail a transfer, not the gateway).

An upload is written next to its target under a temporary name and moved into place by the guest's
``mv`` when every byte arrived, then given the directory's owner: an interrupted upload leaves the
target as it was. Every transfer, finished or not, is in the audit log (path, bytes, sha256).
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import urllib.parse
from typing import Any

from aiohttp import web

from drivers.base import DriverError, NotSupported
from drivers.guest_agent import CHUNK, GuestAgent, GuestAgentError
from gateway.errors import ApiError, BadRequest, Conflict, NotFound, ValidationFailed
from gateway.rows import UserRecord
from gateway.web import quota, ratelimit, vms
from gateway.web.appkeys import driver_key, redis_key, settings_key
from gateway.web.http import client_ip, json_response, owned_vm

routes = web.RouteTableDef()

MAX_PATH = 1024
LOCK_TTL = 3600  # seconds: a transfer's lock outlives no crashed gateway by more than this
RESUME_WAIT = 30  # seconds a transfer waits for its suspended VM to resume
SYNC_TIMEOUT = 5.0  # seconds the guest agent has to answer at all (a booting guest has none yet)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class TooLarge(ApiError):
    status, code = 413, "file_too_large"


class LengthRequired(ApiError):
    status, code = 411, "length_required"


def _path(request: web.Request) -> str:
    path = request.query.get("path", "")
    if not path.startswith("/") or len(path.encode()) > MAX_PATH or not path.isprintable() \
            or path.endswith("/") or posixpath.basename(posixpath.normpath(path)) in ("", ".", ".."):
        raise ValidationFailed(f"path: an absolute path of a file in the VM, at most {MAX_PATH} bytes, without "
                               "control characters", details={"field": "path"})
    return posixpath.normpath(path)


def _guest_error(exc: GuestAgentError, path: str) -> ApiError:
    message = str(exc)
    if "No such file or directory" in message:
        return NotFound(f"{path}: no such file or directory in the VM.", code="file_not_found",
                        details={"path": path})
    return Conflict(f"The VM's guest agent refused or failed: {message}", code="guest_error",
                    details={"path": path, "reason": message})


class _Transfer:
    """What every transfer does first: ``check`` (the caller's VM, the path, the rate limit), then ``begin``
    (the VM running, woken if suspended; its agent's socket; the VM's transfer lock, which ``end`` frees)."""

    def __init__(self, request: web.Request, direction: str) -> None:
        self.request, self.direction = request, direction
        self.app = request.app
        self.lock_key = ""
        self.lock_token = secrets.token_hex(16)

    async def check(self) -> UserRecord:
        """Who asks, for which VM and path: before anything is woken or locked."""
        self.user, self.vm = await owned_vm(self.request)
        if self.app[settings_key].file_transfer_max_mb == 0:
            raise Conflict("File transfers are turned off on this installation.", code="not_supported")
        self.path = _path(self.request)
        await ratelimit.limit(self.request, "files_user", str(self.user["id"]))
        return self.user

    async def begin(self) -> Any:
        """The VM running, its agent's socket, the VM's transfer lock: the socket's path."""
        vm = await vms.awake(self.app, self.vm, RESUME_WAIT, poll=0.05)
        vm_id = str(vm["id"])
        if vm["state"] != "running":
            raise Conflict(f"The VM is {vm['state']}; start it to move files in or out.", code="vm_not_running",
                           details={"state": vm["state"]})
        try:
            socket = await self.app[driver_key].guest_agent(vm_id)
        except NotSupported as exc:
            raise Conflict(f"File transfer is not available for this VM: {exc}.", code="not_supported") from exc
        except DriverError as exc:
            raise Conflict(f"The VM is not running: {exc}.", code="vm_not_running") from exc
        self.lock_key = f"vmgate:files:{vm_id}"
        if not await self.app[redis_key].set(self.lock_key, self.lock_token, nx=True, ex=LOCK_TTL):
            raise Conflict("Another file transfer of this VM is under way; try again when it is done.",
                           code="transfer_busy")
        self.vm = vm
        return socket

    async def end(self) -> None:
        if self.lock_key:
            await self.app[redis_key].eval(_RELEASE, 1, self.lock_key, self.lock_token)
            self.lock_key = ""

    async def audit(self, outcome: str, **details: Any) -> None:
        await vms.audit(self.app, f"vm.file.{self.direction}", outcome, self.user, client_ip(self.request),
                        str(self.vm["id"]), path=self.path, **details)


@routes.put("/api/vms/{vm_id}/files")
async def upload(request: web.Request) -> web.Response:
    transfer = _Transfer(request, "upload")
    try:
        user = await transfer.check()
        limit = request.app[settings_key].file_transfer_max_mb * quota.MIB
        size = request.content_length
        if size is None:
            raise LengthRequired("Send the file with a Content-Length.")
        if size > limit:
            raise TooLarge(f"The file is {size} bytes; at most {limit} bytes go into a VM at once.",
                           details={"limit": limit, "size": size})
        await quota.require_storage(request.app, user, size, "This upload")
        return await _upload(request, transfer, await transfer.begin(), size)
    finally:
        await transfer.end()


async def _upload(request: web.Request, transfer: _Transfer, socket: Any, size: int) -> web.Response:
    path = transfer.path
    partial = f"{path}.vmgate-upload-{secrets.token_hex(4)}"
    digest, received, placed = hashlib.sha256(), 0, False
    try:
        async with GuestAgent(socket, sync_timeout=SYNC_TIMEOUT) as agent:
            handle = await agent.open(partial, "w")
            try:
                buffer = b""
                async for piece in request.content.iter_chunked(CHUNK):
                    received += len(piece)
                    if received > size:
                        raise BadRequest("The body is longer than its Content-Length.")
                    digest.update(piece)
                    buffer += piece
                    if len(buffer) >= CHUNK:
                        await agent.write(handle, buffer)
                        buffer = b""
                await agent.write(handle, buffer)
            finally:
                await agent.close_file(handle)
            if received != size:
                raise BadRequest(f"The upload ended after {received} of {size} bytes.")
            await agent.run(["/bin/mv", "-f", "-T", "--", partial, path])
            placed = True
            await agent.run(["/bin/chown", f"--reference={posixpath.dirname(path)}", "--", path])
    except GuestAgentError as exc:
        await _discard(socket, partial, placed)
        await transfer.audit("failed", bytes=received, reason=str(exc))
        raise _guest_error(exc, path) from exc
    except BaseException as exc:
        await _discard(socket, partial, placed)
        await transfer.audit("failed", bytes=received, reason=type(exc).__name__)
        raise
    await transfer.audit("ok", bytes=size, sha256=digest.hexdigest())
    return json_response({"path": path, "size": size, "sha256": digest.hexdigest()}, status=201)


async def _discard(socket: Any, partial: str, placed: bool) -> None:
    """Remove an upload's partial file from the guest (best effort: the guest may be gone)."""
    if placed:
        return
    try:
        async with GuestAgent(socket, sync_timeout=SYNC_TIMEOUT) as agent:
            await agent.run(["/bin/rm", "-f", "--", partial])
    except (GuestAgentError, OSError):
        pass


@routes.get("/api/vms/{vm_id}/files")
async def download(request: web.Request) -> web.StreamResponse:
    transfer = _Transfer(request, "download")
    try:
        await transfer.check()
        return await _download(request, transfer, await transfer.begin())
    finally:
        await transfer.end()


async def _download(request: web.Request, transfer: _Transfer, socket: Any) -> web.StreamResponse:
    path, limit = transfer.path, request.app[settings_key].file_transfer_max_mb * quota.MIB
    digest, sent = hashlib.sha256(), 0
    response: web.StreamResponse | None = None
    try:
        async with GuestAgent(socket, sync_timeout=SYNC_TIMEOUT) as agent:
            handle = await agent.open(path, "r")
            try:
                size = await agent.size(handle)
                if size > limit:
                    raise TooLarge(f"{path} is {size} bytes; at most {limit} bytes come out of a VM at once.",
                                   details={"limit": limit, "size": size})
                response = web.StreamResponse(headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Disposition": "attachment; filename*=UTF-8''"
                                           + urllib.parse.quote(posixpath.basename(path), safe=""),
                    "Content-Length": str(size), "Cache-Control": "no-store",
                    "X-Content-Type-Options": "nosniff"})
                await response.prepare(request)
                async for piece in agent.read_chunks(handle, limit):
                    piece = piece[:size - sent]
                    digest.update(piece)
                    sent += len(piece)
                    await response.write(piece)
                    if sent >= size:
                        break
            finally:
                await agent.close_file(handle)
    except GuestAgentError as exc:
        await transfer.audit("failed", bytes=sent, reason=str(exc))
        if response is None:
            raise _guest_error(exc, path) from exc
        # The headers are out: all that is left is to cut the response short (the client sees fewer bytes
        # than Content-Length said).
        if request.transport is not None:
            request.transport.close()
        return response
    except BaseException as exc:
        await transfer.audit("failed", bytes=sent, reason=type(exc).__name__)
        raise
    await transfer.audit("ok" if sent == size else "failed", bytes=sent, sha256=digest.hexdigest())
    assert response is not None  # every path above answered or raised
    await response.write_eof()
    return response
