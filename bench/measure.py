"""The measurements of issue 7's `make bench`, each a coroutine that returns its JSON and its table rows.

Times are ``time.perf_counter`` in the bench process, taken around real HTTP, WebSocket and unix-socket
traffic; nothing is read back from the gateway's own metrics. docs/BENCHMARKS.md says what each figure
means and where its limits are.

Over 400 lines: one function per figure of the report, in the report's order; each reads on its own,
and splitting them up would only scatter the one list a reader compares with docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import Api, BenchError, BenchRFB, Load, connect_unix_nudged, connect_ws, hammer
from bench.stack import Stack, mem_available
from bench.stats import Row, percentile, summary
from gateway.config import Settings

READY = "vmgate-tiny: ready"
DEFAULT_SIZE = {"cpu": 1, "memory_mb": 256, "disk_gb": 1}  # the tiny template's warm size
COLD_SIZE = {"cpu": 1, "memory_mb": 320, "disk_gb": 1}  # any other size renders a cold job

# Targets from issues 7 and 17, judged on the p95 of latencies and on the median of the API ratio.
WARM_TARGET_S = 0.3  # issue 17 (issue 7 asked for 0.5)
RESUME_TARGET_S = 0.3  # issue 17 (issue 7 asked for 0.5)
COLD_TARGET_S = 6.0
API_RATIO_TARGET = 0.5
DENSITY_P99_LIMIT_S = 0.1
# A user's VM count when nobody raised it (QUOTA_MAX_VMS): how many VMs of the density phase one user owns.
DEFAULT_QUOTA_VMS = int(next(f for f in dataclasses.fields(Settings) if f.name == "quota_max_vms").metadata["default"])


@dataclass
class Config:
    """How much of each measurement to do; ``quick`` is for debugging the bench, not for figures."""

    quick: bool = False
    console_runs: int = 5  # cold
    warm_runs: int = 20
    resume_runs: int = 10
    throughput_vms: int = 16
    throughput_clients: int = 8
    throughput_rounds: int = 3
    density_batch: int = 4
    density_cap: int = 160  # issue 17 asks whether 150 fit
    density_time_limit: float = 900.0
    density_requests: int = 200
    density_vms_per_user: int = DEFAULT_QUOTA_VMS
    density_concurrency: int = 8
    density_settle: float = 5.0
    density_min_available: int = 2 * 2**30  # stop before the host runs short of memory
    api_concurrency: int = 64
    api_seconds: float = 5.0
    api_runs: int = 3
    api_listed_vms: int = 3
    relay_seconds: float = 5.0
    relay_pings: int = 50
    relay_runs: int = 3

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls()
        return cls(quick=True, console_runs=2, warm_runs=3, resume_runs=2, throughput_vms=8, throughput_rounds=1,
                   density_cap=8, density_time_limit=180.0, density_settle=2.0, api_seconds=2.0, api_runs=1,
                   relay_seconds=2.0, relay_pings=20, relay_runs=1)


@dataclass
class Context:
    stack: Stack
    config: Config
    api: Api  # the logged-in user most measurements act as
    apis: list[Api] = field(default_factory=list)  # every session opened, closed at the end

    def say(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    async def new_user(self) -> Api:
        api = Api(self.stack.gateway_url, self.stack.outbox)
        self.apis.append(api)
        await api.signup_and_login()
        return api


@dataclass
class Phase:
    """One measurement's outcome: JSON for the results file and rows for the table."""

    data: dict[str, Any]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def vms_destroyed_after(api: Api, vm_ids: list[str]) -> AsyncIterator[None]:
    """Destroy (through the API) every VM id in ``vm_ids`` on the way out, also after a failure."""
    try:
        yield
    finally:
        if vm_ids:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(api.destroy_all(list(vm_ids)), 180)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# ---------------------------------------------------------------------------------------------- 1. console


def driver_start_seconds(stack: Stack, vm_id: str, last: bool = False) -> float | None:
    """The local driver's own "QEMU pid N running after X s" for this VM, from the gateway's log: the part
    of the time to console spent starting QEMU (and, for a warm VM, restoring its memory state); the
    VM's first start, or with ``last`` its latest (a resume)."""
    pattern = re.compile(rf"VM {re.escape(vm_id)}: QEMU pid \d+ running after ([0-9.]+) s")
    try:
        found = pattern.findall(stack.gateway_log.read_text(errors="replace"))
    except OSError:
        return None
    return float(found[-1 if last else 0]) if found else None


