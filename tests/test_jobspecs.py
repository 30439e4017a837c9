"""The VM job: catalog loading, rendering every template at several sizes, the HCL form (parsed back
and compared with the JSON), escaping of hostile strings, and clear errors for bad variables."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from drivers.base import JobInvalid
from drivers.local import build_task
from gateway.config import Settings
from jobspecs import (
    DEFAULT_CATALOG,
    CatalogError,
    JobSettings,
    JobSpecError,
    Template,
    VMSpec,
    hcl_duration,
    job_name,
    load_catalog,
    loadvm_job,
    render_job,
    resume_job,
    sandbox,
    to_hcl,
    variables,
    vm_id_of,
)
from jobspecs.catalog import SIZE_NAMES
from jobspecs.starts import cold_job

REPO = Path(__file__).resolve().parent.parent
SECOND = 1_000_000_000


# ---------------------------------------------------------------- a parser for the HCL subset to_hcl prints

_TOKEN_RE = re.compile(r'\s+|#[^\n]*|(?P<punct>[{}\[\]=,])|(?P<ident>[A-Za-z_][A-Za-z0-9_-]*)|(?P<num>-?\d+(\.\d+)?)'
                       r'|(?P<str>"(?:[^"\\]|\\.)*")', re.S)
_RUNTIME_RE = re.compile(r"\$\{NOMAD_[A-Za-z0-9_]+\}")


def _hcl_unquote(token: str) -> str:
    """Evaluate a quoted HCL string: escapes, $${ and %%{; only ${NOMAD_*} may interpolate (kept as text)."""
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        if body.startswith("$${", i) or body.startswith("%%{", i):
            out.append(body[i] + "{")
            i += 3
        elif body.startswith("${", i):
            match = _RUNTIME_RE.match(body, i)
            assert match, f"HCL interpolation that is not a Nomad runtime variable: {body[i:i + 30]!r}"
            out.append(match.group())
            i = match.end()
        elif body.startswith("%{", i):
            raise AssertionError(f"HCL template directive in {token!r}")
        elif body[i] == "\\":
            code = body[i + 1]
            if code == "u":
                out.append(chr(int(body[i + 2:i + 6], 16)))
                i += 6
                continue
            if code == "U":
                out.append(chr(int(body[i + 2:i + 10], 16)))
                i += 10
                continue
            out.append({"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}[code])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def parse_hcl(text: str) -> dict[str, Any]:
    """Blocks become nested dicts (labels as keys: job "x" -> ["job"]["x"]), attributes plain values."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        assert match, f"cannot tokenize HCL at {text[pos:pos + 40]!r}"
        pos = match.end()
        kind = match.lastgroup
        if kind:
            tokens.append((kind, match.group(kind)))
    index = 0

    def take(kind: str | None = None, value: str | None = None) -> tuple[str, str]:
        nonlocal index
        token = tokens[index]
        assert kind is None or token[0] == kind, f"expected {kind}, got {token}"
        assert value is None or token[1] == value, f"expected {value!r}, got {token}"
        index += 1
        return token

    def value() -> Any:
        kind, raw = take()
        if kind == "str":
            return _hcl_unquote(raw)
        if kind == "num":
            return float(raw) if "." in raw else int(raw)
        if kind == "ident" and raw in ("true", "false"):
            return raw == "true"
        assert (kind, raw) == ("punct", "["), f"unexpected value token {raw!r}"
        items = []
        while tokens[index] != ("punct", "]"):
            items.append(value())
            if tokens[index] == ("punct", ","):
                take()
        take("punct", "]")
        return items

    def body(closing: bool) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while index < len(tokens) and tokens[index] != ("punct", "}"):
            _, name = take("ident")
            if tokens[index] == ("punct", "="):
                take()
                assert name not in result, f"attribute {name} twice"
                result[name] = value()
                continue
            labels = []
            while tokens[index][0] == "str":
                labels.append(_hcl_unquote(take("str")[1]))
            take("punct", "{")
            inner = body(True)
            target, key = result, name
            for label in labels:
                target, key = target.setdefault(key, {}), label
            assert key not in target, f"block {name} {labels} twice"
            target[key] = inner
        if closing:
            take("punct", "}")
        return result

    parsed = body(False)
    assert index == len(tokens), "trailing tokens"
    return parsed


def go_duration(text: str) -> int:
    units = {"h": 3600 * SECOND, "m": 60 * SECOND, "s": SECOND, "ms": 1_000_000, "ns": 1}
    parts = re.findall(r"(\d+)(ms|ns|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Template]:
    # Rendering never needs the images to be built.
    return load_catalog(DEFAULT_CATALOG, tmp_path_factory.mktemp("images"))


def sizes_of(template: Template) -> list[dict[str, int]]:
    """Lowest, default and highest of every size, plus mixes."""
    low = {s: template.limits.bounds(s)[0] for s in SIZE_NAMES}
    high = {s: template.limits.bounds(s)[1] for s in SIZE_NAMES}
    default = {s: getattr(template.defaults, s) for s in SIZE_NAMES}
    return [low, default, high, {**low, "memory_mb": high["memory_mb"]}, {**high, "cpu": low["cpu"]}]


def spec(template: Template, **overrides: Any) -> VMSpec:
    values: dict[str, Any] = {"id": "0f9c2f4e-5a1b-4c7d-9e2f-3a4b5c6d7e8f", "owner": "42",
                              "overlay_path": "/srv/vmgate/vms/users/42/0f9c2f4e.qcow2", "hostname": "box-1"}
    values.update(overrides)
    return VMSpec.for_template(template, **values)


def all_renders(templates: dict[str, Template]) -> list[tuple[Template, dict[str, int]]]:
    return [(t, s) for t in templates.values() for s in sizes_of(t)]


# ---------------------------------------------------------------- the catalog

def test_catalog_has_the_tiny_template(templates: dict[str, Template]) -> None:
    tiny = templates["tiny"]
    assert tiny.boot == tiny.image_dir / "boot.bin" and tiny.image_dir.name == "tiny"
    assert tiny.disk.name == "disk.qcow2"
    assert tiny.limits.cpu == (1, 2) and tiny.defaults.memory_mb == 256
    assert not tiny.is_built()  # an empty images dir
    assert tiny.to_json()["limits"]["memory_mb"] == [128, 1024]
    assert "image_dir" not in tiny.to_json()


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("boot"), "missing key 'boot'"),
    (lambda t: t.update(disk="../../etc/shadow"), "plain file name"),
    (lambda t: t["limits"].update(cpu=[2, 1]), "limits.cpu"),
    (lambda t: t["defaults"].update(memory_mb=4096), "defaults.memory_mb"),
    (lambda t: t["limits"].update(memory_mb=[64, 256]), "Nomad's 128..4000000"),
    (lambda t: t.update(cmdline="quiet vmgate.hostname=x"), "cmdline"),
    # The boot loader evaluates the command line as GRUB script (images/lib.sh): none of its syntax gets in.
    (lambda t: t.update(cmdline="quiet; reboot"), "cmdline"),
    (lambda t: t.update(cmdline="quiet $root"), "cmdline"),
    (lambda t: t.update(cmdline='quiet "a b"'), "cmdline"),
    (lambda t: t.update(cmdline="quiet  rw"), "cmdline"),
    (lambda t: t.update(cmdline="quiet\nrw"), "cmdline"),
    (lambda t: t.update(idle_suspend_after=-1), "idle_suspend_after"),
    (lambda t: t.update(idle_suspend_after="900"), "idle_suspend_after"),
    (lambda t: t.update(idle_suspend_after=True), "idle_suspend_after"),
])
def test_catalog_errors_name_the_problem(tmp_path: Path, change: Any, message: str) -> None:
    data = json.loads(DEFAULT_CATALOG.read_text())
    change(data["tiny"])
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match=re.escape(message)) as info:
        load_catalog(path, tmp_path)
    assert "'tiny'" in str(info.value)


