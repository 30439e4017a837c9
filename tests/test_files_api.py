"""File transfers' refusals (gateway/web/files.py), on the fake driver: what is checked before a guest agent is
reached. The transfers themselves run against a real desktop VM in tests/test_desktop.py."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any

import psycopg2
import pytest

from gateway.config import Settings
from tests.conftest import VM, Session, assert_envelope, fake_gateway

FILES = "/api/vms/{}/files"


@pytest.fixture
async def alice(server: Any, sessions: Any) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login()
    return session


async def running(session: Session) -> str:
    status, vm = await session.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    return str(vm["vm_id"])


@pytest.mark.parametrize("path", ["", "relative/file", "/etc/", "/tmp/..", "/tmp/a\nb", "/" + "x" * 1100])
async def test_a_bad_path_is_422(server: Any, alice: Session, path: str) -> None:
    vm_id = await running(alice)
    for method in ("GET", "PUT"):
        error = assert_envelope(*await alice.request(method, FILES.format(vm_id), params={"path": path}, data=b"x"),
                                422, "validation_failed")
        assert error["details"] == {"field": "path"}


async def test_transfers_need_a_guest_agent_the_gateway_reaches(server: Any, alice: Session) -> None:
    vm_id = await running(alice)
    # The fake driver, like the nomad driver, has no guest agent socket on the gateway's host.
    for method in ("GET", "PUT"):
        error = assert_envelope(*await alice.request(method, FILES.format(vm_id), params={"path": "/root/a"},
                                                     data=b"x"), 409, "not_supported")
        assert "guest agent" in error["message"]


async def test_someone_elses_vm_is_404_and_logged_out_is_401(server: Any, alice: Session, sessions: Any) -> None:
    vm_id = await running(alice)
    bob: Session = sessions(server)
    await bob.signup_and_login()
    assert_envelope(*await bob.request("GET", FILES.format(vm_id), params={"path": "/etc/hostname"}), 404)
    assert_envelope(*await bob.request("PUT", FILES.format(vm_id), params={"path": "/root/x"}, data=b"x"), 404)
    anonymous: Session = sessions(server)
    assert_envelope(*await anonymous.request("GET", FILES.format(vm_id), params={"path": "/etc/hostname"}), 401)


async def test_a_stopped_vm_is_409(server: Any, alice: Session) -> None:
    vm_id = await running(alice)
    status, _ = await alice.request("POST", f"/api/vms/{vm_id}/stop?wait=60")
    assert status == 200
    assert_envelope(*await alice.request("GET", FILES.format(vm_id), params={"path": "/etc/hostname"}), 409,
                    "vm_not_running")


async def test_transfers_turned_off(aiohttp_server: Any, app_settings: Settings, database_url: str,
                                    fake_driver: Any, sessions: Any) -> None:
    off = await fake_gateway(aiohttp_server, dataclasses.replace(app_settings, file_transfer_max_mb=0),
                             database_url, fake_driver)
    session: Session = sessions(off)
    await session.signup_and_login()
    vm_id = await running(session)
    error = assert_envelope(*await session.request("PUT", FILES.format(vm_id), params={"path": "/root/a"},
                                                   data=b"x"), 409, "not_supported")
    assert "turned off" in error["message"]


async def test_an_upload_too_large_or_of_unknown_length_or_past_the_quota_is_refused(
        aiohttp_server: Any, app_settings: Settings, database_url: str, fake_driver: Any, sessions: Any) -> None:
    small = await fake_gateway(aiohttp_server, dataclasses.replace(app_settings, file_transfer_max_mb=1),
                               database_url, fake_driver)
    session: Session = sessions(small)
    await session.signup_and_login()
    vm_id = await running(session)
    url = FILES.format(vm_id)
    error = assert_envelope(*await session.request("PUT", url, params={"path": "/root/big"},
                                                   data=io.BytesIO(b"x" * (1024 * 1024 + 1))), 413, "file_too_large")
    assert error["details"] == {"limit": 1024 * 1024, "size": 1024 * 1024 + 1}

    async def chunked() -> Any:
        yield b"x" * 10

    assert_envelope(*await session.request("PUT", url, params={"path": "/root/a"}, data=chunked()), 411,
                    "length_required")
    # Past the storage quota (the user's own, lowered to nothing): refused before a byte reaches the guest.
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET quota_storage_gb = 0")
    error = assert_envelope(*await session.request("PUT", url, params={"path": "/root/a"},
                                                   data=io.BytesIO(b"x" * 1000)), 403, "quota_exceeded")
    assert "This upload does not fit your storage quota" in error["message"]