async def console_frame(ctx: Context, vm_id: str, since: Any, run: dict[str, Any], frames: Path | None) -> None:
    """Ask the API for the VM's console, connect through websockify and wait for the first guest frame;
    records console_url_s, rfb_connected_s, first_nonblank_s and console_s (``since()``) in ``run``."""
    url = await ctx.api.console_url(vm_id)
    run["console_url_s"] = since()
    rfb = await connect_ws(url, origin=ctx.stack.origin)
    run["rfb_connected_s"] = since()
    try:
        await first_guest_frame(rfb, vm_id, since, run, frames)
    finally:
        await rfb.close()


async def first_guest_frame(rfb: Any, vm_id: str, since: Any, run: dict[str, Any], frames: Path | None) -> None:
    """Ask for frames until one is the guest's and not blank; record when (``since()``) in ``run``."""
    await rfb.request_update(incremental=False)
    deadline = time.perf_counter() + 120
    while True:
        with contextlib.suppress(TimeoutError):
            await rfb.wait_for_update(timeout=1.0)
        if "first_nonblank_s" not in run and not rfb.is_blank():
            run["first_nonblank_s"] = since()
            run["first_nonblank_size"] = [rfb.width, rfb.height]
            if frames is not None and not rfb.is_guest_frame():
                rfb.save_png(frames.with_name(frames.stem + "-first-nonblank.png"))
        if rfb.is_guest_frame():
            run["console_s"] = since()
            run["console_size"] = [rfb.width, rfb.height]
            if frames is not None:
                rfb.save_png(frames)
            return
        if time.perf_counter() > deadline:
            raise BenchError(f"VM {vm_id}: no guest frame within 120 s of connecting")
        await rfb.request_update(incremental=True)


async def _console_once(ctx: Context, sizes: dict[str, int], cold: bool, frames: Path | None,
                        template: str = "tiny", ready: str = READY) -> dict[str, Any]:
    """POST a VM, poll it until running, get a console URL, connect through websockify, and ask for frames
    until one is the guest's and not blank. Times are seconds since just before the POST."""
    api = ctx.api
    created: list[str] = []
    t0 = time.perf_counter()

    def since() -> float:
        return time.perf_counter() - t0

    async with vms_destroyed_after(api, created):
        vm_id = await api.create_vm(template=template, **sizes)
        created.append(vm_id)
        run: dict[str, Any] = {"vm_id": vm_id, "accepted_s": since()}
        await api.wait_state(vm_id, "running", poll=0.02, timeout=180)
        run["running_s"] = since()
        await console_frame(ctx, vm_id, since, run, frames)
        if cold:
            # The first guest frame of a cold boot is the firmware's; the shell comes seconds later.
            while ready not in await api.serial(vm_id):
                if since() > 180:
                    raise BenchError(f"VM {vm_id}: {ready!r} not on the serial console within 180 s")
                await asyncio.sleep(0.1)
            run["serial_ready_s"] = since()
    run["driver_start_s"] = driver_start_seconds(ctx.stack, vm_id)
    await asyncio.sleep(1.0)  # let the destroyed VM's exit settle before the next run
    return run


