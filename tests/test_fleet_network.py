"""Outbound networks of fleet VMs (issue 15, docs/NETWORK.md "Fleet nodes") on a real Nomad agent: jobs
rendered for the nomad target with ``network: outbound`` run in allocations on the CNI network ``vmgate``
(the configuration drivers/fleetnet.py prints, Debian's CNI plugins), behind the node rules it prints.

From inside a guest (typed on its console over QMP, answers read from its serial log): it has 10.0.2.15 and
a default route, reaches the test's "outside" server (through the node, masqueraded), and reaches neither
the node itself (a server on one of its addresses, and the bridge's address), nor a private range, nor the
metadata address, nor the other VM's allocation. The node reaches that other allocation's VNC, and the
console's mapped port on the node answers RFB. The rules' counters rise.

Consul is not needed: the jobs' Consul service is left out (tests/test_fleet_integration.py covers it).
Skips without ``nomad`` on PATH (DESIGN.md: built beside the project, never in it) or Debian's CNI plugins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from drivers import fleetnet
from jobspecs import JobSettings, Template, VMSpec, render_job
from jobspecs.render import TASK_NAME
from tests import test_fleet_integration, test_network
from tests.conftest import kill_qemu_under
from tests.fixtures.qemu import type_text
from tests.test_e2e import READY
from tests.test_fleet_integration import (
    CNI_MISSING,
    CNI_PATH,
    MISSING,
    OVERSUBSCRIPTION,
    Agent,
    _get,
    _nomad_hcl,
    _ready_qemu_nodes,
    _start,
    _stop,
    _until,
    destroy_all,
)
from tests.test_network import HOST_SIDE, OUTSIDE, PORT, PRIVATE, PROBE, Namespace, sh

# The namespaces of tests/test_network.py ("outside", "private"), each with a logging server (fixtures).
net_host, namespaces, outside = test_network.net_host, test_network.namespaces, test_network.outside
node_rules = test_fleet_integration.node_rules  # the node rules, installed on this host for the test

MBIT = 2  # the test network's bandwidth cap, each way

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif("nomad" in MISSING, reason="nomad not on PATH: built beside the project (DESIGN.md)"),
    pytest.mark.skipif(bool(CNI_MISSING), reason=f"Debian's CNI plugins lack {CNI_MISSING} in {CNI_PATH}"),
]


@pytest.fixture
async def cni_agent(tiny_images_dir: Path, vms_root: Path, node_rules: str) -> AsyncIterator[Agent]:
    """``nomad agent -dev`` with the qemu plugin and the CNI network ``vmgate`` (bandwidth capped at MBIT)."""
    agent_dir = Path(tempfile.mkdtemp(prefix="vgc", dir="/tmp"))  # short: the allocations' unix sockets
    hcl, http = _nomad_hcl(agent_dir / "nomad", None, vms_root, tiny_images_dir, cni_mbit=MBIT,
                           extra=f"server {{{OVERSUBSCRIPTION}}}")
    (agent_dir / "nomad.hcl").write_text(hcl)
    had_bridge = Path("/sys/class/net", fleetnet.BRIDGE).exists()
    agent = _start("nomad", ["nomad", "agent", "-dev", f"-config={agent_dir / 'nomad.hcl'}"],
                   agent_dir / "nomad.log", http)
    agent.data_dir = agent_dir / "nomad"  # type: ignore[attr-defined]
    try:
        await _ready_qemu_nodes(agent, 1)
        yield agent
    finally:
        with contextlib.suppress(Exception):  # a failed test's VMs: Nomad tears their networks down
            await destroy_all(agent, timeout=30)
        _stop(agent)
        kill_qemu_under(agent_dir)
        sh("rm", "-rf", str(agent_dir), check=False)
        if not had_bridge:  # a node keeps it; this host gets back what it had
            sh("ip", "link", "del", fleetnet.BRIDGE, check=False)


async def run_vm(agent: Agent, template: Template, vms_root: Path, vm_id: str) -> dict[str, Any]:
    """Submit an outbound tiny VM's job (without its Consul service); its running allocation."""
    overlay = vms_root / f"{vm_id}.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template.disk), "-F", "qcow2", str(overlay), "1G")
    spec = VMSpec.for_template(template, id=vm_id, owner="test", overlay_path=overlay, network="outbound")
    job = render_job(spec, template, JobSettings(target="nomad", task_user=""))
    group = job["TaskGroups"][0]
    assert group["Networks"][0]["Mode"] == "cni/vmgate"
    group.pop("Services")
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{agent.http}/v1/jobs", json={"Job": job}) as resp:
            assert resp.status == 200, await resp.text()

        async def running() -> Any:
            status, allocs = await _get(http, f"{agent.http}/v1/job/{job['ID']}/allocations")
            live = [a for a in allocs if a.get("ClientStatus") == "running"] if status == 200 else []
            return live and (await _get(http, f"{agent.http}/v1/allocation/{live[0]['ID']}"))[1]

        alloc: dict[str, Any] = await _until(f"{job['ID']} running", running, 90, agent)
        return alloc


