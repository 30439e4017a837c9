"""``python -m gateway.cli jobspec ...``: a VM's Nomad job for operators and GitOps.

    jobspec render VM_ID [--format hcl|json]   the job the VM runs (as stored with it in Postgres)
    jobspec export DIR                         every live VM's job as DIR/vm-<id>.nomad.hcl; files of
                                               VMs that are gone are removed, so DIR mirrors the fleet
    jobspec validate                           render every template x (min, default, max) sizes for both
                                               targets and networks and check them; with `nomad` on PATH, also
                                               `nomad job run -output` (offline parse) and
                                               `nomad job validate` (asks the agent at NOMAD_ADDR)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway import states
from gateway.cli.common import Refused, in_db
from gateway.config import REPO_ROOT, Settings
from gateway.rows import VmRow

CLIENT_HCL = REPO_ROOT / "nomad" / "client.hcl"
EXPORT_RE = re.compile(r"^vm-[0-9a-f-]{36}\.nomad\.hcl$")
# Every state but destroyed and error: a VM whose job Nomad holds or will hold again.
_ALLOWLIST_RE = re.compile(r"args_allowlist\s*=\s*\[(?P<body>[^\]]*)\]", re.S)


class JobspecRefused(Refused):
    """The command cannot do what was asked; the message says why."""


def add_parser(commands: Any) -> None:
    """Add the ``jobspec`` group to the CLI's sub-commands."""
    group = commands.add_parser("jobspec", help="render, export or validate VMs' Nomad jobs",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = group.add_subparsers(dest="jobspec_command", required=True)
    render = sub.add_parser("render", help="print a VM's job (HCL, or the API JSON with --format json)")
    render.add_argument("vm_id")
    render.add_argument("--format", choices=("hcl", "json"), default="hcl")
    export = sub.add_parser("export", help="write every live VM's job as DIR/vm-<id>.nomad.hcl")
    export.add_argument("dir", type=Path)
    sub.add_parser("validate", help="render and check every template at several sizes (and ask nomad)")


def client_allowlist(path: Path = CLIENT_HCL) -> set[str]:
    """The qemu plugin's ``args_allowlist`` in the operators' client configuration."""
    match = _ALLOWLIST_RE.search(path.read_text())
    if not match:
        raise JobspecRefused(f"{path} has no args_allowlist")
    return set(re.findall(r'"([^"]+)"', re.sub(r"#[^\n]*", "", match.group("body"))))


def flags_of(job: dict[str, Any]) -> list[str]:
    """Every flag (argument starting with '-') in the job's qemu args, as Nomad's allowlist sees them."""
    args = job["TaskGroups"][0]["Tasks"][0]["Config"].get("args", [])
    return [arg for arg in args if isinstance(arg, str) and arg.startswith("-")]


async def _rows(settings: Settings, vm_id: str | None) -> list[VmRow]:
    from gateway import store

    async def work(cur: Any) -> list[VmRow]:
        if vm_id is not None:
            row = await store.vms.vm_by_id(cur, vm_id)
            return [row] if row else []
        return await store.vms.vms_in_states(cur, states.HAS_JOB)

    return await in_db(settings, work)


def render(settings: Settings, vm_id: str, fmt: str) -> str:
    """The stored job of one VM, as HCL or as ``{"Job": ...}`` JSON."""
    from gateway.store.db import is_uuid
    from jobspecs import to_hcl

    if not is_uuid(vm_id):
        raise JobspecRefused(f"{vm_id!r} is not a VM id (a UUID)")
    rows = asyncio.run(_rows(settings, vm_id))
    if not rows:
        raise JobspecRefused(f"no VM {vm_id}")
    job = rows[0]["jobspec"]
    if not job:
        raise JobspecRefused(f"VM {vm_id} has no job (state {rows[0]['state']}: it failed before rendering)")
    return json.dumps({"Job": job}, indent=2) + "\n" if fmt == "json" else to_hcl(job)


def export(settings: Settings, directory: Path) -> str:
    """Write each live VM's job to ``directory``; remove exported files of VMs that are no longer live."""
    from jobspecs import to_hcl

    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(row["id"], job) for row in asyncio.run(_rows(settings, None)) if (job := row["jobspec"])]
    written: set[str] = set()
    for vm_id, job in jobs:
        name = f"vm-{vm_id}.nomad.hcl"
        text = to_hcl(job)
        path = directory / name
        if not path.exists() or path.read_text() != text:  # unchanged files keep their mtime
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".vm-", suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        written.add(name)
    removed = [p for p in directory.iterdir() if EXPORT_RE.fullmatch(p.name) and p.name not in written]
    for path in removed:
        path.unlink()
    return f"exported {len(written)} job(s) to {directory}, removed {len(removed)} of VMs that are gone"