async def time_to_console(ctx: Context) -> Phase:
    runs: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
    # The cold runs first, then the warm ones back to back ("20 creates in a row", issue 17): a tail that
    # builds up over a series (the queue, the page cache, Postgres) shows in the p95.
    plan = [("cold", COLD_SIZE, i, ctx.config.console_runs) for i in range(ctx.config.console_runs)]
    plan += [("warm", DEFAULT_SIZE, i, ctx.config.warm_runs) for i in range(ctx.config.warm_runs)]
    for kind, sizes, i, total in plan:
        # The first run of each kind keeps the frame it counted as the console, to look at.
        frames = ctx.stack.run_dir / f"console-{kind}.png" if i == 0 else None
        run = await _console_once(ctx, sizes, cold=kind == "cold", frames=frames)
        runs[kind].append(run)
        extra = f", shell ready {run['serial_ready_s']:.2f} s" if "serial_ready_s" in run else ""
        ctx.say(f"time to console {kind} {i + 1}/{total}: {run['console_s']:.3f} s "
                f"(running at {run['running_s']:.3f} s{extra})")
    warm = summary([r["console_s"] for r in runs["warm"]])
    cold = summary([r["console_s"] for r in runs["cold"]])
    phases = ("accepted_s", "driver_start_s", "running_s", "console_url_s", "rfb_connected_s", "first_nonblank_s",
              "console_s")
    breakdown = {kind: {p: percentile([r[p] for r in rs if r.get(p) is not None], 50) for p in phases}
                 for kind, rs in runs.items()}
    ready = summary([r["serial_ready_s"] for r in runs["cold"]])
    data = {"warm": warm, "cold": cold, "cold_serial_ready": ready, "median_breakdown_s": breakdown,
            "runs": runs, "warm_size": DEFAULT_SIZE, "cold_size": COLD_SIZE}
    rows = [
        Row("time to console, warm", "ms", warm, f"p95 <= {WARM_TARGET_S * 1000:.0f} ms",
            warm["p95"] <= WARM_TARGET_S),
        Row("time to console, cold", "s", cold, f"p95 <= {COLD_TARGET_S:g} s", cold["p95"] <= COLD_TARGET_S),
        Row("  cold, to shell ready (serial)", "s", ready),
    ]
    notes = [f"{kind}, medians since the POST: "
             + ", ".join(f"{p.removesuffix('_s')} {_ms(v)}" for p, v in b.items() if p != "driver_start_s")
             + f"; of which QEMU start{' and restore' if kind == 'warm' else ''} (driver's log) "
             + _ms(b["driver_start_s"])
             for kind, b in breakdown.items()]
    return Phase(data, rows, notes)


# ---------------------------------------------------------------------------------------------- 2. resume


async def _resume_once(ctx: Context, vm_id: str, frames: Path | None) -> dict[str, Any]:
    """Suspend the VM (the step idle suspend takes), then time ``GET /console`` (which resumes it) to the
    first non-blank guest frame through websockify. Times are seconds since just before the GET."""
    api = ctx.api
    began = time.perf_counter()
    await api.suspend(vm_id)
    run: dict[str, Any] = {"suspend_s": time.perf_counter() - began}
    await asyncio.sleep(1.0)  # quiet: the suspended VM's QEMU is gone
    t0 = time.perf_counter()

    def since() -> float:
        return time.perf_counter() - t0

    await console_frame(ctx, vm_id, since, run, frames)  # the console URL comes once the VM runs again
    run["driver_start_s"] = driver_start_seconds(ctx.stack, vm_id, last=True)
    return run


async def resume(ctx: Context) -> Phase:
    """Resume from suspend: one warm VM, suspended and resumed by opening its console, again and again."""
    api = ctx.api
    runs: list[dict[str, Any]] = []
    created: list[str] = []
    async with vms_destroyed_after(api, created):
        vm_id = await api.create_vm(**DEFAULT_SIZE)
        created.append(vm_id)
        await api.wait_state(vm_id, "running", poll=0.05, timeout=180)
        for i in range(ctx.config.resume_runs):
            frames = ctx.stack.run_dir / "resume.png" if i == 0 else None
            run = await _resume_once(ctx, vm_id, frames)
            runs.append(run)
            ctx.say(f"resume {i + 1}/{ctx.config.resume_runs}: {run['console_s']:.3f} s to a guest frame "
                    f"(console URL at {run['console_url_s']:.3f} s; suspend took {run['suspend_s']:.2f} s)")
            await asyncio.sleep(1.0)
    figure = summary([r["console_s"] for r in runs])
    suspend = summary([r["suspend_s"] for r in runs])
    phases = ("driver_start_s", "console_url_s", "rfb_connected_s", "first_nonblank_s", "console_s")
    breakdown = {p: percentile([r[p] for r in runs if r.get(p) is not None], 50) for p in phases}
    data = {"resume": figure, "suspend": suspend, "median_breakdown_s": breakdown,
            "runs": runs, "size": DEFAULT_SIZE,
            "how": "POST /api/vms/{id}/suspend?wait=60 (what idle suspend does), 1 s quiet, then the clock runs "
                   "from GET /api/vms/{id}/console (which resumes the VM and answers once it runs) to the "
                   "first non-blank guest frame through websockify"}
    rows = [Row("resume from suspend, to console", "ms", figure, f"p95 <= {RESUME_TARGET_S * 1000:.0f} ms",
                figure["p95"] <= RESUME_TARGET_S),
            Row("  suspend (memory saved, QEMU ended)", "ms", suspend)]
    notes = ["resume, medians since GET /console: " + ", ".join(f"{p.removesuffix('_s')} {_ms(v)}"
                                                                for p, v in breakdown.items() if p != "driver_start_s")
             + "; of which QEMU start and restore (driver's log) " + _ms(breakdown["driver_start_s"])]
    return Phase(data, rows, notes)