def test_catalog_file_problems(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CatalogError, match="not valid JSON"):
        load_catalog(tmp_path / "bad.json", tmp_path)


# ---------------------------------------------------------------- rendering

def test_every_template_renders_at_every_size(templates: dict[str, Template]) -> None:
    settings = JobSettings(datacenters=("dc1", "dc2"), namespace="vms", accelerator="tcg", stop_timeout=45)
    for template, sizes in all_renders(templates):
        vm = spec(template, **sizes)
        job = render_job(vm, template, settings)
        json.dumps({"Job": job})  # what POST /v1/jobs takes
        assert job["ID"] == job["Name"] == f"vm-{vm.id}" == job_name(vm.id)
        assert job["Type"] == "service" and job["Namespace"] == "vms" and job["Datacenters"] == ["dc1", "dc2"]
        assert job["Meta"] == {"vm_id": vm.id, "owner": "42", "template": template.name, "network": "none",
                               **({"clipboard": "vdagent"} if template.desktop else {})}
        [group] = job["TaskGroups"]
        assert group["Name"] == "vm" and group["Count"] == 1
        assert group["RestartPolicy"] == {"Attempts": 2, "Interval": 1800 * SECOND, "Delay": 15 * SECOND,
                                          "Mode": "fail"}
        assert group["ReschedulePolicy"]["Unlimited"] is False
        [task] = group["Tasks"]
        assert task["Name"] == "qemu" and task["Driver"] == "qemu"
        assert task["Resources"] == {"CPU": 1000 * sizes["cpu"], "MemoryMB": sizes["memory_mb"]}
        assert task["KillTimeout"] == 45 * SECOND
        assert task["Meta"] == {"hostname": "box-1", "disk_gb": str(sizes["disk_gb"])}
        config = task["Config"]
        assert {k: v for k, v in config.items() if k != "args"} == {
            "image_path": vm.overlay_path, "accelerator": "tcg", "machine_type": "pc",
            "drive_interface": "virtio", "graceful_shutdown": True,
            **({"guest_agent": True} if template.agent else {})}
        display = ["-vga", "none", "-device", "virtio-vga"] if template.desktop else ["-vga", "std"]
        desktop = ["-device", "virtio-tablet-pci", "-device", "virtio-serial-pci,id=vmgate-serial"]
        assert config["args"] == [
            "-smp", str(sizes["cpu"]),
            "-kernel", str(template.boot),
            "-smbios", f"type=11,value={template.cmdline} vmgate.hostname=box-1 vmgate.wake=ttyS1",
            "-vnc", "unix:${NOMAD_TASK_DIR}/vnc.sock",
            "-qmp", "unix:${NOMAD_TASK_DIR}/qmp.sock,server=on,wait=off",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-nodefaults", *display, "-serial", "stdio",
            "-serial", "unix:${NOMAD_TASK_DIR}/wake.sock,server=on,wait=off",
            "-netdev", "hubport,id=net0,hubid=0", "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:76:6d:01",
            "-device", "virtio-rng-pci",
            *(desktop if template.desktop else []),
            "-fw_cfg", "name=opt/vmgate/hostname,string=box-1",
            "-set", "drive.image0.file.auto-read-only=off",
        ]