def _nomad(argv: list[str], settings: Settings) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NOMAD_ADDR=settings.nomad_addr)
    for key, value in (("NOMAD_TOKEN", settings.nomad_token), ("NOMAD_CACERT", settings.nomad_cacert),
                       ("NOMAD_CLIENT_CERT", settings.nomad_client_cert),
                       ("NOMAD_CLIENT_KEY", settings.nomad_client_key)):
        if value:
            env[key] = str(value)
    return subprocess.run(["nomad", *argv], capture_output=True, text=True, env=env, timeout=60, check=False)


def validate(settings: Settings, out: Any = sys.stdout) -> int:
    """Render and check every template x sizes x target; returns the number of problems found."""
    from dataclasses import replace

    from drivers.local import build_task
    from jobspecs import DEFAULT_CATALOG, JobSettings, VMSpec, load_catalog, render_job, to_hcl
    from jobspecs.catalog import SIZE_NAMES

    allowed = client_allowlist()
    problems = 0
    base = JobSettings.from_settings(settings)
    nomad = shutil.which("nomad")
    with tempfile.TemporaryDirectory(prefix="vmgate-jobs-") as tmp:
        hcl_files: list[Path] = []
        for template in load_catalog(DEFAULT_CATALOG, settings.images_dir).values():
            for pick, label in ((0, "min"), (None, "default"), (1, "max")):
                sizes: dict[str, Any] = {s: getattr(template.defaults, s) if pick is None
                                         else template.limits.bounds(s)[pick] for s in SIZE_NAMES}
                vm_id = f"validate-{template.name}-{label}"
                spec = VMSpec.for_template(template, id=vm_id, owner="0",
                                           overlay_path=settings.vms_root / "users" / "0" / f"{vm_id}.qcow2",
                                           **sizes)
                for target, network in (("local", "none"), ("local", "outbound"), ("nomad", "none"),
                                        ("nomad", "outbound")):
                    where = f"{template.name} {label} ({target}, {network})"
                    try:
                        job = render_job(replace(spec, network=network), template, replace(base, target=target))
                        json.dumps({"Job": job})
                        text = to_hcl(job)
                        missing = sorted(set(flags_of(job)) - allowed)
                        if missing:
                            raise ValueError(f"flags not in {CLIENT_HCL.name} args_allowlist: {' '.join(missing)}")
                        if target == "local":
                            build_task(vm_id, job, settings.vms_root / "tasks" / vm_id)  # pure: no file touched
                    except Exception as exc:  # report every problem, not just the first
                        problems += 1
                        print(f"FAIL {where}: {exc}", file=out)
                        continue
                    path = Path(tmp) / f"{vm_id}-{target}-{network}.nomad.hcl"
                    path.write_text(text)
                    hcl_files.append(path)
                    print(f"ok   {where}", file=out)
        if nomad is None:
            print("nomad is not on PATH: skipped `nomad job run -output` and `nomad job validate` "
                  "(install the nomad CLI to check the HCL with Nomad itself)", file=out)
            return problems
        for path in hcl_files:
            parsed = _nomad(["job", "run", "-output", str(path)], settings)
            if parsed.returncode != 0:
                problems += 1
                print(f"FAIL nomad parse {path.name}: {parsed.stderr.strip()[:500]}", file=out)
                continue
            checked = _nomad(["job", "validate", str(path)], settings)
            text = (checked.stdout + checked.stderr).strip()
            if checked.returncode == 0 and "couldn't be established" in text:
                # Nomad validates the job offline but cannot check the qemu driver's config without an agent.
                print(f"ok   nomad job validate {path.name} (offline: no agent at {settings.nomad_addr}, "
                      "so the qemu driver's config was not checked)", file=out)
            elif checked.returncode == 0:
                print(f"ok   nomad job validate {path.name}", file=out)
            elif "connection refused" in text.lower() or "no such host" in text.lower():
                print(f"ok   nomad parse {path.name}; `nomad job validate` skipped: no Nomad agent at "
                      f"{settings.nomad_addr}", file=out)
            else:
                problems += 1
                print(f"FAIL nomad job validate {path.name}: {text[:500]}", file=out)
    return problems


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one jobspec command; returns the exit status (0 ok, 1 refused or invalid)."""
    if args.jobspec_command == "render":
        sys.stdout.write(render(settings, args.vm_id, args.format))
        return 0
    if args.jobspec_command == "export":
        print(export(settings, args.dir))
        return 0
    problems = validate(settings)
    print(f"{problems} problem(s)" if problems else "every job is valid")
    return 1 if problems else 0