# ---------------------------------------------------------------------------------------------- 3. throughput


async def _throughput_round(ctx: Context, clients: list[Api]) -> dict[str, Any]:
    total = ctx.config.throughput_vms
    issued = 0
    created: list[tuple[Api, str]] = []
    latencies: list[float] = []
    started = time.perf_counter()
    last = started

    async def client(api: Api) -> None:
        nonlocal issued, last
        while issued < total:
            issued += 1
            t0 = time.perf_counter()
            vm_id = await api.create_vm(**DEFAULT_SIZE)
            created.append((api, vm_id))
            await api.wait_state(vm_id, "running", poll=0.1, timeout=300)
            now = time.perf_counter()
            latencies.append(now - t0)
            last = max(last, now)

    try:
        await asyncio.gather(*(client(api) for api in clients))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(api.destroy(v) for api, v in created)), 300)
    elapsed = last - started
    return {"vms": total, "clients": len(clients), "elapsed_s": elapsed, "vms_per_s": total / elapsed,
            "create_to_running": summary(latencies)}


async def throughput(ctx: Context) -> Phase:
    clients = [await ctx.new_user() for _ in range(ctx.config.throughput_clients)]
    rounds = []
    for i in range(ctx.config.throughput_rounds):
        result = await _throughput_round(ctx, clients)
        rounds.append(result)
        ctx.say(f"throughput {i + 1}/{ctx.config.throughput_rounds}: {result['vms']} VMs in "
                f"{result['elapsed_s']:.2f} s = {result['vms_per_s']:.2f} VMs/s "
                f"(create to running median {result['create_to_running']['median']:.2f} s)")
        await asyncio.sleep(2.0)
    rate = summary([r["vms_per_s"] for r in rounds])
    per_vm = summary([x for r in rounds for x in r["create_to_running"]["samples"]])
    data = {"vms_per_s": rate, "create_to_running_under_load": per_vm, "rounds": rounds}
    rows = [Row(f"create throughput ({ctx.config.throughput_clients} clients)", "VMs/s", rate),
            Row("  create to running, under that load", "s", per_vm)]
    return Phase(data, rows)


# ---------------------------------------------------------------------------------------------- 4. density


async def _density_step(ctx: Context, api: Api, count: int, baseline_available: int) -> dict[str, Any]:
    load = await hammer(f"{ctx.stack.gateway_url}/api/me/vms", cookie=api.session_cookie,
                        concurrency=ctx.config.density_concurrency, requests=ctx.config.density_requests)
    qemu = ctx.stack.qemu()
    available = mem_available()
    rss = [q.rss for q in qemu]
    pss = [q.pss for q in qemu if q.pss is not None]
    return {"vms": count, "qemu_processes": len(qemu), "api": load.to_json(), "p99_s": load.p99,
            "load_avg": list(os.getloadavg()), "mem_available": available,
            "host_memory_per_vm": (baseline_available - available) / count if count else None,
            "rss": summary(rss), "pss": summary(pss)}


