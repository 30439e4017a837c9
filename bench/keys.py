"""Issue 17's keystroke figure (``BENCH_ONLY=keys``): key press to echo on the screen, through websockify,
on an idle warm ``tiny`` console. docs/BENCHMARKS.md ("Keystroke to echo") says what it is.

The client behaves as noVNC does: it always has an incremental update request outstanding (a new one as
soon as an update arrives), and it types with pauses of its own between keys, a person's pace from fast
typing to a pause to think. Each sample: the framebuffer is copied, a key is pressed and released
(``x``, then Backspace, so the line never grows), and the clock stops at the first update after which
at least ``ECHO_ROWS`` pixel rows differ from the copy. A character cell is 16 rows high and a glyph
fills about 8 of them, where the blinking text cursor changes 2: a blink is not an echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from bench.client import BenchRFB, connect_ws
from bench.measure import DEFAULT_SIZE, Context, Phase, vms_destroyed_after
from bench.stats import Row, summary
from console.rfb import XK_BACKSPACE

KEYSTROKE_TARGET_S = 0.05
ECHO_ROWS = 4
PAUSES = (0.05, 2.0)  # seconds between one echo and the next key press, drawn uniformly
ECHO_TIMEOUT = 10.0


def rows_changed(before: bytes, after: bytes | bytearray, width: int) -> int:
    """How many pixel rows of ``after`` differ from ``before`` (32-bit pixels, ``width`` a row)."""
    stride = width * 4
    if len(before) != len(after):
        return len(after) // stride if stride else 0
    return sum(1 for start in range(0, len(after), stride)
               if before[start:start + stride] != after[start:start + stride])


async def _follow(rfb: BenchRFB) -> None:
    """noVNC's loop: an incremental request always outstanding, a new one as each update arrives."""
    seen = rfb.update_count
    await rfb.request_update(incremental=True)
    while True:
        seen = await rfb.wait_for_update(timeout=3600, since=seen)
        await rfb.request_update(incremental=True)


async def keystroke(rfb: BenchRFB, keysym: int) -> float:
    """Press and release ``keysym``; seconds until the screen shows the echo."""
    before = rfb.snapshot()
    mark = rfb.update_count
    started = time.perf_counter()
    await rfb.key(keysym)
    deadline = started + ECHO_TIMEOUT
    while rows_changed(before, rfb.framebuffer, rfb.width) < ECHO_ROWS:
        mark = await rfb.wait_for_update(timeout=max(0.01, deadline - time.perf_counter()), since=mark)
    return time.perf_counter() - started


async def measure_keys(rfb: BenchRFB, count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` keystrokes (``x`` and Backspace in turn) with random pauses; one dict per sample."""
    samples = []
    for i in range(count):
        pause = rng.uniform(*PAUSES)
        await asyncio.sleep(pause)
        keysym = ord("x") if i % 2 == 0 else XK_BACKSPACE
        samples.append({"key": "x" if keysym == ord("x") else "BackSpace", "pause_s": pause,
                        "echo_s": await keystroke(rfb, keysym)})
    if count % 2:  # leave the prompt as it was
        await rfb.key(XK_BACKSPACE)
    return samples


async def keys(ctx: Context) -> Phase:
    api = ctx.api
    count = 10 if ctx.config.quick else 60
    rng = random.Random(17)  # noqa: S311  (not secret: the same pauses in every run, so runs compare
    vm_ids: list[str] = []
    async with vms_destroyed_after(api, vm_ids):
        vm_ids.append(await api.create_vm(**DEFAULT_SIZE))
        vm_id = vm_ids[0]
        await api.wait_state(vm_id, "running", poll=0.1)
        rfb = await connect_ws(await api.console_url(vm_id), origin=ctx.stack.origin)
        follower: asyncio.Task[None] | None = None
        try:
            await rfb.request_update(incremental=False)
            await rfb.wait_for_update(timeout=15)
            follower = asyncio.create_task(_follow(rfb))
            await asyncio.sleep(3.0)  # idle: the guest settles at its prompt, QEMU's refresh slows down
            samples = await measure_keys(rfb, count, rng)
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await follower
            await rfb.close()
    echo = summary([s["echo_s"] for s in samples])
    after_pause = summary([s["echo_s"] for s in samples if s["pause_s"] >= 1.0])
    typing = summary([s["echo_s"] for s in samples if s["pause_s"] < 0.5])
    ctx.say(f"keys: {len(samples)} keystrokes, echo median {echo['median'] * 1000:.0f} ms, "
            f"p95 {echo['p95'] * 1000:.0f} ms")
    data = {"vm_id": vm_id, "keystrokes": len(samples), "pauses_s": list(PAUSES), "echo": echo,
            "echo_after_pause_1s": after_pause, "echo_typing_under_0_5s": typing, "samples": samples}
    rows = [Row("keystroke -> echo, websockify", "ms", echo, f"p95 <= {KEYSTROKE_TARGET_S * 1000:.0f} ms",
                echo["p95"] <= KEYSTROKE_TARGET_S),
            Row("  after a pause of 1-2 s", "ms", after_pause),
            Row("  typing (pause < 0.5 s)", "ms", typing)]
    return Phase(data, rows)