def test_the_local_driver_reads_the_job_like_nomad(templates: dict[str, Template]) -> None:
    template = templates["tiny"]
    job = render_job(spec(template, id="abc"), template, JobSettings())
    task = build_task("abc", job, Path("/tmp/vg/tasks/abc"), "/usr/bin/qemu-system-x86_64")
    overlay = "/srv/vmgate/vms/users/42/0f9c2f4e.qcow2"
    assert task.argv[:12] == (
        "/usr/bin/qemu-system-x86_64", "-machine", "type=pc,accel=tcg", "-name", "0f9c2f4e.qcow2",
        "-m", "256M", "-drive", f"file={overlay},if=virtio,id=image0", "-nographic",
        "-monitor", "unix:/tmp/vg/tasks/abc/qm.sock,server=on,wait=off")
    assert "unix:/tmp/vg/tasks/abc/vnc.sock" in task.argv
    assert task.vnc is not None and task.vnc.unix_socket == "/tmp/vg/tasks/abc/vnc.sock"
    # The second serial port, which the driver pokes after a restore (jobspecs/devices.py).
    assert task.wake_socket == Path("/tmp/vg/tasks/abc/wake.sock") and task.wake_socket in task.sockets


@pytest.mark.parametrize("serial", ["unix:/tmp/elsewhere/wake.sock,server=on,wait=off", "unix:${NOMAD_TASK_DIR}/w.sock",
                                    "tcp:127.0.0.1:4555,server=on,wait=off", "file:/etc/passwd"])
def test_the_local_driver_takes_one_wake_socket_in_the_task_directory(templates: dict[str, Template],
                                                                      serial: str) -> None:
    template = templates["tiny"]
    job = render_job(spec(template, id="abc"), template, JobSettings())
    job["TaskGroups"][0]["Tasks"][0]["Config"]["args"] += ["-serial", serial]
    with pytest.raises(JobInvalid, match="-serial"):
        build_task("abc", job, Path("/tmp/vg/tasks/abc"), "/usr/bin/qemu-system-x86_64")