async def density(ctx: Context) -> Phase:
    cfg = ctx.config
    # The VMs belong to users as on a platform: each at most the default quota's VM count. The API load is
    # the first user's list (that many VMs, as in the API phase), so the figure follows the idle VMs, not a
    # list that grows with them (one account holding every VM measured its list's length: docs/BENCHMARKS.md).
    reader = await ctx.new_user()
    owners: list[tuple[Api, list[str]]] = [(reader, [])]
    steps: list[dict[str, Any]] = []
    started = time.monotonic()
    baseline_available = mem_available()
    reason = ""
    async with contextlib.AsyncExitStack() as cleanup:
        await cleanup.enter_async_context(vms_destroyed_after(reader, owners[0][1]))
        steps.append(await _density_step(ctx, reader, 0, baseline_available))
        ctx.say(f"density: 0 VMs, API p99 {_ms(steps[-1]['p99_s'])}")
        while not reason:
            batch: list[tuple[Api, str]] = []
            for _ in range(cfg.density_batch):
                if len(owners[-1][1]) >= cfg.density_vms_per_user:
                    owners.append((await ctx.new_user(), []))
                    await cleanup.enter_async_context(vms_destroyed_after(*owners[-1]))
                owner, owned = owners[-1]
                owned.append(await owner.create_vm(**DEFAULT_SIZE))
                batch.append((owner, owned[-1]))
            vms = sum(len(owned) for _, owned in owners)
            await asyncio.gather(*(owner.wait_state(v, "running", poll=0.2, timeout=300) for owner, v in batch))
            await asyncio.sleep(cfg.density_settle)  # restored guests finish their clone step, then idle
            step = await _density_step(ctx, reader, vms, baseline_available)
            steps.append(step)
            ctx.say(f"density: {vms} VMs, API p99 {_ms(step['p99_s'])}, QEMU RSS median "
                    f"{step['rss']['median'] / 2**20:.0f} MiB, load {step['load_avg'][0]:.1f}")
            if step["p99_s"] > DENSITY_P99_LIMIT_S:
                reason = f"API p99 passed {_ms(DENSITY_P99_LIMIT_S)}"
            elif vms >= cfg.density_cap:
                reason = f"cap of {cfg.density_cap} VMs reached (p99 still under {_ms(DENSITY_P99_LIMIT_S)})"
            elif time.monotonic() - started > cfg.density_time_limit:
                reason = f"time limit of {cfg.density_time_limit:g} s reached"
            elif step["mem_available"] < cfg.density_min_available + 2 * step["rss"]["max"] * cfg.density_batch:
                reason = "the host would run short of memory with another batch"
    under = [s for s in steps if s["p99_s"] <= DENSITY_P99_LIMIT_S]
    # The count is the last step before the first one over the limit.
    count = 0
    for s in steps:
        if s["p99_s"] > DENSITY_P99_LIMIT_S:
            break
        count = s["vms"]
    last = steps[-1]
    at_count = next((s for s in steps if s["vms"] == count), last)
    rss = last["rss"] if last["vms"] else at_count["rss"]
    pss = last["pss"] if last["vms"] else at_count["pss"]
    data = {"vms_under_limit": count, "stopped_because": reason, "p99_limit_s": DENSITY_P99_LIMIT_S,
            "batch": cfg.density_batch, "vms_per_user": cfg.density_vms_per_user, "users": len(owners),
            "requests_per_step": cfg.density_requests,
            "concurrency": cfg.density_concurrency, "steps": steps, "qemu_rss_at_last_step": rss,
            "qemu_pss_at_last_step": pss, "host_memory_per_vm_at_last_step": last["host_memory_per_vm"],
            "steps_under_limit": len(under)}
    rows = [Row("density: idle warm VMs, API p99 <= 100 ms", "VMs", summary([count])),
            Row("  QEMU RSS per VM (last step)", "MiB", rss),
            Row("  QEMU PSS per VM (last step)", "MiB", pss)]
    notes = [f"density stopped: {reason}",
             "density steps (VMs: API p99): " + ", ".join(f"{s['vms']}: {_ms(s['p99_s'])}" for s in steps)]
    if last["host_memory_per_vm"]:
        notes.append(f"host MemAvailable drop per VM at {last['vms']} VMs: "
                     f"{last['host_memory_per_vm'] / 2**20:.0f} MiB")
    return Phase(data, rows, notes)


# ---------------------------------------------------------------------------------------------- 5. API


