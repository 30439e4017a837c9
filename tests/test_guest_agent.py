"""The guest agent client against guests that misbehave (drivers/guest_agent.py): a guest answers garbage, too
much, or nothing, and the client fails that transfer with GuestAgentError, bounded in memory and time. A
unix socket server here plays the guest; the real agent is exercised in tests/test_desktop.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from drivers import guest_agent
from drivers.guest_agent import GuestAgent, GuestAgentError

Guest = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(path: Path, guest: Guest) -> asyncio.AbstractServer:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await guest(reader, writer)
        except (ConnectionError, AssertionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(connection, path=str(path))


async def synced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the sync as qemu-ga does (0xFF, then the id)."""
    request = json.loads(await reader.readline())
    writer.write(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
    await writer.drain()


@pytest.fixture
async def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    yield Path(tmp_path_factory.mktemp("qga", numbered=True))


async def test_a_well_behaved_guest(socket_dir: Path) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"leftover from an earlier client\n")
        await synced(reader, writer)
        request = json.loads(await reader.readline())
        assert request == {"execute": "guest-file-open", "arguments": {"path": "/x", "mode": "r"}}
        writer.write(b'{"return": 7}\n')
        await writer.drain()

    server = await serve(socket_dir / "a.sock", guest)
    async with server, GuestAgent(socket_dir / "a.sock") as agent:
        assert await agent.open("/x", "r") == 7


@pytest.mark.parametrize("answer, message", [
    (b"not json\n", "not JSON"),
    (b'{"error": {"class": "GenericError", "desc": "No such file or directory"}}\n', "No such file"),
    (b'{"return": "seven"}\n', "no handle"),
    (b"x" * (guest_agent.MAX_LINE + 10) + b"\n", "longer than allowed"),
    (b"", "closed the connection"),
])
async def test_a_guest_answering_nonsense_fails_the_call(socket_dir: Path, answer: bytes, message: str) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await synced(reader, writer)
        await reader.readline()
        writer.write(answer)
        await writer.drain()
        if not answer:
            writer.close()

    path = socket_dir / "b.sock"
    server = await serve(path, guest)
    async with server, GuestAgent(path) as agent:
        with pytest.raises(GuestAgentError, match=message):
            await agent.open("/x", "r")


async def test_a_silent_guest_times_out(socket_dir: Path) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; gone when the client gives up

    path = socket_dir / "c.sock"
    server = await serve(path, guest)
    async with server:
        with pytest.raises(GuestAgentError, match="did not answer within"):
            async with GuestAgent(path, sync_timeout=0.5):
                pass
    with pytest.raises(GuestAgentError, match="cannot reach"):
        async with GuestAgent(socket_dir / "missing.sock"):
            pass


async def test_a_file_growing_past_the_limit_is_cut(socket_dir: Path) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await synced(reader, writer)
        while await reader.readline():  # endless data, never eof
            writer.write(b'{"return": {"count": 4, "buf-b64": "AAAAAA==", "eof": false}}\n')
            await writer.drain()

    path = socket_dir / "d.sock"
    server = await serve(path, guest)
    async with server, GuestAgent(path) as agent:
        with pytest.raises(GuestAgentError, match="grew past 10 bytes"):
            async for _ in agent.read_chunks(1, limit=10):
                pass
