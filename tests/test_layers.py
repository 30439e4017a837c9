"""The project's imports point one way (docs/CONTRIBUTING.md "Layers"), there is no import cycle, and no
module grows past MAX_LINES without saying why at its top. Read from the source with ``ast``: every
import counts, also those inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "drivers", "jobspecs", "console", "images", "bench")
MAX_LINES = 400
REASON_MARK = "Over 400 lines:"  # what a longer module's docstring says, followed by why

# The layers, lowest first. A module may import its own layer and the ones listed for it, nothing else
# of the project's. Prefixes match whole dotted names ("gateway.web" covers gateway.web.app).
CORE = ("gateway.config", "gateway.states", "gateway.errors", "gateway.metrics", "gateway.tracing", "gateway.logs",
        "gateway.faults", "gateway.rows", "gateway.credentials")
ALLOWED: dict[str, tuple[str, ...]] = {
    "jobspecs": ("jobspecs",),
    "drivers": ("drivers", "jobspecs"),
    "console": ("console",),
    "images": ("images", "drivers", "jobspecs"),
    **{core: CORE for core in CORE},
    "gateway.store": (*CORE, "gateway.store"),
    "gateway.engine": (*CORE, "gateway.store", "gateway.engine", "drivers", "jobspecs", "console.redis_keys"),
    "gateway.web": (*CORE, "gateway.store", "gateway.engine", "gateway.web", "drivers", "jobspecs", "console"),
    "gateway.cli": ("gateway", "drivers", "jobspecs"),
    "gateway.__main__": ("gateway.cli",),
    "gateway": (),  # the package's own __init__
    "bench": ("bench", "gateway.config", "console", "jobspecs"),
    # The minimal handler beside the bare one (issue 17): the gateway's own session check, queries and views,
    # so that the comparison measures only what the gateway adds around them.
    "bench.bare": ("bench", "gateway.config", "gateway.credentials", "gateway.store", "gateway.web.app",
                   "gateway.web.auth", "gateway.web.http", "gateway.web.views"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "-" not in path.name:  # images/check-tiny.py is a script, not a module
                found[module_name(path)] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (resolved to the longest known module name)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            for alias in node.names:  # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    resolved = set()
    for target in targets:
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in known:
                resolved.add(candidate)
                break
    resolved.discard(name)
    return resolved


def graph() -> dict[str, set[str]]:
    found = sources()
    known = set(found)
    return {name: imports_of(path, name, known) for name, path in found.items()}


def rule_for(name: str) -> tuple[str, tuple[str, ...]]:
    matches = [key for key in ALLOWED if name == key or name.startswith(key + ".")]
    assert matches, f"{name} is in no layer of ALLOWED: add it (and to docs/CONTRIBUTING.md)"
    key = max(matches, key=len)
    return key, ALLOWED[key]


def within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_imports_point_down() -> None:
    wrong = []
    for name, targets in sorted(graph().items()):
        layer, allowed = rule_for(name)
        wrong += [f"{name} ({layer}) imports {t}" for t in sorted(targets) if not within(t, allowed)]
    assert not wrong, "imports against the layers (docs/CONTRIBUTING.md):\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    # A package's __init__ re-exporting its own modules is not a cycle of meaning.
    real = [c for c in cycles if not any(a == b.rpartition(".")[0] or b == a.rpartition(".")[0]
                                         for a, b in itertools.pairwise(c))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_rules_catch_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a store module importing the web layer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from gateway.web.app import create_app\n")
    targets = imports_of(bad, "gateway.store.bad", set(sources()))
    layer, allowed = rule_for("gateway.store.bad")
    assert layer == "gateway.store" and "gateway.web.app" in targets
    assert not within("gateway.web.app", allowed)


@pytest.mark.parametrize("package", PACKAGES)
def test_long_modules_say_why(package: str) -> None:
    long = []
    for name, path in sources().items():
        if not name.startswith(package):
            continue
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and REASON_MARK not in doc:
            long.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not long, f"modules over {MAX_LINES} lines without '{REASON_MARK} <why>' in their docstring:\n" + \
        "\n".join(long)
