"""The fleet path without a cluster: VM jobs rendered for Nomad (network, Consul service, the VNC display
template), HCL and JSON agreeing, the client's args_allowlist, the Nomad driver's mapping of Nomad's
answers and errors, and `python -m gateway.cli jobspec render | export | validate`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from nomad.api import exceptions as nomad_exc

from drivers.base import DriverError, JobInvalid, VncTarget
from drivers.local import build_task
from drivers.nomad import (
    NomadConfig,
    NomadDriver,
    NomadNotFound,
    NomadRefused,
    NomadUnavailable,
    current_alloc,
    last_event,
    map_error,
    status_of,
    vnc_of,
)
from gateway.cli.jobspec import CLIENT_HCL, client_allowlist, flags_of
from gateway.config import Settings
from gateway.web.app import driver_from_settings
from jobspecs import (
    DEFAULT_CATALOG,
    JobSettings,
    Template,
    WarmImage,
    load_catalog,
    loadvm_job,
    render_job,
    to_hcl,
    vnc_password,
)
from jobspecs.memory import QEMU_OVERHEAD_MB
from tests.conftest import VM
from tests.test_jobspecs import _check_hcl_matches_json, go_duration, parse_hcl, sizes_of, spec

REPO = Path(__file__).resolve().parent.parent
SECOND = 1_000_000_000
NOMAD = JobSettings(datacenters=("dc1",), namespace="vmgate", target="nomad")


def fleet_vnc(host: str, port: int, alloc_id: str | None = None, password: str | None = None) -> VncTarget:
    """A fleet VM's VNC target as the Nomad driver reports it: websockify resolves it through Consul."""
    return VncTarget(host=host, port=port, consul_service="vmgate-vnc", alloc_id=alloc_id, password=password)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    return load_catalog(DEFAULT_CATALOG, tmp_path_factory.mktemp("images"))


# ---------------------------------------------------------------- rendering for Nomad