async def api_throughput(ctx: Context) -> Phase:
    cfg = ctx.config
    api = ctx.api
    vm_ids: list[str] = []
    async with vms_destroyed_after(api, vm_ids):
        # The list the gateway answers holds a few VMs, stopped so no QEMU competes for the CPU.
        for _ in range(cfg.api_listed_vms):
            vm_ids.append(await api.create_vm(**DEFAULT_SIZE))
        for vm_id in vm_ids:
            await api.wait_state(vm_id, "running", poll=0.1)
            await api.stop(vm_id)
        urls = {"gateway": f"{ctx.stack.gateway_url}/api/me/vms", "minimal": f"{ctx.stack.bare_url}/minimal/api/me/vms",
                "bare": f"{ctx.stack.bare_url}/api/me/vms"}
        cookie = api.session_cookie
        for url in urls.values():  # warm-up: connections, caches, the JIT-less interpreter's first calls
            await hammer(url, cookie=cookie, concurrency=cfg.api_concurrency, duration=1.0)
        runs: list[dict[str, Any]] = []
        for i in range(cfg.api_runs):
            order = list(urls)
            order = order[i % 3:] + order[:i % 3]  # each goes first in turn
            loads: dict[str, Load] = {}
            for name in order:
                loads[name] = await hammer(urls[name], cookie=cookie, concurrency=cfg.api_concurrency,
                                           duration=cfg.api_seconds)
            gw, mini, bare = loads["gateway"], loads["minimal"], loads["bare"]
            run_ratio = gw.rps / bare.rps if bare.rps else 0.0
            own_ratio = gw.rps / mini.rps if mini.rps else 0.0
            runs.append({"gateway": gw.to_json(), "minimal": mini.to_json(), "bare": bare.to_json(),
                         "ratio": run_ratio, "ratio_minimal": own_ratio})
            ctx.say(f"API {i + 1}/{cfg.api_runs}: gateway {gw.rps:.0f} req/s p99 {_ms(gw.p99)} "
                    f"({gw.errors} errors), minimal {mini.rps:.0f} req/s p99 {_ms(mini.p99)} ({mini.errors} errors), "
                    f"bare {bare.rps:.0f} req/s p99 {_ms(bare.p99)}; gateway/bare {run_ratio:.3f}, "
                    f"gateway/minimal {own_ratio:.3f}")
    ratio = summary([r["ratio"] for r in runs])
    own = summary([r["ratio_minimal"] for r in runs])
    figures = {f"{name}_{key}": summary([r[name][json_key] for r in runs])
               for name in ("gateway", "minimal", "bare") for key, json_key in (("rps", "rps"), ("p99", "p99_s"))}
    data = {"concurrency": cfg.api_concurrency, "seconds_per_run": cfg.api_seconds, "listed_vms": cfg.api_listed_vms,
            **figures, "ratio": ratio, "ratio_minimal": own, "runs": runs}
    c = cfg.api_concurrency
    rows = [Row(f"API GET /api/me/vms, {c} conns", "req/s", figures["gateway_rps"]),
            Row("  its p99", "ms", figures["gateway_p99"]),
            Row(f"minimal handler, same auth and queries, {c} conns", "req/s", figures["minimal_rps"]),
            Row("  its p99", "ms", figures["minimal_p99"]),
            Row(f"bare aiohttp handler, {c} conns", "req/s", figures["bare_rps"]),
            Row("  its p99", "ms", figures["bare_p99"]),
            Row("API ratio (gateway / bare req/s)", "x", ratio, f">= {API_RATIO_TARGET}",
                ratio["median"] >= API_RATIO_TARGET),
            Row("API ratio (gateway / minimal req/s)", "x", own)]
    errors = sum(r[name]["errors"] for r in runs for name in urls)
    return Phase(data, rows, [f"API: {errors} failed requests"] if errors else [])


# ---------------------------------------------------------------------------------------------- 6. relay