@pytest.mark.parametrize("smbios", ["file=/etc/passwd", "type=1,manufacturer=x", "type=11,value=a,file=/etc/passwd",
                                    None])
def test_the_local_driver_takes_only_the_kernel_command_line_as_smbios(templates: dict[str, Template],
                                                                       smbios: str | None) -> None:
    """-smbios file= would load any file QEMU can read into the guest; None: a second OEM string."""
    template = templates["tiny"]
    job = render_job(spec(template, id="abc"), template, JobSettings())
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    if smbios is None:
        args += ["-smbios", "type=11,value=quiet"]
    else:
        args[args.index("-smbios") + 1] = smbios
    with pytest.raises(JobInvalid, match="-smbios"):
        build_task("abc", job, Path("/tmp/vg/tasks/abc"), "/usr/bin/qemu-system-x86_64")


def test_a_comma_in_the_command_line_reaches_the_kernel_as_one(templates: dict[str, Template]) -> None:
    """QEMU splits -smbios at single commas: the renderer doubles them, and the local driver takes that."""
    template = dataclasses.replace(templates["tiny"], cmdline="console=ttyS0,115200 quiet")
    job = render_job(spec(template, id="abc"), template, JobSettings())
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    assert args[args.index("-smbios") + 1].startswith("type=11,value=console=ttyS0,,115200 quiet vmgate.hostname=")
    build_task("abc", job, Path("/tmp/vg/tasks/abc"), "/usr/bin/qemu-system-x86_64")


def test_a_fleet_vm_has_the_wake_port_but_is_not_told_to_wait_on_it(templates: dict[str, Template]) -> None:
    """The same devices on both drivers (a memory state moves between them), but no one on a Nomad node writes
    to the port: the fleet's kernel command line does not say vmgate.wake, so its guest looks by itself."""
    template = templates["tiny"]
    for target, told in (("local", True), ("nomad", False)):
        args = render_job(spec(template), template, JobSettings(target=target))["TaskGroups"][0]["Tasks"][0]
        args = args["Config"]["args"]
        assert args[args.index("-serial", args.index("-serial") + 1) + 1] == \
            "unix:${NOMAD_TASK_DIR}/wake.sock,server=on,wait=off"
        assert args[args.index("-smbios") + 1].endswith(" vmgate.wake=ttyS1") is told


def test_settings_feed_the_job(templates: dict[str, Template]) -> None:
    environ = {"POSTGRES_URL": "postgresql://u:p@127.0.0.1:5432/db", "REDIS_URL": "redis://127.0.0.1:6379/0",
               "JWT_SECRET": "x" * 32, "NOMAD_DATACENTERS": "eu1, eu2", "NOMAD_NAMESPACE": "tenants",
               "QEMU_ACCELERATOR": "kvm", "STOP_TIMEOUT": "12"}
    settings = JobSettings.from_settings(Settings.load(environ=environ, dotenv=Path("/nonexistent")))
    assert settings == JobSettings(datacenters=("eu1", "eu2"), namespace="tenants", accelerator="kvm",
                                   stop_timeout=12)
    job = render_job(spec(templates["tiny"]), templates["tiny"], settings)
    assert job["TaskGroups"][0]["Tasks"][0]["Config"]["accelerator"] == "kvm"
    assert job["TaskGroups"][0]["Tasks"][0]["KillTimeout"] == 12 * SECOND


def test_variables_are_described() -> None:
    table = variables()
    assert set(table) == {"id", "owner", "template", "cpu", "memory_mb", "disk_gb", "overlay_path", "hostname",
                          "userdata", "network", "datacenters", "namespace", "accelerator", "stop_timeout", "target",
                          "restart_attempts", "restart_interval", "restart_delay", "restart_mode", "task_user"}
    for name, var in table.items():
        assert var["type"] in ("string", "number", "list(string)") and var["description"], name
    assert table["datacenters"]["default"] == ["dc1"] and table["stop_timeout"]["default"] == 30
    assert "default" not in table["id"] and table["userdata"]["default"] == ""


def test_names() -> None:
    assert job_name("abc-1") == "vm-abc-1"
    assert vm_id_of("vm-abc-1") == "abc-1"
    assert vm_id_of("websockify") is None and vm_id_of("vm-") is None and vm_id_of("vm-a/b") is None
    with pytest.raises(JobSpecError, match=r"^id: "):
        job_name("../etc")


# ---------------------------------------------------------------- bad variables

