"""Issue 14's figures, side by side for the Debian templates (``BENCH_ONLY=templates``): time to console warm
and cold, memory and CPU of an idle VM, resume from suspend; and an idle warm ``tiny`` clone's memory and CPU
(issue 17). docs/BENCHMARKS.md ("Debian templates") says what each is.

A template whose image or warm layer is not built is left out with a note (``make images`` builds them).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.measure import DEFAULT_SIZE, Context, Phase, _console_once, _resume_once, vms_destroyed_after
from bench.stats import Row, summary
from jobspecs import DEFAULT_CATALOG, load_catalog

# name: (warm p95 goal in s, the serial line that says the guest is up, a size that renders a cold job)
TEMPLATES: dict[str, tuple[float, str, dict[str, int]]] = {
    "debian-12": (1.0, "vmgate-debian: ready", {"cpu": 1, "memory_mb": 640, "disk_gb": 4}),
    "debian-12-desktop": (2.0, "vmgate-desktop: ready", {"cpu": 1, "memory_mb": 1280, "disk_gb": 6}),
}
COLD_RUNS = 2  # a cold Debian boot takes a minute under TCG
IDLE_SETTLE = 20.0  # seconds an idle VM is left before its memory is read
IDLE_CPU_WINDOW = 30.0  # seconds over which an idle VM's QEMU's CPU time is taken, right after that


def _qemu_pid(stack: Any, vm_id: str) -> int:
    return int((stack.vms_root / "tasks" / vm_id / "qemu.pid").read_text().split()[0])


def qemu_memory_kib(stack: Any, vm_id: str) -> dict[str, int]:
    """The VM's QEMU process: resident and proportional set size (KiB) from /proc (the local driver's pid file)."""
    pid = _qemu_pid(stack, vm_id)
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.endswith("kB")}
    return {"rss_kib": fields.get("Rss", 0), "pss_kib": fields.get("Pss", 0)}


def qemu_cpu_seconds(stack: Any, vm_id: str) -> float:
    """CPU time (user and system, all threads) the VM's QEMU has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{_qemu_pid(stack, vm_id)}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime: fields 14 and 15


async def _idle_and_resume(ctx: Context, template: str, default: dict[str, int],
                           resume: bool = True) -> dict[str, Any]:
    """One warm VM left idle: its QEMU's memory, its CPU over ``IDLE_CPU_WINDOW``, then suspend and resume it
    (console to first frame)."""
    api = ctx.api
    created: list[str] = []
    async with vms_destroyed_after(api, created):
        vm_id = await api.create_vm(template=template, **default)
        created.append(vm_id)
        await api.wait_state(vm_id, "running", poll=0.05, timeout=180)
        await asyncio.sleep(IDLE_SETTLE)
        result: dict[str, Any] = {"memory": qemu_memory_kib(ctx.stack, vm_id), "resumes": []}
        before = qemu_cpu_seconds(ctx.stack, vm_id)
        await asyncio.sleep(IDLE_CPU_WINDOW)
        result["cpu_share"] = (qemu_cpu_seconds(ctx.stack, vm_id) - before) / IDLE_CPU_WINDOW
        for _ in range(max(1, ctx.config.resume_runs // 2) if resume else 0):
            result["resumes"].append(await _resume_once(ctx, vm_id, None))
            await asyncio.sleep(1.0)
    return result


async def templates(ctx: Context) -> Phase:
    catalog = load_catalog(DEFAULT_CATALOG, ctx.stack.settings.images_dir)
    data: dict[str, Any] = {}
    rows: list[Row] = []
    notes: list[str] = []
    for name, (goal, ready, cold_size) in TEMPLATES.items():
        template = catalog.get(name)
        if template is None or not template.is_built() or template.warm_image() is None:
            notes.append(f"{name}: not built with its warm layer here (make images); left out")
            continue
        default = {size: getattr(template.defaults, size) for size in ("cpu", "memory_mb", "disk_gb")}
        warm_runs, cold_runs = [], []
        for i in range(ctx.config.console_runs):
            frames = ctx.stack.run_dir / f"console-{name}-warm.png" if i == 0 else None
            warm_runs.append(await _console_once(ctx, default, False, frames, name, ready))
            ctx.say(f"{name} warm {i + 1}/{ctx.config.console_runs}: {warm_runs[-1]['console_s']:.3f} s")
        for i in range(min(COLD_RUNS, ctx.config.console_runs)):
            frames = ctx.stack.run_dir / f"console-{name}-cold.png" if i == 0 else None
            cold_runs.append(await _console_once(ctx, cold_size, True, frames, name, ready))
            ctx.say(f"{name} cold {i + 1}: first frame {cold_runs[-1]['console_s']:.2f} s, "
                    f"ready {cold_runs[-1]['serial_ready_s']:.1f} s")
        idle = await _idle_and_resume(ctx, name, default)
        warm = summary([r["console_s"] for r in warm_runs])
        cold = summary([r["console_s"] for r in cold_runs])
        cold_ready = summary([r["serial_ready_s"] for r in cold_runs])
        resumed = summary([r["console_s"] for r in idle["resumes"]])
        data[name] = {"warm": warm, "cold": cold, "cold_ready": cold_ready, "resume": resumed, "idle": idle,
                      "warm_runs": warm_runs, "cold_runs": cold_runs, "default_size": default}
        rows += [
            Row(f"{name}: time to console, warm", "ms", warm, f"p95 <= {goal * 1000:.0f} ms", warm["p95"] <= goal),
            Row(f"{name}: cold, first frame (firmware)", "s", cold),
            Row(f"{name}: cold, to {ready.split(':')[0]} ready", "s", cold_ready),
            Row(f"{name}: resume from suspend", "ms", resumed),
        ]
        rows.append(_idle_cpu_row(name, idle))
        notes.append(_idle_note(name, idle, default))
    # Issue 17: the same for tiny, whose console and resume figures are the console and resume phases'.
    tiny = catalog.get("tiny")
    if tiny is not None and tiny.is_built() and tiny.warm_image() is not None:
        idle = await _idle_and_resume(ctx, "tiny", DEFAULT_SIZE, resume=False)
        data["tiny"] = {"idle": idle, "default_size": DEFAULT_SIZE}
        rows.append(_idle_cpu_row("tiny", idle))
        notes.append(_idle_note("tiny", idle, DEFAULT_SIZE))
    ctx.say("templates: " + json.dumps({k: v.get("warm", v["idle"]["cpu_share"]) for k, v in data.items()}))
    return Phase(data, rows, notes)


def _idle_cpu_row(name: str, idle: dict[str, Any]) -> Row:
    return Row(f"{name}: idle VM's QEMU, CPU", "% core", summary([idle["cpu_share"]]))


def _idle_note(name: str, idle: dict[str, Any], size: dict[str, int]) -> str:
    return (f"{name}: idle VM's QEMU after {IDLE_SETTLE:g} s: RSS {idle['memory']['rss_kib'] // 1024} MiB, "
            f"PSS {idle['memory']['pss_kib'] // 1024} MiB (guest memory {size['memory_mb']} MB); "
            f"CPU over the next {IDLE_CPU_WINDOW:g} s {idle['cpu_share'] * 100:.2f} % of a core")
