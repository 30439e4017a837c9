"""The fleet path against real agents: `consul agent -dev` and `nomad agent -dev` (the qemu plugin
configured like nomad/client.hcl) started here, the gateway on VMGATE_DRIVER=nomad. Create a tiny VM
through the API, see Nomad run it with the qemu driver and Consul list its VNC service (check
passing), open its console through websockify with an RFB client, read its serial console from the
allocation's logs, stop, start, destroy, and find nothing left in Nomad or Consul.

Skips, saying why, when `nomad` or `consul` is not on PATH. Everything listens on 127.0.0.1, on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from console.rfb import RFBClient, RFBError
from drivers import fleetnet
from drivers.local.network import NetworkConfig
from gateway.cli.jobspec import client_allowlist
from gateway.config import Settings
from gateway.web.app import create_app, driver_from_settings
from gateway.web.appkeys import engine_key
from jobspecs import vnc_password
from tests.conftest import VM, Session, kill_qemu_under, truncate_all
from tests.fixtures.websockify import WebsockifyServer, free_port
from tests.test_e2e import READY, open_console, wait_for_screen, wait_for_serial

AGENT_TIMEOUT = 60.0
# VM tasks run as the agent's own user here, not as the fleet's `vmgate` account (NOMAD_TASK_USER): this
# machine has no such account, and the test's gateway (root) creates the overlays, 0600 and root's. On a
# fleet the gateway runs as that account too (nomad/vmgate.nomad.hcl). Nomad parsing the `user` field is
# checked by tests/test_jobspecs.py's `nomad job run -output` test.
AS_AGENT = ""
MISSING = [name for name in ("nomad", "consul") if shutil.which(name) is None]
SKIP_REASON = (f"{' and '.join(MISSING)} not on PATH: the fleet integration test needs real Nomad and Consul "
               "agent binaries (DESIGN.md: build them beside the project, never in it)")

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(bool(MISSING), reason=SKIP_REASON)]


@dataclass
class Agent:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    http: str

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _start(name: str, argv: list[str], log_path: Path, http: str) -> Agent:
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Agent(name, process, log_path, http)


def cni_leftovers(alloc_ids: set[str]) -> list[str]:
    """What CNI made for these allocations that is still on the node: namespaces, cached results, port maps."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    found = [f"netns {n}" for n in out("ip", "netns", "list").split() if n in alloc_ids]
    results = Path("/var/lib/cni/results")
    found += [f"cni result {r.name}" for r in results.glob("vmgate-*") if any(a in r.name for a in alloc_ids)]
    nat = out("iptables", "-t", "nat", "-S")
    found += [f"port map {line}" for line in nat.splitlines() if "DNAT" in line and "10.236." in line]
    return found


async def destroy_all(agent: Agent, timeout: float = 60) -> set[str]:
    """Purge every job of the agent and wait until their allocations are over and their networks gone;
    returns the allocations' IDs."""
    async with aiohttp.ClientSession() as http:
        status, jobs = await _get(http, f"{agent.http}/v1/jobs")
        assert status == 200, jobs
        alloc_ids: set[str] = set()
        for job in jobs:
            _, allocs = await _get(http, f"{agent.http}/v1/job/{job['ID']}/allocations")
            alloc_ids |= {a["ID"] for a in allocs}
            async with http.delete(f"{agent.http}/v1/job/{job['ID']}", params={"purge": "true"}) as resp:
                assert resp.status == 200, await resp.text()

        async def gone() -> bool:
            return not cni_leftovers(alloc_ids)

        await _until("the VMs' namespaces, CNI results and port maps going", gone, timeout, agent)
    return alloc_ids


def _stop(agent: Agent) -> None:
    if agent.process.poll() is None:
        agent.process.send_signal(signal.SIGINT)  # a graceful leave; a dev client destroys its allocations
        try:
            agent.process.wait(30)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait()
    _kill_session(agent.process.pid)
    # A client that is not -dev leaves its executors running on SIGINT (to re-attach after a restart); and
    # they are sessions of their own. The test's agents are done for good.
    where = str(agent.log_path.parent)
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if proc.name.isdigit() and len(argv) > 2 and argv[1] in (b"executor", b"logmon") \
                    and where.encode() in b" ".join(argv):
                os.kill(int(proc.name), signal.SIGKILL)