@pytest.mark.parametrize(("overrides", "variable"), [
    ({"cpu": 0}, "cpu"), ({"cpu": 3}, "cpu"), ({"cpu": "1"}, "cpu"), ({"cpu": True}, "cpu"),
    ({"memory_mb": 127}, "memory_mb"), ({"memory_mb": 1025}, "memory_mb"), ({"memory_mb": 256.0}, "memory_mb"),
    ({"disk_gb": 0}, "disk_gb"), ({"disk_gb": 11}, "disk_gb"),
    ({"hostname": "two words"}, "hostname"), ({"hostname": "x init=/bin/sh"}, "hostname"),
    ({"hostname": "-lead"}, "hostname"), ({"hostname": "a" * 64}, "hostname"), ({"hostname": "dot.ted"}, "hostname"),
    ({"id": "../up"}, "id"), ({"id": "a b"}, "id"), ({"id": "x" * 65}, "id"),
    ({"overlay_path": "relative.qcow2"}, "overlay_path"),
    ({"overlay_path": "/vms/a.qcow2,if=none,file=/etc/shadow"}, "overlay_path"),
    ({"owner": ""}, "owner"),
])
def test_invalid_variables_raise_a_clear_error(templates: dict[str, Template], overrides: dict[str, Any],
                                               variable: str) -> None:
    template = templates["tiny"]
    vm = replace(spec(template), **overrides)
    with pytest.raises(JobSpecError) as info:
        render_job(vm, template, JobSettings())
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")


def test_size_errors_say_the_limits(templates: dict[str, Template]) -> None:
    template = templates["tiny"]
    with pytest.raises(JobSpecError, match=r"^memory_mb: 2048 is outside 128\.\.1024, the limits of template 'tiny'$"):
        render_job(replace(spec(template), memory_mb=2048), template, JobSettings())


@pytest.mark.parametrize(("settings", "variable"), [
    (JobSettings(accelerator="xen"), "accelerator"), (JobSettings(stop_timeout=0), "stop_timeout"),
    (JobSettings(datacenters=()), "datacenters"), (JobSettings(datacenters=("d c",)), "datacenters"),
    (JobSettings(namespace=""), "namespace"),
])
def test_invalid_settings(templates: dict[str, Template], settings: JobSettings, variable: str) -> None:
    with pytest.raises(JobSpecError) as info:
        render_job(spec(templates["tiny"]), templates["tiny"], settings)
    assert info.value.variable == variable


def test_template_mismatch(templates: dict[str, Template]) -> None:
    template = templates["tiny"]
    with pytest.raises(JobSpecError, match=r"^template: "):
        render_job(replace(spec(template), template="other"), template, JobSettings())


# ---------------------------------------------------------------- HCL

def _check_hcl_matches_json(job: dict[str, Any]) -> None:
    hcl = parse_hcl(to_hcl(job))
    [(label, body)] = hcl["job"].items()
    assert label == job["ID"]
    assert body.get("name", label) == job["Name"]
    assert body["type"] == job["Type"] and body["namespace"] == job["Namespace"]
    assert body["datacenters"] == job["Datacenters"]
    assert body["meta"] == job["Meta"]
    [group] = job["TaskGroups"]
    hgroup = body["group"][group["Name"]]
    assert hgroup["count"] == group["Count"]
    restart = group["RestartPolicy"]
    assert hgroup["restart"] == {"attempts": restart["Attempts"], "interval": hcl_duration(restart["Interval"]),
                                 "delay": hcl_duration(restart["Delay"]), "mode": restart["Mode"]}
    assert go_duration(hgroup["restart"]["interval"]) == restart["Interval"]
    resched = group["ReschedulePolicy"]
    hres = hgroup["reschedule"]
    assert {k: go_duration(hres[h]) for k, h in (("Interval", "interval"), ("Delay", "delay"),
                                                  ("MaxDelay", "max_delay"))} == \
        {k: resched[k] for k in ("Interval", "Delay", "MaxDelay")}
    assert (hres["attempts"], hres["delay_function"], hres["unlimited"]) == \
        (resched["Attempts"], resched["DelayFunction"], resched["Unlimited"])
    [task] = group["Tasks"]
    htask = hgroup["task"][task["Name"]]
    assert htask["driver"] == task["Driver"]
    assert htask["config"] == task["Config"]
    resources = task["Resources"]
    assert htask["resources"] == {"cpu": resources["CPU"], "memory": resources["MemoryMB"],
                                  **({"memory_max": resources["MemoryMaxMB"]} if "MemoryMaxMB" in resources else {})}
    assert go_duration(htask["kill_timeout"]) == task["KillTimeout"]
    # Nomad keeps the serial console (the task's stdout) to two rotated files of 1 MiB.
    assert task["LogConfig"] == {"MaxFiles": 2, "MaxFileSizeMB": 1}
    assert htask["logs"] == {"max_files": 2, "max_file_size": 1}
    assert htask["meta"] == task["Meta"]