def test_nomad_target_renders_every_template_at_every_size(templates: dict[str, Template]) -> None:
    for template in templates.values():
        for sizes in sizes_of(template):
            vm = spec(template, **sizes)
            job = render_job(vm, template, NOMAD)
            name = f"vm-{vm.id}"
            assert job["ID"] == name and job["Namespace"] == "vmgate"
            # A desktop's clipboard is plugged in by the local driver only (docs/CONSOLE.md): no QMP from here.
            assert job["Meta"] == {"vm_id": vm.id, "owner": "42", "template": template.name, "network": "none",
                                   **({"clipboard": "vdagent"} if template.desktop else {})}
            [group] = job["TaskGroups"]
            assert group["Networks"] == [{"Mode": "host", "DynamicPorts": [{"Label": "vnc"}]}]
            assert group["Services"] == [{
                "Name": "vmgate-vnc", "PortLabel": "vnc", "Provider": "consul", "Tags": [name],
                "Meta": {"vm_id": vm.id, "owner": "42", "alloc_id": "${NOMAD_ALLOC_ID}"},
                "Checks": [{"Name": "vnc-tcp", "Type": "tcp", "Interval": 10 * SECOND, "Timeout": 2 * SECOND}],
            }]
            [task] = group["Tasks"]
            args = task["Config"]["args"]
            assert args[args.index("-vnc") + 1] == "${NOMAD_IP_vnc}:${VMGATE_VNC_DISPLAY}"
            # No network on a fleet node yet (docs/NETWORK.md): the NIC is on an empty hub.
            assert "-qmp" in args and args[args.index("-netdev") + 1] == "hubport,id=net0,hubid=0"
            [tmpl] = task["Templates"]
            assert tmpl["Envvars"] is True and tmpl["DestPath"] == "local/vnc.env"
            assert 'VMGATE_VNC_DISPLAY={{ env "NOMAD_PORT_vnc" | parseInt | subtract 5900 }}' in tmpl["EmbeddedTmpl"]
            assert task["Resources"] == {"CPU": 1000 * sizes["cpu"], "MemoryMB": sizes["memory_mb"],
                                         "MemoryMaxMB": sizes["memory_mb"] + QEMU_OVERHEAD_MB}
            # Everything but the VNC parts and vmgate.wake (only the local driver pokes the guest's ttyS1,
            # jobspecs/devices.py) is the job the local driver runs: the same devices, so a memory state saved
            # under one loads under the other.
            local = render_job(vm, template, dataclasses.replace(NOMAD, target="local"))
            local_args = local["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
            assert [a for a in args if "vnc" not in a.lower()] == \
                [a.removesuffix(" vmgate.wake=ttyS1") for a in local_args if "vnc" not in a.lower()]
            assert set(group) - set(local["TaskGroups"][0]) == {"Networks", "Services"}


def test_nomad_hcl_says_what_the_json_says(templates: dict[str, Template]) -> None:
    for template in templates.values():
        for sizes in sizes_of(template):
            job = render_job(spec(template, **sizes), template, NOMAD)
            _check_hcl_matches_json(job)
            text = to_hcl(job)
            hgroup = parse_hcl(text)["job"][job["ID"]]["group"]["vm"]
            group = job["TaskGroups"][0]
            assert hgroup["network"] == {"mode": "host", "port": {"vnc": {}}}
            service = group["Services"][0]
            hservice = hgroup["service"]
            assert {k: hservice[k] for k in ("name", "port", "provider", "tags", "meta")} == {
                "name": service["Name"], "port": service["PortLabel"], "provider": service["Provider"],
                "tags": service["Tags"], "meta": service["Meta"]}
            check = service["Checks"][0]
            assert hservice["check"]["type"] == "tcp" and hservice["check"]["name"] == check["Name"]
            assert go_duration(hservice["check"]["interval"]) == check["Interval"]
            assert go_duration(hservice["check"]["timeout"]) == check["Timeout"]
            htemplate = hgroup["task"]["qemu"]["template"]
            tmpl = group["Tasks"][0]["Templates"][0]
            assert htemplate == {"data": tmpl["EmbeddedTmpl"], "destination": tmpl["DestPath"],
                                 "env": tmpl["Envvars"], "change_mode": tmpl["ChangeMode"]}
    # ${NOMAD_IP_vnc} stays an interpolation; the template's variable is escaped to the same text.
    assert '"-vnc", "${NOMAD_IP_vnc}:$${VMGATE_VNC_DISPLAY}",' in text


def test_the_target_follows_the_driver(templates: dict[str, Template]) -> None:
    environ = {"POSTGRES_URL": "postgresql://u:p@127.0.0.1:5432/db", "REDIS_URL": "redis://127.0.0.1:6379/0",
               "JWT_SECRET": "x" * 32}
    local = Settings.load(environ=environ, dotenv=Path("/nonexistent"))
    fleet = Settings.load(environ={**environ, "VMGATE_DRIVER": "nomad"}, dotenv=Path("/nonexistent"))
    assert JobSettings.from_settings(local).target == "local"
    assert JobSettings.from_settings(fleet).target == "nomad"
    assert fleet.nomad_token == "" and fleet.nomad_cacert is None


def test_fleet_vms_are_outbound_only_where_the_operator_says_the_nodes_are_ready() -> None:
    """NOMAD_OUTBOUND (docs/NETWORK.md "Fleet nodes"): off by default, since a node without the CNI network
    `vmgate` could not place an outbound VM; VM_NETWORK=none still turns every VM's network off."""
    environ = {"POSTGRES_URL": "postgresql://u:p@127.0.0.1:5432/db", "REDIS_URL": "redis://127.0.0.1:6379/0",
               "JWT_SECRET": "x" * 32, "VMGATE_DRIVER": "nomad"}

    def driver(**more: str) -> Any:
        return driver_from_settings(Settings.load(environ={**environ, **more}, dotenv=Path("/nonexistent")))

    default, ready, off = driver(), driver(NOMAD_OUTBOUND="true"), driver(NOMAD_OUTBOUND="true", VM_NETWORK="none")
    assert default.networks() == ("none",) and "NOMAD_OUTBOUND" in default.network_problem
    assert ready.networks() == ("outbound", "none") and ready.network_problem is None
    assert off.networks() == ("none",)


def test_the_local_driver_keeps_the_unix_socket(templates: dict[str, Template]) -> None:
    template = templates["tiny"]
    local = render_job(spec(template, id="abc"), template, JobSettings())
    assert "Networks" not in local["TaskGroups"][0] and "Services" not in local["TaskGroups"][0]
    task = build_task("abc", local, Path("/tmp/vg/tasks/abc"))
    assert task.vnc == VncTarget(unix_socket="/tmp/vg/tasks/abc/vnc.sock")
    # A fleet job needs Nomad (its port and its template): the local driver says so instead of guessing.
    fleet = render_job(spec(template, id="abc"), template, NOMAD)
    with pytest.raises(JobInvalid, match="NOMAD_IP_vnc"):
        build_task("abc", fleet, Path("/tmp/vg/tasks/abc"))


def test_the_client_allowlist_is_exactly_the_renderers_flags(templates: dict[str, Template]) -> None:
    allowed = client_allowlist()
    emitted: set[str] = set()
    for template in templates.values():
        for sizes in sizes_of(template):
            for target in ("local", "nomad"):
                job = render_job(spec(template, **sizes), template, dataclasses.replace(NOMAD, target=target))
                emitted |= set(flags_of(job))
        # A warm job (a VM's first start from the template's saved state) adds -set and -incoming.
        warm = WarmImage(template=template.name, id="0123456789abcdef", directory=Path("/srv/w"),
                         disk=Path("/srv/w/disk.qcow2"), state=Path("/srv/w/state"), sizes=template.defaults,
                         accelerator=NOMAD.accelerator)
        for target in ("local", "nomad"):
            job = render_job(spec(template), template, dataclasses.replace(NOMAD, target=target), warm=warm)
            emitted |= set(flags_of(job))
            # Started from a snapshot of its own disk (resume, restore): -loadvm.
            emitted |= set(flags_of(loadvm_job(job, "vmgate-suspend", dataclasses.replace(NOMAD, target=target))))
            # What the Nomad driver submits: the start's VNC password in an -object secret.
            emitted |= set(flags_of(vnc_password.with_password(job, vnc_password.new_password())))
    assert emitted <= allowed, f"flags missing from {CLIENT_HCL}: {sorted(emitted - allowed)}"
    assert allowed == emitted, f"{CLIENT_HCL} allows flags no job uses: {sorted(allowed - emitted)}"
    assert allowed == {"-smp", "-kernel", "-smbios", "-vnc", "-qmp", "-sandbox", "-nodefaults",
                       "-vga", "-serial", "-netdev", "-device", "-fw_cfg", "-set", "-incoming", "-loadvm", "-object"}


# ---------------------------------------------------------------- Nomad's errors, one mapping

def response(status: int, text: str = "") -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = text.encode()
    resp.reason = "reason"
    return resp


def test_nomad_errors_map_to_typed_driver_errors() -> None:
    not_found = map_error(nomad_exc.URLNotFoundNomadException(response(404, "job not found")), "reading job vm-x")
    assert type(not_found) is NomadNotFound and "job not found" in str(not_found)
    denied = map_error(nomad_exc.URLNotAuthorizedNomadException(response(403, "Permission denied")), "registering")
    assert isinstance(denied, NomadRefused) and "NOMAD_TOKEN" in str(denied) and "Permission denied" in str(denied)
    bad = map_error(nomad_exc.BadRequestNomadException(response(400, "1 error: missing image_path")), "registering")
    assert isinstance(bad, NomadRefused) and "missing image_path" in str(bad)
    failed = map_error(nomad_exc.BaseNomadException(response(500, "rpc error: No cluster leader")), "registering")
    assert isinstance(failed, NomadUnavailable) and "No cluster leader" in str(failed)
    refused = map_error(nomad_exc.BaseNomadException(requests.ConnectionError("Connection refused")), "listing")
    assert isinstance(refused, NomadUnavailable) and "cannot reach Nomad" in str(refused)
    timeout = map_error(requests.Timeout("read timed out"), "listing")
    assert isinstance(timeout, NomadUnavailable)
    for error in (not_found, denied, bad, failed, refused, timeout):
        assert isinstance(error, DriverError)  # the gateway only knows DriverError


# ---------------------------------------------------------------- Nomad's answers, mapped onto VM states

def alloc(alloc_id: str, client: str, desired: str = "run", task: str | None = "running", create: int = 10,
          events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An allocation list stub as GET /v1/job/:id/allocations returns it (the fields the driver reads)."""
    states = {} if task is None else {"qemu": {"State": task, "Failed": client == "failed", "Events": events or []}}
    return {"ID": alloc_id, "ClientStatus": client, "DesiredStatus": desired, "CreateIndex": create,
            "ModifyIndex": create + 1, "NodeName": "node-1", "NodeID": "n1", "TaskStates": states}


def full(alloc_id: str, port: int = 23456, ip: str = "10.0.0.5") -> dict[str, Any]:
    """The full allocation (GET /v1/allocation/:id) carries the ports."""
    return {"ID": alloc_id, "AllocatedResources": {"Shared": {
        "Ports": [{"Label": "vnc", "Value": port, "To": 0, "HostIP": ip}],
        "Networks": [{"Mode": "host", "IP": ip, "DynamicPorts": [{"Label": "vnc", "Value": port}]}]}}}


JOB = {"ID": "vm-1", "Status": "running", "Version": 0, "Stop": False}


def test_status_mapping() -> None:
    assert status_of(None, []).state == "missing"
    running = status_of(JOB, [alloc("a1", "running")], full("a1"))
    assert running.state == "running" and running.vnc == fleet_vnc("10.0.0.5", 23456, "a1")
    assert running.details["alloc_id"] == "a1" and running.details["node"] == "node-1"
    # A newer replacement wins over the old (stopped) one; its ports come from its own full record.
    moved = status_of(JOB, [alloc("old", "complete", "stop", "dead", 5), alloc("new", "running", create=20)],
                      full("new", 24000, "10.0.0.6"))
    assert moved.details["alloc_id"] == "new" and moved.vnc == fleet_vnc("10.0.0.6", 24000, "new")
    # The job Nomad runs carries the start's VNC password: the target gets it, for websockify to answer.
    locked = vnc_password.with_password({**JOB, "TaskGroups": [{"Tasks": [{"Config": {"args": ["-vnc", "h:1"]}}]}]},
                                        "Abc123xy")
    assert status_of(locked, [alloc("a1", "running")], full("a1")).vnc == fleet_vnc("10.0.0.5", 23456, "a1", "Abc123xy")
    pending = status_of(JOB, [alloc("a1", "pending", task="pending")])
    assert pending.state == "stopped" and pending.details["how"] == "pending"
    unplaced = status_of(JOB, [])
    assert unplaced.state == "stopped" and unplaced.details["how"] == "pending"
    stopped = status_of({**JOB, "Stop": True, "Status": "dead"}, [alloc("a1", "complete", "stop", "dead")])
    assert stopped.state == "stopped" and stopped.details["how"] == "stopped"
    stopping = status_of({**JOB, "Stop": True}, [alloc("a1", "running", "stop")])
    assert stopping.state == "stopped" and stopping.details["how"] == "stopping"
    events = [{"Type": "Received"}, {"Type": "Started"},
              {"Type": "Terminated", "DisplayMessage": "Exit Code: 1, Exit Message: \"qemu failed\""},
              {"Type": "Not Restarting", "DisplayMessage": "Exceeded allowed attempts 2 in interval 30m0s"}]
    failed = status_of({**JOB, "Status": "dead"}, [alloc("a1", "failed", task="dead", events=events)])
    assert failed.state == "stopped" and failed.details["how"] == "failed"
    assert failed.reason == ('Terminated: Exit Code: 1, Exit Message: "qemu failed"; '
                             "Not Restarting: Exceeded allowed attempts 2 in interval 30m0s")
    assert last_event(alloc("a", "running", events=[{"Type": "Started"}])) is None


def test_vnc_from_older_allocation_shapes() -> None:
    legacy = {"Resources": {"Networks": [{"IP": "10.0.0.7", "DynamicPorts": [{"Label": "vnc", "Value": 25000}]}]}}
    assert vnc_of(legacy) == VncTarget(host="10.0.0.7", port=25000)
    assert vnc_of({"AllocatedResources": {"Shared": {"Ports": [{"Label": "http", "Value": 1}]}}}) is None
    assert current_alloc([]) is None


class FakeNomad:
    """Just enough of python-nomad's client to drive NomadDriver through its calls."""

    def __init__(self) -> None:
        self.jobs_registered: list[dict[str, Any]] = []
        self.job_record: dict[str, Any] | None = None
        self.allocs: list[dict[str, Any]] = []
        self.deregistered: list[tuple[str, bool | None]] = []
        outer = self

        class Job:
            def get_job(self, id_: str, namespace: str | None = None) -> dict[str, Any]:
                if outer.job_record is None:
                    raise nomad_exc.URLNotFoundNomadException(response(404, "job not found"))
                return outer.job_record

            def get_allocations(self, id_: str, namespace: str | None = None) -> list[dict[str, Any]]:
                return outer.allocs

            def deregister_job(self, id_: str, namespace: str | None = None, purge: bool | None = None) -> dict:
                if outer.job_record is None:
                    raise nomad_exc.URLNotFoundNomadException(response(404, "job not found"))
                outer.deregistered.append((id_, purge))
                outer.allocs = [{**a, "ClientStatus": "complete", "DesiredStatus": "stop"} for a in outer.allocs]
                outer.job_record = None if purge else {**outer.job_record, "Stop": True}
                return {}

        class Jobs:
            def register_job(self, job: dict[str, Any]) -> dict[str, Any]:
                outer.jobs_registered.append(job)
                outer.job_record = {**job["Job"], "Stop": False, "Status": "running", "Version": 0}
                outer.allocs = [alloc("a1", "running")]
                return {"EvalID": "e1"}

        class Allocation:
            def get_allocation(self, id_: str) -> dict[str, Any]:
                [stub] = [a for a in outer.allocs if a["ID"] == id_]
                return {**stub, **full(id_)}

        class Leader:
            def get_leader(self) -> str:
                raise nomad_exc.BaseNomadException(requests.ConnectionError("Connection refused"))

        self.job, self.jobs, self.allocation = Job(), Jobs(), Allocation()
        self.status = type("Status", (), {"leader": Leader()})()


def driver_with(fake: FakeNomad) -> NomadDriver:
    return NomadDriver(NomadConfig(addr="http://127.0.0.1:4646", namespace="vmgate"), client=fake)


async def test_driver_start_stop_destroy_against_recorded_answers() -> None:
    fake = FakeNomad()
    driver = driver_with(fake)
    task = {"Config": {"args": ["-vnc", "${NOMAD_IP_vnc}:${VMGATE_VNC_DISPLAY}"]}}
    job = {"ID": "vm-1", "TaskGroups": [{"Networks": [{"DynamicPorts": [{"Label": "vnc"}]}], "Tasks": [task]}]}
    with pytest.raises(JobInvalid, match="rendered for the local driver"):
        await driver.start("1", {"ID": "vm-1", "TaskGroups": [{"Tasks": []}]})
    with pytest.raises(JobInvalid, match=r"no outbound network.*NOMAD_OUTBOUND"):  # made outbound, nodes no longer
        await driver.start("1", {**job, "Meta": {"network": "outbound"}})
    with pytest.raises(JobInvalid, match="-vnc"):
        await driver.start("1", {**job, "TaskGroups": [{**job["TaskGroups"][0], "Tasks": [{"Config": {"args": []}}]}]})
    assert (await driver.status("1")).state == "missing"
    await driver.stop("1", 5)  # unknown: a no-op
    status = await driver.start("1", job)
    first_password = vnc_password.password_of(fake.jobs_registered[0]["Job"])
    assert first_password and "password-secret=vmgate-vnc" in str(fake.jobs_registered[0]["Job"])
    assert status.state == "running" and status.vnc == fleet_vnc("10.0.0.5", 23456, "a1", first_password)
    assert first_password not in repr(status)  # never in a log line
    again = await driver.start("1", job)  # already running: nothing registered twice
    assert again.vnc == status.vnc and len(fake.jobs_registered) == 1
    await driver.stop("1", 5)
    assert fake.deregistered == [("vm-1", None)] and (await driver.status("1")).state == "stopped"
    restarted = await driver.start("1", job)  # the same job again, on the same overlay, with a new password
    assert len(fake.jobs_registered) == 2
    assert restarted.vnc is not None and restarted.vnc.password not in (None, first_password)
    assert "-object" not in job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]  # the stored job is untouched
    await driver.destroy("1")
    await driver.destroy("1")
    assert fake.deregistered[-1] == ("vm-1", True) and (await driver.status("1")).state == "missing"
    with pytest.raises(JobInvalid):
        await driver.start("2", job)
    health = await driver.health()
    assert health["ok"] is False and "cannot reach Nomad" in health["error"]


# ---------------------------------------------------------------- python -m gateway.cli jobspec

def cli(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, POSTGRES_URL=settings.postgres_url, REDIS_URL=settings.redis_url,
               IMAGES_DIR=str(settings.images_dir), VMS_ROOT=str(settings.vms_root), NOMAD_ADDR="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "gateway.cli", "jobspec", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


async def test_cli_render_and_export(server: Any, sessions: Any, app_settings: Settings, tmp_path: Path) -> None:
    alice = sessions(server)
    await alice.signup_and_login()
    ids = []
    for _ in range(2):
        status, body = await alice.request("POST", "/api/vms?wait=60", json=VM)
        assert status == 201, body
        ids.append(body["vm_id"])
    status, body = await alice.request("DELETE", f"/api/vms/{ids[1]}?wait=60")
    assert status == 200, body

    result = cli(app_settings, "render", ids[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# Nomad job vm-{ids[0]}") and f'job "vm-{ids[0]}"' in result.stdout
    as_json = cli(app_settings, "render", ids[0], "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    job = json.loads(as_json.stdout)["Job"]
    assert job["ID"] == f"vm-{ids[0]}" and to_hcl(job) == result.stdout
    missing = cli(app_settings, "render", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1 and "no VM 00000000" in missing.stderr
    assert cli(app_settings, "render", "../etc").returncode == 1

    out = tmp_path / "gitops"
    out.mkdir()
    stale = out / "vm-11111111-1111-1111-1111-111111111111.nomad.hcl"
    stale.write_text("# a VM that is gone\n")
    (out / "README.md").write_text("not ours\n")
    exported = cli(app_settings, "export", str(out))
    assert exported.returncode == 0, exported.stderr
    assert "exported 1 job(s)" in exported.stdout and "removed 1" in exported.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", f"vm-{ids[0]}.nomad.hcl"]
    assert (out / f"vm-{ids[0]}.nomad.hcl").read_text() == result.stdout


def test_cli_validate(app_settings: Settings) -> None:
    result = cli(app_settings, "validate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   tiny min (local, none)" in result.stdout and "ok   tiny max (nomad, outbound)" in result.stdout
    assert "every job is valid" in result.stdout
    if "nomad is not on PATH" not in result.stdout:
        assert "nomad parse" in result.stdout or "nomad job validate" in result.stdout


# ---------------------------------------------------------------- consoles through Consul

def test_consul_instance_is_the_vms_own() -> None:
    from console.consul import ConsulError, base_url, pick_instance

    def entry(vm: str, address: str, port: int, node: str = "10.0.0.9") -> dict[str, Any]:
        return {"Node": {"Address": node}, "Service": {"Address": address, "Port": port, "Meta": {"vm_id": vm}}}

    answer = [entry("other", "10.0.0.1", 21000), entry("abc", "10.0.0.2", 22000)]
    assert pick_instance(answer, "abc") == ("10.0.0.2", 22000)
    # With the allocation Nomad runs the VM in, only that allocation's instance is the VM's.
    of_alloc = [{**e, "Service": {**e["Service"], "Meta": {**e["Service"]["Meta"], "alloc_id": a}}}
                for e, a in ((entry("abc", "10.0.0.7", 23000), "old"), (entry("abc", "10.0.0.2", 22000), "a1"))]
    assert pick_instance(of_alloc, "abc", "a1") == ("10.0.0.2", 22000)
    assert pick_instance(of_alloc, "abc", "gone") is None and pick_instance(answer, "abc", "a1") is None
    assert pick_instance([entry("abc", "", 22000)], "abc") == ("10.0.0.9", 22000)  # no service address: the node's
    assert pick_instance(answer, "missing") is None
    assert pick_instance([entry("abc", "10.0.0.2", 0)], "abc") is None
    assert pick_instance({"not": "a list"}, "abc") is None
    assert base_url("127.0.0.1:8500") == "http://127.0.0.1:8500"
    assert base_url("https://consul.example:8501/") == "https://consul.example:8501"
    with pytest.raises(ConsulError, match="http"):
        base_url("file:///etc/passwd")


def test_fleet_vnc_target_names_the_consul_service() -> None:
    target = fleet_vnc("10.0.0.5", 23456)
    assert target.to_json() == {"host": "10.0.0.5", "port": 23456, "consul_service": "vmgate-vnc"}
    assert VncTarget.from_json(target.to_json()) == target
    full_target = fleet_vnc("10.0.0.5", 23456, "a1", "pw")
    assert full_target.to_json() == {"host": "10.0.0.5", "port": 23456, "consul_service": "vmgate-vnc",
                                     "alloc_id": "a1", "password": "pw"}
    assert VncTarget.from_json(full_target.to_json()) == full_target and "pw" not in repr(full_target)
    assert VncTarget.from_json({"host": "h", "port": 1}).consul_service is None