class Guest:
    """A running fleet VM seen from the node: its console (QMP) and its serial log (the task's stdout)."""

    def __init__(self, agent: Agent, alloc: dict[str, Any]) -> None:
        root = agent.data_dir / "alloc" / alloc["ID"]  # type: ignore[attr-defined]
        self.qmp = root / TASK_NAME / "local" / "qmp.sock"
        self.serial = root / "alloc" / "logs" / f"{TASK_NAME}.stdout.0"
        self.alloc = alloc
        net = alloc["AllocatedResources"]["Shared"]
        self.ports = net.get("Ports") or []

    def log(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    async def wait_for(self, needle: str, after: int = 0, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log()[after:]
            if needle in tail:
                return tail
            await asyncio.sleep(0.2)
        stderr = self.serial.with_name(f"{TASK_NAME}.stderr.0")
        errors = stderr.read_text(errors="replace")[-2000:] if stderr.exists() else ""
        raise AssertionError(f"{needle!r} not on the serial console in {timeout} s:\n{self.log()[-1500:]}\n"
                             f"--- QEMU's stderr:\n{errors}")

    async def run(self, command: str, done: str, timeout: float = 60) -> str:
        before = len(self.log())
        await type_text(self.qmp, command + "\n", hold_ms=10)
        return await self.wait_for(done, before, timeout)


def alloc_ip(guest: Guest) -> str:
    """The allocation's address on the bridge (Nomad reports the node's; CNI's result has the namespace's)."""
    status = guest.alloc.get("NetworkStatus") or {}
    return str(status.get("Address") or "")


def counters(family: str) -> dict[str, int]:
    """Packets each commented rule of the node's table of ``family`` counted."""
    return test_network.counters(json.loads(sh("nft", "-j", "list", "table", family, fleetnet.TABLE)))


def rfb_banner(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as conn:
        return conn.recv(12)


async def test_an_outbound_fleet_vm_reaches_the_outside_and_nothing_of_the_node_or_other_vms(
        cni_agent: Agent, outside: dict[str, Namespace], tiny_template: Template, vms_root: Path) -> None:
    first, second = await asyncio.gather(run_vm(cni_agent, tiny_template, vms_root, "fleetnet-a"),
                                         run_vm(cni_agent, tiny_template, vms_root, "fleetnet-b"))
    guest, other = Guest(cni_agent, first), Guest(cni_agent, second)
    await asyncio.gather(guest.wait_for(READY), other.wait_for(READY))
    other_ip = alloc_ip(other)
    assert other_ip.startswith("10.236."), other.alloc.get("NetworkStatus")
    # The node reaches the other VM's VNC in its namespace, and the console's mapped port on the node answers.
    assert rfb_banner(other_ip, 5900).startswith(b"RFB ")
    mapped = [p for p in guest.ports if p.get("Label") == "vnc"]
    assert mapped and mapped[0]["To"] == 5900, guest.ports
    assert rfb_banner(mapped[0]["HostIP"], mapped[0]["Value"]).startswith(b"RFB ")

    shown = await guest.run("ip -4 addr show eth0 >/dev/ttyS0; ip route >/dev/ttyS0; echo net-shown-$((6*7)) "
                            ">/dev/ttyS0", "net-shown-42")
    assert "inet 10.0.2.15/24" in shown and "default via 10.0.2." in shown, shown

    before = {"inet": counters("inet"), "bridge": counters("bridge")}
    with contextlib.closing(socket.create_server((HOST_SIDE, PORT + 2))) as node_server:
        node_server.settimeout(0)
        targets = {"outside": (OUTSIDE, PORT), "node": (HOST_SIDE, PORT + 2), "bridge": ("10.236.0.1", PORT + 2),
                   "private": (PRIVATE, PORT), "metadata": ("169.254.169.254", 80), "other-vm": (other_ip, 5900)}
        await guest.run(f"{PROBE}; echo defined-$((6*7)) >/dev/ttyS0", "defined-42")
        tries = " ".join(f"p {address} {port} {tag} &" for tag, (address, port) in targets.items())
        out = await guest.run(f"{tries} sleep 6; echo probes-over-$((6*7)) >/dev/ttyS0", "probes-over-42")
        with pytest.raises(BlockingIOError):
            node_server.accept()  # nothing from the VM got to the node's own server
    assert "REACHED-outside" in out, out
    for tag in ("node", "bridge", "private", "metadata", "other-vm"):
        assert f"BLOCKED-{tag}" in out, out
    await asyncio.sleep(0.3)
    peers = {c["peer"] for c in outside["outside"].connections()}
    assert peers == {HOST_SIDE}, peers  # masqueraded to the node's address on the way out
    after = {"inet": counters("inet"), "bridge": counters("bridge")}
    for family, name in (("inet", "to-host"), ("inet", "private"), ("bridge", "vm-to-vm")):
        assert after[family][name] > before[family][name], (family, name, before, after)

    # The CNI bandwidth plugin's token buckets hold the cap each way (tests/test_network.py does the same locally).
    outside["outside"].log.write_text("")
    await guest.run(f"dd if=/dev/zero bs=1024 count=512 2>/dev/null | nc -w 3 {OUTSIDE} {PORT} >/dev/null; "
                    "echo upload-done-$((6*7)) >/dev/ttyS0", "upload-done-42", timeout=120)
    [upload] = await test_network.eventually(outside["outside"].connections, 20)
    outside["outside"].log.write_text("")
    out = await guest.run(f"echo send 262144 | nc -w 5 {OUTSIDE} {PORT} | wc -c >/dev/ttyS0; "
                          "echo download-done-$((6*7)) >/dev/ttyS0", "download-done-42", timeout=120)
    [download] = await test_network.eventually(outside["outside"].connections, 20)
    assert str(262144 + len("vmgate-outside-hello\n")) in out, out
    assert upload["bytes"] == 512 * 1024
    for way, bytes_, seconds in (("upload", upload["bytes"], upload["seconds"]),
                                 ("download", download["sent"], download["seconds"])):
        rate = bytes_ * 8 / seconds / 1e6
        print(f"fleet {way} of {bytes_} bytes at a {MBIT} Mbit/s cap: {rate:.2f} Mbit/s over {seconds:.1f} s")
        assert 0.25 * MBIT < rate <= MBIT * 1.15, (way, rate)

    # Destroying the VMs (purging their jobs) takes their namespaces, links and port maps with them (CNI DEL).
    assert len(await destroy_all(cni_agent)) == 2
    assert not [link for link in sh("ip", "-br", "link").splitlines() if link.startswith(("veth", "bwp"))]