def _kill_session(session_id: int) -> None:
    """Kill what the agent left in its session: Nomad's logmon and executor plugins outlive an agent
    that died abruptly (by design, to be re-attached), and nothing else would ever stop them."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Field 6 of /proc/PID/stat is the session id; the command name (field 2) may hold spaces.
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session_id:
                os.kill(int(proc.name), signal.SIGKILL)


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def _until(what: str, probe: Any, timeout: float, agent: Agent | None = None) -> Any:
    """Poll ``probe()`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            last = await probe()
            if last:
                return last
        await asyncio.sleep(0.5)
    tail = f"\n--- {agent.name} log:\n{agent.log_tail()}" if agent else ""
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s (last: {last!r}){tail}")


@pytest.fixture
def agent_dir() -> Iterator[Path]:
    # Short: the allocation's unix sockets (qmp.sock, Nomad's qm.sock) must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="vgn", dir="/tmp"))
    yield path
    kill_qemu_under(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def consul_agent(agent_dir: Path) -> AsyncIterator[Agent]:
    http = free_port()
    config = agent_dir / "consul.json"
    config.write_text(json.dumps({
        "ports": {"http": http, "dns": -1, "grpc": free_port(), "grpc_tls": -1, "serf_lan": free_port(),
                  "serf_wan": free_port(), "server": free_port()},
    }))
    agent = _start("consul", ["consul", "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                              f"-config-file={config}"], agent_dir / "consul.log", f"http://127.0.0.1:{http}")
    try:
        async with aiohttp.ClientSession() as client:
            async def leader() -> Any:
                status, body = await _get(client, f"{agent.http}/v1/status/leader")
                return status == 200 and body

            await _until("consul electing itself leader", leader, AGENT_TIMEOUT, agent)
        yield agent
    finally:
        _stop(agent)


@dataclass
class AgentHead:
    """The start of an agent's configuration: its data dir, loopback and free ports."""

    hcl: str
    http: str  # its HTTP address
    rpc: int  # its RPC port (clients join a server there)


# Debian's containernetworking-plugins: with them the agents have the CNI network `vmgate` (drivers/fleetnet.py)
# and the gateway gives fleet VMs outbound networks (NOMAD_OUTBOUND); without them VMs are `none`.
CNI_PATH = Path("/usr/lib/cni")
CNI_MISSING = [name for name in ("bridge", "host-local", "loopback", "portmap", "bandwidth")
               if not (CNI_PATH / name).exists()]


def cni_client(directory: Path, mbit: int = 100) -> str:
    """A client's HCL lines for the CNI network `vmgate`, whose conflist (as `vmgate fleet-node conflist` prints
    it, bandwidth capped at ``mbit``) goes to ``directory``; nothing without the CNI plugins."""
    if CNI_MISSING:
        return ""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vmgate.conflist").write_text(json.dumps(fleetnet.conflist(NetworkConfig(bandwidth_mbit=mbit))))
    return f'  cni_path       = "{CNI_PATH}"\n  cni_config_dir = "{directory}"'


@pytest.fixture
def node_rules() -> Iterator[str]:
    """The node rules (`vmgate fleet-node rules`), installed on this host as a node's nftables.service would."""
    rules = fleetnet.node_rules(NetworkConfig(dns=(), conn_rate=50, conn_max=1024))
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        yield rules
    finally:
        for family in ("inet", "bridge"):
            subprocess.run(["nft", "delete", "table", family, fleetnet.TABLE], check=False, capture_output=True)


# As nomad/server.hcl: VM jobs' memory_max (QEMU's own memory above the guest's) is their hard limit.
OVERSUBSCRIPTION = """
  default_scheduler_config {
    memory_oversubscription_enabled = true
  }
"""


def _agent_head(data_dir: Path) -> AgentHead:
    http, rpc, serf = free_port(), free_port(), free_port()
    hcl = f"""
data_dir  = "{data_dir}"
bind_addr = "127.0.0.1"
ports {{
  http = {http}
  rpc  = {rpc}
  serf = {serf}
}}
"""
    return AgentHead(hcl, f"http://127.0.0.1:{http}", rpc)


def _nomad_hcl(data_dir: Path, consul: Agent | None, vms_root: Path, images: Path, *, extra: str = "",
               client_extra: str = "", cni_mbit: int = 100) -> tuple[str, str]:
    """An agent's configuration (HCL) and its HTTP address: on loopback, free ports, the qemu plugin like
    nomad/client.hcl with image_paths = the images and the test's VMS_ROOT, the CNI network `vmgate` where
    the plugins are (bandwidth capped at ``cni_mbit``), Consul's agent unless ``consul`` is None."""
    consul_block = f'consul {{\n  address = "{consul.http.removeprefix("http://")}"\n}}' if consul else ""
    head = _agent_head(data_dir)
    allowlist = ", ".join(json.dumps(flag) for flag in sorted(client_allowlist()))
    return head.hcl + f"""client {{
  enabled           = true
  network_interface = "lo"
  options = {{
    # Cloud metadata probes only slow a laptop-sized dev agent down (and fail in some builds).
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
{client_extra}
{cni_client(data_dir.parent / f"{data_dir.name}-cni", cni_mbit)}
}}
{consul_block}
plugin "qemu" {{
  config {{
    image_paths    = [{json.dumps(str(images))}, {json.dumps(str(vms_root))}]
    args_allowlist = [{allowlist}]
  }}
}}
{extra}
""", head.http


async def _ready_qemu_nodes(agent: Agent, count: int) -> list[dict[str, Any]]:
    """Wait until ``count`` nodes are ready with a healthy qemu driver; return them."""
    async with aiohttp.ClientSession() as client:
        async def ready() -> Any:
            status, nodes = await _get(client, f"{agent.http}/v1/nodes")
            if status != 200:
                return None
            found = []
            for stub in nodes:
                status, node = await _get(client, f"{agent.http}/v1/node/{stub['ID']}")
                qemu = (node.get("Drivers") or {}).get("qemu") or {}
                if node.get("Status") == "ready" and qemu.get("Healthy"):
                    found.append(node)
            return found if len(found) >= count else None

        nodes: list[dict[str, Any]] = await _until(
            f"{count} nomad client(s) becoming ready with a healthy qemu driver", ready, AGENT_TIMEOUT, agent)
        return nodes


@pytest.fixture
async def nomad_agent(agent_dir: Path, consul_agent: Agent, vms_root: Path, tiny_images_dir: Path,
                      node_rules: str) -> AsyncIterator[Agent]:
    hcl, http = _nomad_hcl(agent_dir / "nomad", consul_agent, vms_root, tiny_images_dir,
                           extra=f"server {{{OVERSUBSCRIPTION}}}")
    config = agent_dir / "nomad.hcl"
    config.write_text(hcl)
    agent = _start("nomad", ["nomad", "agent", "-dev", f"-config={config}"], agent_dir / "nomad.log", http)
    try:
        await _ready_qemu_nodes(agent, 1)
        yield agent
    finally:
        with contextlib.suppress(Exception):  # the test's VMs: Nomad tears their networks down (CNI DEL)
            await destroy_all(agent, timeout=30)
        _stop(agent)


@pytest.fixture
def websockify_env(consul_agent: Agent) -> dict[str, str]:
    """websockify finds fleet VMs' VNC in this Consul agent (console/consul.py)."""
    return {"CONSUL_HTTP_ADDR": consul_agent.http}


@pytest.fixture
async def fleet_gateway(aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path, websockify_server: Any,
                        nomad_agent: Agent, database_url: str) -> Any:
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="nomad",
                                   nomad_addr=nomad_agent.http, nomad_namespace="default",
                                   vnc_public_url=websockify_server.ws_url, nomad_task_user=AS_AGENT,
                                   nomad_outbound=not CNI_MISSING)
    server = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    return server


async def test_a_vm_on_nomad(fleet_gateway: Any, sessions: Any, nomad_agent: Agent, consul_agent: Agent,
                             app_settings: Settings, websockify_server: WebsockifyServer) -> None:
    s: Session = sessions(fleet_gateway)
    await s.signup_and_login()
    began = time.monotonic()
    status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, f"{vm}\n--- nomad log:\n{nomad_agent.log_tail()}"
    print(f"\ncreate on Nomad: running after {time.monotonic() - began:.1f} s")
    vm_id = vm["vm_id"]
    job_id = f"vm-{vm_id}"
    overlay = app_settings.vms_root / "users" / s.user["id"] / f"{vm_id}.qcow2"  # type: ignore[index]
    assert overlay.exists()

    async with aiohttp.ClientSession() as http:
        async def nomad_running() -> Any:
            status, allocs = await _get(http, f"{nomad_agent.http}/v1/job/{job_id}/allocations")
            running = [a for a in allocs if a["ClientStatus"] == "running"] if status == 200 else []
            return running[0] if running else None

        async def vnc_instances(passing: bool) -> list[dict[str, Any]]:
            url = f"{consul_agent.http}/v1/health/service/vmgate-vnc?tag={job_id}" + ("&passing" if passing else "")
            status, body = await _get(http, url)
            assert status == 200, body
            return list(body)

        status, job = await _get(http, f"{nomad_agent.http}/v1/job/{job_id}")
        assert status == 200 and job["Status"] == "running", job
        assert job["TaskGroups"][0]["Tasks"][0]["Driver"] == "qemu"
        meta = {"vm_id": vm_id, "owner": s.user["id"], "template": "tiny"}  # type: ignore[index]
        assert {k: job["Meta"].get(k) for k in meta} == meta
        # tiny's warm layer keeps its RAM in a file for the local driver's clones to share: a fleet VM boots.
        assert job["Meta"].get("start") is None
        # With the CNI plugins, the VM is outbound: its allocation has a namespace of its own (docs/NETWORK.md).
        assert job["Meta"]["network"] == ("none" if CNI_MISSING else "outbound")
        assert job["TaskGroups"][0]["Networks"][0]["Mode"] == ("host" if CNI_MISSING else "cni/vmgate")
        first = await nomad_running()
        status, detail = await _get(http, f"{nomad_agent.http}/v1/allocation/{first['ID']}")
        [port] = [p for p in detail["AllocatedResources"]["Shared"]["Ports"] if p["Label"] == "vnc"]

        [instance] = await _until("the VM's VNC service passing its check in Consul",
                                  lambda: vnc_instances(passing=True), 45, consul_agent)
        assert instance["Service"]["Port"] == port["Value"] and instance["Service"]["Address"] == "127.0.0.1"
        assert instance["Service"]["Meta"]["vm_id"] == vm_id
        assert instance["Service"]["Meta"]["alloc_id"] == first["ID"]  # Nomad interpolated ${NOMAD_ALLOC_ID}
        # The start's VNC password is in the job Nomad runs; QEMU lets no one in without it (issue 13, item 5).
        first_password = vnc_password.password_of(job)
        assert first_password and f"password-secret={vnc_password.SECRET_ID}" in json.dumps(job)
        with pytest.raises(RFBError, match="security types"):
            await RFBClient.connect_tcp("127.0.0.1", port["Value"])

        serial = await wait_for_serial(s, vm_id, READY, timeout=120)
        assert "Linux version" in serial or READY in serial

        async with open_console(s, vm_id) as rfb:
            await wait_for_screen(rfb, lambda: not rfb.is_blank())
            assert rfb.width > 0 and rfb.height > 0
        # websockify went to Consul's passing instance of the allocation Nomad runs, and answered the password.
        assert f"vm {vm_id}: VNC at 127.0.0.1:{port['Value']}, Consul's healthy vmgate-vnc instance of allocation " \
               f"{first['ID']}" in websockify_server.log_text()
        assert first_password not in websockify_server.log_text()

        status, body = await s.request("POST", f"/api/vms/{vm_id}/stop?wait=60")
        assert status == 200 and body["state"] == "stopped", body
        status, job = await _get(http, f"{nomad_agent.http}/v1/job/{job_id}")
        assert status == 200 and job["Stop"] is True
        assert await nomad_running() is None
        await _until("the VNC service leaving Consul", lambda: _empty(vnc_instances(passing=False)), 30)
        assert overlay.exists()  # the disk stays

        status, body = await s.request("POST", f"/api/vms/{vm_id}/start?wait=60")
        assert status == 200 and body["state"] == "running", f"{body}\n{nomad_agent.log_tail()}"
        second = await nomad_running()
        assert second["ID"] != first["ID"]
        [again] = await _until("the VM's VNC service passing again", lambda: vnc_instances(passing=True), 45,
                               consul_agent)
        await wait_for_serial(s, vm_id, READY, timeout=120, count=1)
        # The new allocation has a new port and a new VNC password; the console follows both.
        async with open_console(s, vm_id) as rfb:
            await wait_for_screen(rfb, lambda: not rfb.is_blank())
        assert f"vm {vm_id}: VNC at 127.0.0.1:{again['Service']['Port']}, Consul's healthy vmgate-vnc instance of " \
               f"allocation {second['ID']}" in websockify_server.log_text()
        status, job = await _get(http, f"{nomad_agent.http}/v1/job/{job_id}")
        assert vnc_password.password_of(job) not in (None, first_password)

        status, body = await s.request("DELETE", f"/api/vms/{vm_id}?wait=60")
        assert status == 200 and body["state"] == "destroyed", body
        status, _ = await _get(http, f"{nomad_agent.http}/v1/job/{job_id}")
        assert status == 404  # purged
        status, allocs = await _get(http, f"{nomad_agent.http}/v1/job/{job_id}/allocations")
        assert status == 404 or not [a for a in allocs if a["ClientStatus"] in ("pending", "running")]
        await _until("the VNC service leaving Consul", lambda: _empty(vnc_instances(passing=False)), 30)
        status, services = await _get(http, f"{consul_agent.http}/v1/catalog/service/vmgate-vnc")
        assert status == 200 and services == []
        assert not overlay.exists()


async def _empty(probe: Any) -> bool:
    return not await probe


# ---------------------------------------------------------------- TLS to Nomad

def _tls_files(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for the dev agent and a client certificate, made by `nomad tls`."""
    def run(*args: str) -> None:
        subprocess.run(["nomad", "tls", *args], cwd=directory, check=True, capture_output=True)

    run("ca", "create")
    run("cert", "create", "-server", "-region", "global", "-additional-ipaddress", "127.0.0.1")
    run("cert", "create", "-client")
    names = {"ca": "nomad-agent-ca", "server_cert": "global-server-nomad", "server_key": "global-server-nomad-key",
             "client_cert": "global-client-nomad", "client_key": "global-client-nomad-key"}
    return {key: directory / f"{name}.pem" for key, name in names.items()}


async def test_the_nomad_driver_speaks_verified_tls(agent_dir: Path, app_settings: Settings) -> None:
    """NOMAD_CACERT / NOMAD_CLIENT_CERT / NOMAD_CLIENT_KEY against an agent that requires client certificates."""
    from drivers.base import DriverError

    tls = _tls_files(agent_dir)
    head = _agent_head(agent_dir / "nomad-tls")
    config = agent_dir / "nomad-tls.hcl"
    config.write_text(head.hcl + f"""client {{
  enabled = true
  options = {{
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
tls {{
  http                   = true
  rpc                    = true
  ca_file                = "{tls['ca']}"
  cert_file              = "{tls['server_cert']}"
  key_file               = "{tls['server_key']}"
  verify_server_hostname = true
  verify_https_client    = true
}}
""")
    agent = _start("nomad", ["nomad", "agent", "-dev", f"-config={config}"],
                   agent_dir / "nomad-tls.log", head.http.replace("http://", "https://"))
    try:
        base = dataclasses.replace(app_settings, driver="nomad", nomad_addr=agent.http)
        verified = driver_from_settings(dataclasses.replace(
            base, nomad_cacert=tls["ca"], nomad_client_cert=tls["client_cert"], nomad_client_key=tls["client_key"]))

        async def leader() -> Any:
            try:
                return (await verified.health())["ok"]
            except DriverError:
                return False

        await _until("the TLS agent answering its health check", leader, AGENT_TIMEOUT, agent)
        assert await verified.list_vms() == {}
        # The system's CAs do not know this CA: refused, never silently unverified.
        unverified = driver_from_settings(dataclasses.replace(base, nomad_client_cert=tls["client_cert"],
                                                              nomad_client_key=tls["client_key"]))
        with pytest.raises(DriverError):
            await unverified.list_vms()
        health = await unverified.health()
        assert health["ok"] is False
        # Without a client certificate, an agent with verify_https_client refuses the connection.
        anonymous = driver_from_settings(dataclasses.replace(base, nomad_cacert=tls["ca"]))
        with pytest.raises(DriverError):
            await anonymous.list_vms()
        for driver in (verified, unverified, anonymous):
            await driver.close()
    finally:
        _stop(agent)


# ---------------------------------------------------------------- a node dies

# Agents outside -dev mode refuse to advertise loopback unless told to.
LOOPBACK_ADVERTISE = """advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}"""

async def test_a_vm_moves_when_its_node_dies(aiohttp_server: Any, app_settings: Settings, agent_dir: Path,
                                              consul_agent: Agent, vms_root: Path, tiny_images_dir: Path,
                                              websockify_server: WebsockifyServer, sessions: Any,
                                              database_url: str) -> None:
    """One Nomad server and two clients (one host, separate agents and data dirs, shared storage): kill the
    client running a VM — agent, executor and QEMU, like a node losing power — and the VM comes back on the
    other client; vmgate shows it running again and its console opens there, found through Consul."""
    head = _agent_head(agent_dir / "server")
    rpc, server_http = head.rpc, head.http
    server_config = agent_dir / "server.hcl"
    server_config.write_text(head.hcl + f"""{LOOPBACK_ADVERTISE}
server {{
  enabled           = true
  bootstrap_expect  = 1
  # Notice a dead node within seconds, not the default tens of seconds.
  min_heartbeat_ttl = "1s"
  heartbeat_grace   = "2s"
{OVERSUBSCRIPTION}}}
consul {{
  address = "{consul_agent.http.removeprefix('http://')}"
}}
""")
    agents = {"server": _start("nomad", ["nomad", "agent", f"-config={server_config}"], agent_dir / "server.log",
                               server_http)}
    try:
        for name in ("a", "b"):
            hcl, http = _nomad_hcl(agent_dir / f"client-{name}", consul_agent, vms_root, tiny_images_dir,
                                   extra=f'name = "client-{name}"\n{LOOPBACK_ADVERTISE}',
                                   client_extra=f'  servers = ["127.0.0.1:{rpc}"]')
            (agent_dir / f"client-{name}.hcl").write_text(hcl)
            agents[name] = _start("nomad", ["nomad", "agent", f"-config={agent_dir / f'client-{name}.hcl'}"],
                                  agent_dir / f"client-{name}.log", http)
        nodes = {node["Name"]: node["ID"] for node in await _ready_qemu_nodes(agents["server"], 2)}
        assert set(nodes) == {"client-a", "client-b"}

        settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="nomad",
                                       nomad_addr=server_http, vnc_public_url=websockify_server.ws_url,
                                       nomad_task_user=AS_AGENT)
        gateway = await aiohttp_server(create_app(settings))
        truncate_all(database_url)
        s: Session = sessions(gateway)
        await s.signup_and_login()
        status, vm = await s.request("POST", "/api/vms?wait=120", json=VM)
        assert status == 201, vm
        vm_id, job_id = vm["vm_id"], f"vm-{vm['vm_id']}"

        async with aiohttp.ClientSession() as http:
            async def running_alloc(not_on: str | None = None) -> Any:
                status, allocs = await _get(http, f"{server_http}/v1/job/{job_id}/allocations")
                running = [a for a in allocs if a["ClientStatus"] == "running" and a["NodeID"] != not_on] \
                    if status == 200 else []
                return running[0] if running else None

            first = await _until("the VM's allocation running", running_alloc, 60, agents["server"])
            dead = next(name for name, node_id in nodes.items() if node_id == first["NodeID"])
            survivor = "client-b" if dead == "client-a" else "client-a"
            async with open_console(s, vm_id) as rfb:
                await wait_for_screen(rfb, lambda: not rfb.is_blank())

            # The node dies: its agent, the executor and QEMU, at once.
            agent = agents[dead.removeprefix("client-")]
            agent.process.kill()
            agent.process.wait()
            _kill_session(agent.process.pid)
            kill_qemu_under(agent_dir / dead)
            began = time.monotonic()

            second = await _until(f"a replacement allocation running on {survivor}",
                                  lambda: running_alloc(not_on=first["NodeID"]), 180, agents["server"])
            assert second["NodeID"] == nodes[survivor]
            print(f"\nnode {dead} killed; the VM runs on {survivor} {time.monotonic() - began:.1f} s later")

            async def vmgate_running() -> Any:
                status, body = await s.request("GET", f"/api/vms/{vm_id}")
                return status == 200 and body["state"] == "running" and body

            await _until("vmgate showing the VM running again", vmgate_running, 60)
            status, detail = await _get(http, f"{server_http}/v1/allocation/{second['ID']}")
            [port] = [p for p in detail["AllocatedResources"]["Shared"]["Ports"] if p["Label"] == "vnc"]

            async def passing() -> Any:
                url = f"{consul_agent.http}/v1/health/service/vmgate-vnc?tag={job_id}&passing"
                status, body = await _get(http, url)
                return status == 200 and [i for i in body if i["Service"]["Port"] == port["Value"]]

            await _until("the moved VM's VNC passing its check in Consul", passing, 60, consul_agent)
            async with open_console(s, vm_id) as rfb:
                await wait_for_screen(rfb, lambda: not rfb.is_blank())
            assert f"vm {vm_id}: VNC at 127.0.0.1:{port['Value']}, Consul's healthy vmgate-vnc instance of " \
                   f"allocation {second['ID']}" in websockify_server.log_text()

        status, body = await s.request("DELETE", f"/api/vms/{vm_id}?wait=90")
        assert status == 200 and body["state"] == "destroyed", body
    finally:
        with contextlib.suppress(Exception):
            await destroy_all(agents["server"], timeout=30)
        for agent in reversed(list(agents.values())):
            _stop(agent)
        kill_qemu_under(agent_dir)


async def test_nomad_blocking_query_returns_on_a_change(fleet_gateway: Any, sessions: Any, nomad_agent: Agent,
                                                        app_settings: Settings) -> None:
    """The Nomad driver's wait_for_change (what wakes the reconciler) answers when an allocation appears."""
    driver = driver_from_settings(dataclasses.replace(app_settings, driver="nomad", nomad_addr=nomad_agent.http))
    try:
        index = await driver.wait_for_change(0, 5)
        assert index is not None and index >= 1
        waiting = asyncio.create_task(driver.wait_for_change(index, 60))
        await asyncio.sleep(1)
        assert not waiting.done()  # nothing changed yet: the query blocks
        s: Session = sessions(fleet_gateway)
        await s.signup_and_login()
        status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
        assert status == 201, vm
        changed = await asyncio.wait_for(waiting, 30)  # well before its 60 s
        assert changed is not None and changed > index
        assert fleet_gateway.app[engine_key].watch_wakeups >= 1  # the gateway's own watch saw it too
        assert (await s.request("DELETE", f"/api/vms/{vm['vm_id']}?wait=60"))[0] == 200
    finally:
        await driver.close()


# ---------------------------------------------------------------- suspend and snapshots on a fleet

async def test_snapshots_on_nomad_and_a_saved_state_resumed_by_the_job(
        fleet_gateway: Any, sessions: Any, nomad_agent: Agent, agent_dir: Path, app_settings: Settings,
        tiny_images_dir: Path) -> None:
    """What a fleet can do (docs/SNAPSHOTS.md, "On a fleet"): a stopped VM's disk snapshots through the API;
    no suspend and no memory snapshot (Nomad cannot save a task's memory). And what the job carries: a VM
    whose memory snapshot was taken on one machine (the local driver) is started by Nomad from the job's
    ``-loadvm`` argument alone (a restore), and runs on where it was."""
    from drivers.local import LocalDriver
    from gateway.engine import storage
    from gateway.engine.templates import Templates
    from gateway.web.appkeys import driver_key, settings_key
    from jobspecs import loadvm_job
    from jobspecs.render import JobSettings
    from tests.fixtures.qemu import type_text
    from tests.test_lifecycle import stopped_disk_snapshot_round_trip

    s: Session = sessions(fleet_gateway)
    await s.signup_and_login()
    status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    vm_id = vm["vm_id"]
    for path, body in ((f"/api/vms/{vm_id}/suspend", None), (f"/api/vms/{vm_id}/snapshots", {"name": "live"})):
        status, answer = await s.request("POST", path, json=body)
        assert status == 409 and answer["error"]["code"] == "not_supported", answer
    await stopped_disk_snapshot_round_trip(s, vm_id)
    status, body = await s.request("DELETE", f"/api/vms/{vm_id}?wait=60")
    assert status == 200, body

    # A VM's memory saved by the local driver on this host, then its job, rendered for Nomad, started there.
    catalog = Templates(tiny_images_dir)
    tiny = catalog.get("tiny")
    moved = "7d0c5a3e-1f2b-4c5d-8e9f-0a1b2c3d4e5f"
    overlay = app_settings.vms_root / "users" / "u" / f"{moved}.qcow2"
    spec = {"id": moved, "name": "moved", "template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1,
            "overlay_path": str(overlay)}
    local_settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local")
    fleet_settings = fleet_gateway.app[settings_key]
    local_job = catalog.cold(catalog.render(tiny, spec, owner="u", settings=local_settings), local_settings)
    await storage.create_overlay(tiny.disk, overlay, 1)
    local = LocalDriver(app_settings.vms_root, image_paths=[app_settings.vms_root, tiny_images_dir])
    nomad = fleet_gateway.app[driver_key]
    try:
        await local.start(moved, local_job)
        began = time.monotonic()
        while READY not in await local.logs(moved, 1 << 20):
            assert time.monotonic() - began < 120, await local.logs(moved, 4096)
            await asyncio.sleep(0.5)
        await type_text(local.task_dir(moved) / "qmp.sock", 'J=$RANDOM$RANDOM; echo "J1 $J" >/dev/ttyS0\n')
        deadline = time.monotonic() + 60
        while "J1 " not in (serial := await local.logs(moved, 1 << 20)):
            assert time.monotonic() < deadline, serial[-2000:]
            await asyncio.sleep(0.3)
        marker = serial[serial.index("J1 "):].split()[1]
        saved = await local.save_state(moved, "vmgate-suspend")
        await local.stop(moved, timeout=0)  # what runs after the snapshot is thrown away: -loadvm reverts it
        assert saved > 10 << 20 and (await local.status(moved)).state == "stopped"
        await local.destroy(moved)

        job = loadvm_job(catalog.cold(catalog.render(tiny, spec, owner="u", settings=fleet_settings), fleet_settings),
                         "vmgate-suspend", JobSettings.from_settings(fleet_settings))
        assert job["TaskGroups"][0]["Networks"], "a fleet job (VNC on a Nomad port, Consul service)"
        status = await nomad.start(moved, job)
        assert status.state == "running", f"{status}\n{nomad_agent.log_tail()}"
        [qmp] = await _until("the allocation's QMP socket",
                             lambda: _glob(agent_dir, "nomad/alloc/*/qemu/local/qmp.sock"), 30)
        await type_text(qmp, 'echo "J2 $J" >/dev/ttyS0\n')
        deadline = time.monotonic() + 60
        while "J2 " not in (serial := await nomad.logs(moved, 1 << 20)):
            assert time.monotonic() < deadline, serial[-2000:]
            await asyncio.sleep(0.5)
        assert serial[serial.index("J2 "):].split()[1] == marker
        assert "Linux version" not in serial  # loaded, not booted
    finally:
        with contextlib.suppress(Exception):
            await nomad.destroy(moved)
        with contextlib.suppress(Exception):
            await local.destroy(moved)
        await local.close()
        await storage.remove_overlay(overlay)


async def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))