async def _relay_path(ctx: Context, rfb: BenchRFB) -> dict[str, Any]:
    cfg = ctx.config
    await rfb.request_update(incremental=False)
    await rfb.wait_for_update(timeout=15)
    pings = []
    for _ in range(cfg.relay_pings):
        t0 = time.perf_counter()
        await rfb.request_rect(0, 0, 1, 1, incremental=False)
        await rfb.wait_for_update(timeout=15)
        pings.append(time.perf_counter() - t0)
    fulls = []
    received = 0
    started = time.perf_counter()
    while time.perf_counter() - started < cfg.relay_seconds:
        t0 = time.perf_counter()
        await rfb.request_update(incremental=False)
        await rfb.wait_for_update(timeout=15)
        fulls.append(time.perf_counter() - t0)
        received += rfb.frame_bytes
    elapsed = time.perf_counter() - started
    return {"pixel_rtt": summary(pings), "full_rtt": summary(fulls), "frames": len(fulls),
            "frame_bytes": rfb.frame_bytes, "bytes_per_s": received / elapsed, "elapsed_s": elapsed}


async def console_relay(ctx: Context) -> Phase:
    api = ctx.api
    vm_ids: list[str] = []
    runs: list[dict[str, Any]] = []
    async with vms_destroyed_after(api, vm_ids):
        vm_ids.append(await api.create_vm(**DEFAULT_SIZE))
        vm_id = vm_ids[0]
        await api.wait_state(vm_id, "running", poll=0.1)
        await asyncio.sleep(2.0)  # the restored guest settles at its prompt
        socket_path = str(ctx.stack.vnc_socket(vm_id))
        for i in range(ctx.config.relay_runs):
            paths = ["direct", "websockify"] if i % 2 == 0 else ["websockify", "direct"]
            run: dict[str, Any] = {}
            for path in paths:
                if path == "direct":
                    rfb = await connect_unix_nudged(socket_path)
                else:
                    rfb = await connect_ws(await api.console_url(vm_id), origin=ctx.stack.origin)
                try:
                    run[path] = await _relay_path(ctx, rfb)
                finally:
                    await rfb.close()
            d, w = run["direct"], run["websockify"]
            run["added_pixel_rtt_s"] = w["pixel_rtt"]["median"] - d["pixel_rtt"]["median"]
            run["added_full_rtt_s"] = w["full_rtt"]["median"] - d["full_rtt"]["median"]
            run["bytes_ratio"] = w["bytes_per_s"] / d["bytes_per_s"]
            runs.append(run)
            ctx.say(f"relay {i + 1}/{ctx.config.relay_runs}: direct {d['bytes_per_s'] / 1e6:.1f} MB/s, "
                    f"websockify {w['bytes_per_s'] / 1e6:.1f} MB/s; 1x1 round trip direct "
                    f"{d['pixel_rtt']['median'] * 1000:.2f} ms, websockify {w['pixel_rtt']['median'] * 1000:.2f} ms")

    def over_runs(path: str, key: str) -> dict[str, Any]:
        return summary([r[path][key] if key == "bytes_per_s" else r[path][key]["median"] for r in runs])

    data: dict[str, Any] = {
        "seconds_per_path": ctx.config.relay_seconds, "pixel_requests_per_path": ctx.config.relay_pings,
        "direct_bytes_per_s": over_runs("direct", "bytes_per_s"),
        "websockify_bytes_per_s": over_runs("websockify", "bytes_per_s"),
        "direct_pixel_rtt": over_runs("direct", "pixel_rtt"),
        "websockify_pixel_rtt": over_runs("websockify", "pixel_rtt"),
        "added_pixel_rtt": summary([r["added_pixel_rtt_s"] for r in runs]),
        "direct_full_rtt": over_runs("direct", "full_rtt"),
        "websockify_full_rtt": over_runs("websockify", "full_rtt"),
        "added_full_rtt": summary([r["added_full_rtt_s"] for r in runs]),
        "bytes_ratio": summary([r["bytes_ratio"] for r in runs]),
        "runs": runs,
    }
    rows = [Row("console relay, direct VNC socket", "MB/s", data["direct_bytes_per_s"]),
            Row("console relay, through websockify", "MB/s", data["websockify_bytes_per_s"]),
            Row("  websockify / direct bytes/s", "x", data["bytes_ratio"]),
            Row("  1x1 update round trip, direct", "ms", data["direct_pixel_rtt"]),
            Row("  1x1 update round trip, websockify", "ms", data["websockify_pixel_rtt"]),
            Row("  added latency, 1x1 (websockify - direct)", "ms", data["added_pixel_rtt"]),
            Row("  added latency, full frame", "ms", data["added_full_rtt"])]
    return Phase(data, rows)
