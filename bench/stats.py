"""Summaries of samples (median, p95, max) and the table the bench prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation between closest ranks (numpy's default).

    With few samples the upper percentiles sit between the largest two: p95 of 5 runs is 0.8 of the way
    from the 4th to the 5th."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "median", "p95", "max", "min", "samples"}`` of ``values`` (NaN when there are none)."""
    return {
        "n": len(values),
        "median": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else math.nan,
        "min": min(values) if values else math.nan,
        "samples": list(values),
    }


@dataclass
class Row:
    """One line of the table: a summary in ``unit``, or a ``note`` (e.g. "not built") instead of figures."""

    name: str
    unit: str
    stats: dict[str, Any] | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


_SCALE = {"ms": 1000.0, "s": 1.0, "MB/s": 1e-6, "MiB": 1 / 2**20, "VMs/s": 1.0, "req/s": 1.0, "x": 1.0,
          "VMs": 1.0, "% core": 100.0}


def fmt(value: float, unit: str) -> str:
    """``value`` (seconds, bytes, bytes/s or a plain number, as stored) shown in ``unit``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    shown = value * _SCALE.get(unit, 1.0)
    if unit == "VMs":
        return f"{shown:.0f}"
    if abs(shown) >= 100:
        return f"{shown:.0f}"
    if abs(shown) >= 10:
        return f"{shown:.1f}"
    return f"{shown:.2f}" if unit != "x" else f"{shown:.3f}"


def table(rows: Sequence[Row]) -> str:
    """A fixed-width text table: figure, unit, n, median, p95, max, target, met."""
    head = ("figure", "unit", "n", "median", "p95", "max", "target", "met")
    lines: list[tuple[str, ...]] = [head]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        if row.stats is None:
            lines.append((row.name, row.unit, "-", row.note or "-", "-", "-", row.target or "-", met))
            continue
        s = row.stats
        lines.append((row.name, row.unit, str(s["n"]), fmt(s["median"], row.unit), fmt(s["p95"], row.unit),
                      fmt(s["max"], row.unit), row.target or "-", met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        cells = [cell.ljust(widths[j]) if j in (0, 1, 6) else cell.rjust(widths[j]) for j, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