def test_hcl_says_what_the_json_says(templates: dict[str, Template]) -> None:
    for template, sizes in all_renders(templates):
        job = render_job(spec(template, **sizes), template, JobSettings(datacenters=("a", "b"), stop_timeout=90))
        _check_hcl_matches_json(job)
    text = to_hcl(job)
    assert text.startswith("# Nomad job vm-")
    assert 'kill_timeout = "1m30s"' in text and 'interval = "30m"' in text
    assert '"-vnc", "unix:${NOMAD_TASK_DIR}/vnc.sock",' in text  # runtime interpolation stays interpolation


HOSTILE = [
    '${file("/etc/passwd")}',
    "%{ if true }x%{ endif }",
    'quote " and backslash \\ and \\" together',
    "new\nline\ttab\rreturn",
    "$${already escaped} and %%{this}",
    "$$${NOMAD_TASK_DIR}",
    "${NOMAD_TASK_DIR} is runtime, $${NOMAD_TASK_DIR} is literal",
    "ünïcødé ✓ \u2028 \x7f \x1b[31m",
    '" }\njob "evil" {\n  type = "batch',
    "$",
    "%",
    "${",
    "trailing $",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_strings_survive_hcl_exactly(templates: dict[str, Template], hostile: str) -> None:
    template = templates["tiny"]
    job = render_job(spec(template, owner=hostile), template, JobSettings())
    assert job["Meta"]["owner"] == hostile
    text = to_hcl(job)
    assert parse_hcl(text)["job"][job["ID"]]["meta"]["owner"] == hostile
    _check_hcl_matches_json(job)
    # Nothing from the owner became HCL syntax: still exactly one job and one group.
    assert text.count("\njob ") + text.startswith("job ") == 1 and text.count("group ") == 1


def test_to_hcl_refuses_fields_it_cannot_print(templates: dict[str, Template]) -> None:
    job = render_job(spec(templates["tiny"]), templates["tiny"], JobSettings())
    with pytest.raises(ValueError, match="no HCL form for Update"):
        to_hcl({**job, "Update": {"MaxParallel": 1}})
    job["TaskGroups"][0]["Tasks"][0]["Meta"]["not an identifier"] = "x"
    with pytest.raises(ValueError, match="not an HCL identifier"):
        to_hcl(job)


def test_durations() -> None:
    assert hcl_duration(1800 * SECOND) == "30m"
    assert hcl_duration(15 * SECOND) == "15s"
    assert hcl_duration(3600 * SECOND) == "1h"
    assert hcl_duration(5430 * SECOND) == "1h30m30s"
    assert hcl_duration(0) == "0s"
    assert hcl_duration(250_000_000) == "250ms"
    with pytest.raises(ValueError):
        hcl_duration(-1)


def test_the_cli_renders_every_template() -> None:
    result = subprocess.run([sys.executable, "-m", "jobspecs", "check"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "tiny: renders at min, default and max sizes" in result.stdout
    result = subprocess.run([sys.executable, "-m", "jobspecs", "render", "--template", "tiny", "--id", "x1",
                             "--owner", "1", "--overlay", "/v/x1.qcow2", "--memory-mb", "64"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "memory_mb: 64 is outside" in result.stderr


@pytest.mark.nomad
@pytest.mark.skipif(shutil.which("nomad") is None, reason="nomad is not on PATH (a real agent binary is needed)")
@pytest.mark.parametrize(("target", "network"), [("local", "none"), ("nomad", "none"), ("nomad", "outbound")])
def test_nomad_parses_the_hcl_into_the_same_job(templates: dict[str, Template], tmp_path: Path, target: str,
                                                network: str) -> None:
    vm = dataclasses.replace(spec(templates["tiny"], owner='${x} "q"'), network=network)
    job = render_job(vm, templates["tiny"], JobSettings(target=target))
    path = tmp_path / "vm.nomad.hcl"
    path.write_text(to_hcl(job))
    result = subprocess.run(["nomad", "job", "run", "-output", str(path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)["Job"]
    assert (parsed["ID"], parsed["Type"], parsed["Datacenters"], parsed["Meta"]) == \
        (job["ID"], job["Type"], job["Datacenters"], job["Meta"])
    [group] = parsed["TaskGroups"]
    ours_restart = job["TaskGroups"][0]["RestartPolicy"]
    # Newer Nomads add their own defaults (RenderTemplates in 2.0); every value we set must come back.
    assert {k: group["RestartPolicy"][k] for k in ours_restart} == ours_restart
    [task] = group["Tasks"]
    ours = job["TaskGroups"][0]["Tasks"][0]
    assert task["Config"] == ours["Config"] and task["KillTimeout"] == ours["KillTimeout"]
    assert task.get("User", "") == ours.get("User", "")  # the fleet's unprivileged task user
    assert {k: task["LogConfig"][k] for k in ours["LogConfig"]} == ours["LogConfig"]
    assert (task["Resources"]["CPU"], task["Resources"]["MemoryMB"]) == (ours["Resources"]["CPU"],
                                                                          ours["Resources"]["MemoryMB"])
    assert task["Resources"].get("MemoryMaxMB") == ours["Resources"].get("MemoryMaxMB")
    if target == "nomad":  # the group's network (a CNI namespace of its own for an outbound VM) and VNC's port
        [net] = group["Networks"]
        [ours_net] = job["TaskGroups"][0]["Networks"]
        assert net["Mode"] == ours_net["Mode"] and [(p["Label"], p.get("To", 0)) for p in net["DynamicPorts"]] == \
            [(p["Label"], p.get("To", 0)) for p in ours_net["DynamicPorts"]]


# ---------------------------------------------------------------- starting from a saved state

@pytest.mark.parametrize("target", ["local", "nomad"])
def test_loadvm_job_starts_the_cold_job_from_a_snapshot_of_its_own_disk(templates: dict[str, Template],
                                                                      tmp_path: Path, target: str) -> None:
    tiny = templates["tiny"]
    settings = JobSettings(target=target)
    cold = render_job(spec(tiny), tiny, settings)
    job = loadvm_job(cold, "vmgate-suspend", settings)
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    assert args == [*cold["TaskGroups"][0]["Tasks"][0]["Config"]["args"], "-loadvm", "vmgate-suspend"]
    assert "-incoming" not in args
    # A scheduler restarting it would load the snapshot again over a disk that moved on: no restarts.
    assert job["TaskGroups"][0]["RestartPolicy"]["Attempts"] == 0
    assert job["TaskGroups"][0]["ReschedulePolicy"]["Attempts"] == 0
    assert job["Meta"]["start"] == "loadvm" and "start" not in cold["Meta"]
    _check_hcl_matches_json(job)
    if target == "local":
        task = build_task(spec(tiny).id, job, tmp_path)
        assert task.argv[-2:] == ("-loadvm", "vmgate-suspend")
    for bad in ("", "-x", "a b", "a,b", "../x", "x" * 65):
        with pytest.raises(JobSpecError, match="snapshot"):
            loadvm_job(cold, bad, settings)


def test_local_driver_accepts_one_plain_loadvm_tag(templates: dict[str, Template], tmp_path: Path) -> None:
    tiny = templates["tiny"]
    job = render_job(spec(tiny), tiny, JobSettings())
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    for extra in (["-loadvm", "a,b"], ["-loadvm", "-snapshot"], ["-loadvm", "s-1", "-loadvm", "s-2"]):
        job["TaskGroups"][0]["Tasks"][0]["Config"]["args"] = [*args, *extra]
        with pytest.raises(JobInvalid, match="-loadvm"):
            build_task(spec(tiny).id, job, tmp_path)


def test_idle_suspend_after_of_a_template(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_CATALOG.read_text())
    data["tiny"]["idle_suspend_after"] = 0
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    tiny = load_catalog(path, tmp_path)["tiny"]
    assert tiny.idle_suspend_after == 0 and tiny.to_json()["idle_suspend_after"] == 0
    assert load_catalog(DEFAULT_CATALOG, tmp_path)["tiny"].idle_suspend_after is None


@pytest.mark.parametrize("target", ["local", "nomad"])
def test_resume_job_restores_the_state_file_of_a_suspend(templates: dict[str, Template], tmp_path: Path,
                                                         target: str) -> None:
    tiny = templates["tiny"]
    settings = JobSettings(target=target)
    cold = render_job(spec(tiny), tiny, settings)
    state = "/srv/vmgate/vms/users/42/0f9c2f4e.state"
    job = resume_job(cold, state, settings)
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    # The same args, the restore added, and the sandbox lets QEMU run `cat` for it (spawn=allow).
    assert args == sandbox.fit([*cold["TaskGroups"][0]["Tasks"][0]["Config"]["args"], "-incoming", f"exec:cat {state}"])
    assert sandbox_of(job) == "on,obsolete=deny,elevateprivileges=deny,spawn=allow,resourcecontrol=deny"
    assert args.count("-set") == 1  # every job opens its disk read-write for good (a suspend needs it)
    assert job["TaskGroups"][0]["RestartPolicy"]["Attempts"] == 0 and job["Meta"]["start"] == "resume"
    _check_hcl_matches_json(job)
    # A job stored before every job said -set gets it with the restore.
    old = json.loads(json.dumps(cold))
    old_args = old["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    at = old_args.index("-set")
    old["TaskGroups"][0]["Tasks"][0]["Config"]["args"] = old_args[:at] + old_args[at + 2:]
    assert resume_job(old, state, settings)["TaskGroups"][0]["Tasks"][0]["Config"]["args"][-4:] == [
        "-set", "drive.image0.file.auto-read-only=off", "-incoming", f"exec:cat {state}"]
    if target == "local":
        assert build_task(spec(tiny).id, job, tmp_path).incoming == state
    for bad in ("relative/x.state", "/a b", "/a;rm", "/x/../etc/shadow", ""):
        with pytest.raises(JobSpecError, match="state"):
            resume_job(cold, bad, settings)


# ---------------------------------------------------------------- QEMU's sandbox

def sandbox_of(job: dict[str, Any]) -> str:
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    return str(args[args.index("-sandbox") + 1])


DENY_ALL = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@pytest.mark.parametrize("target", ["local", "nomad"])
def test_every_job_denies_what_qemu_never_needs(templates: dict[str, Template], target: str) -> None:
    """Obsolete calls, privilege changes, spawning and resource control are denied; a restore through
    `exec:cat` gets spawning back and its cold job loses it again; only the devices a VM needs."""
    tiny = templates["tiny"]
    settings = JobSettings(target=target)
    cold = render_job(spec(tiny), tiny, settings)
    assert sandbox_of(cold) == DENY_ALL
    assert sandbox_of(loadvm_job(cold, "s-1", settings)) == DENY_ALL
    resumed = resume_job(cold, "/srv/vmgate/vms/users/42/x.state", settings)
    assert "spawn=allow" in sandbox_of(resumed)
    back = cold_job(resumed, settings)
    assert sandbox_of(back) == DENY_ALL and "-incoming" not in back["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    args = cold["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    # No default devices (floppy, CD-ROM, parallel port, default NIC, monitor); the display and the serial
    # console (the task's stdout: the VM's log) are named.
    at = args.index("-nodefaults")
    assert args[at:at + 5] == ["-nodefaults", "-vga", "std", "-serial", "stdio"]
    # On a fleet the task runs as an unprivileged account; the local driver picks its own uid per VM.
    task = cold["TaskGroups"][0]["Tasks"][0]
    assert task.get("User") == ("vmgate" if target == "nomad" else None)
    if target == "nomad":
        assert re.search(r'^ +user += "vmgate"$', to_hcl(cold), re.M)
    assert "User" not in render_job(spec(tiny), tiny, replace(settings, task_user=""))["TaskGroups"][0]["Tasks"][0]


def test_the_sandbox_fits_the_start() -> None:
    args = ["-sandbox", "on", "-m", "1"]
    assert sandbox.fit(args) == ["-sandbox", DENY_ALL, "-m", "1"] and args[1] == "on"
    assert sandbox.fit([*args, "-incoming", "exec:cat /s"])[1] == DENY_ALL.replace("spawn=deny", "spawn=allow")
    assert sandbox.fit([*args, "-incoming", "fd:3"])[1] == DENY_ALL  # a descriptor: nothing to spawn
    # QEMU drops root (-runas) after it installs the filter: the drop must stay allowed.
    assert sandbox.fit(args, drops_root=True)[1] == DENY_ALL.replace("elevateprivileges=deny",
                                                                    "elevateprivileges=allow")
    assert sandbox.fit(["-m", "1"]) == ["-m", "1"]

