"""``python -m bench`` (what `make bench` runs through deploy/bench.sh): start the stack, run the measurements,
print the table, write ``bench/results/<date>-<time>/results.json`` next to the logs of the run.

Options come from the command line or the environment: ``BENCH_QUICK=1`` (``--quick``) runs a little of
everything to check the bench itself; ``BENCH_ONLY=api,relay`` (``--only``) picks measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import keys, measure, templates
from bench.client import Api
from bench.measure import Config, Context, Phase
from bench.stack import REPO, RESULTS, Stack, StackError
from bench.stats import Row, table

# In the order they run: the quiet ones first, the one that fills the machine last.
PHASES: dict[str, Callable[[Context], Awaitable[Phase]]] = {
    "api": measure.api_throughput,
    "relay": measure.console_relay,
    "keys": keys.keys,
    "console": measure.time_to_console,
    "resume": measure.resume,
    "templates": templates.templates,
    "throughput": measure.throughput,
    "density": measure.density,
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False, cwd=REPO).stdout
    except OSError:
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def host_info() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:")), 0)
    dirty = bool(_first_line(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "cpus": os.cpu_count(), "load_avg": list(os.getloadavg()), "mem_total": total,
        "kernel": platform.release(), "python": platform.python_version(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "git_commit": _first_line(["git", "rev-parse", "HEAD"]) + ("+changes" if dirty else ""),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


async def run_all(stack: Stack, config: Config, only: list[str], report: dict[str, Any],
                  rows: list[Row], notes: list[str]) -> None:
    """Run the chosen measurements in order; one that fails is reported as failed and the rest still run."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    api = Api(stack.gateway_url, stack.outbox)
    ctx = Context(stack, config, api, [api])
    try:
        await api.signup_and_login()
        for name, phase in PHASES.items():
            if name not in only:
                continue
            ctx.say(f"--- {name}")
            try:
                result = await phase(ctx)
            except Exception as exc:  # reported in the table and the JSON; the next measurement still runs
                ctx.say(f"{name} failed: {exc!r}")
                report["results"][name] = {"status": "failed", "error": repr(exc),
                                           "traceback": traceback.format_exc()}
                rows.append(Row(name, "", None, note="FAILED (see results.json)"))
                stack.check_alive()
                continue
            report["results"][name] = result.data
            rows.extend(result.rows)
            notes.extend(result.notes)
    finally:
        for session in ctx.apis:
            await session.close()


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if not row.target:
            continue
        value = None if row.stats is None else row.stats["p95" if "p95" in row.target else "median"]
        out.append({"figure": row.name, "target": row.target, "value": value, "unit": row.unit,
                    "met": row.met, "note": row.note})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=_truthy(os.environ.get("BENCH_QUICK")),
                        help="a few runs of each, to check the bench (env BENCH_QUICK=1)")
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                        help=f"comma-separated subset of: {', '.join(PHASES)} (env BENCH_ONLY)")
    args = parser.parse_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()] or list(PHASES)
    unknown = sorted(set(only) - set(PHASES))
    if unknown:
        parser.error(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    config = Config.make(args.quick)

    started = dt.datetime.now(dt.UTC)
    run_dir = RESULTS / started.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started_at": started.isoformat(timespec="seconds"), "host": host_info(),
                              "config": dataclasses.asdict(config), "measurements": only, "results": {}}
    if report["host"]["load_avg"][0] > 1.0:
        print(f"bench: warning: the host's load average is {report['host']['load_avg'][0]:.2f} before the "
              "bench starts; other work will skew the figures", file=sys.stderr)
    rows: list[Row] = []
    notes: list[str] = []
    status = 0
    stack: Stack | None = None
    try:
        stack = Stack.start(run_dir, sys.stderr)
        asyncio.run(run_all(stack, config, only, report, rows, notes))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; cleaning up", file=sys.stderr)
        report["interrupted"] = True
        status = 130
    except StackError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        status = 1
    except Exception as exc:  # a server not answering, a bug: say so, still clean up and write what there is
        traceback.print_exc()
        report["error"] = repr(exc)
        status = 1
    finally:
        if stack is not None:
            print("bench: stopping the stack, killing the bench's QEMUs, dropping the bench database",
                  file=sys.stderr)
            stack.close()

    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["host"]["load_avg_at_end"] = list(os.getloadavg())
    report["targets"] = targets(rows)
    out = run_dir / "results.json"
    out.write_text(json.dumps(_clean(report), indent=2) + "\n")

    mode = " (QUICK: too few runs for figures)" if config.quick else ""
    host = report["host"]
    print(f"\nvmgate bench, {report['started_at']}{mode}: {host['cpus']} CPUs, {host['qemu']}, "
          f"load {host['load_avg'][0]:.2f} at start")
    if rows:
        print(table(rows))
    for note in notes:
        print(f"  {note}")
    print(f"\nresults: {out.relative_to(REPO)} (logs next to it)")
    if any(r.note.startswith("FAILED") for r in rows) and status == 0:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
