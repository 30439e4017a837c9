"""Print a rendered Nomad job (the API JSON dict) as Nomad HCL, for GitOps and operators.

``to_hcl`` walks the same dict ``render_job`` returns, through a table that maps each API field to
its HCL name; a field the table does not know raises instead of being dropped, so the HCL can
never say less than the JSON. Durations (nanoseconds in the API) print as "30m", "15s".

Strings: Nomad's runtime variables such as ``${NOMAD_TASK_DIR}`` stay interpolations (Nomad's HCL
parser keeps unknown variables for the client to fill in at run time, just as it does in JSON).
Any other ``${`` or ``%{`` is escaped as ``$${`` / ``%%{``, so text that came from a user can never
become an HCL expression or template directive.
"""

from __future__ import annotations

import re
from typing import Any

SECOND = 1_000_000_000

# Kinds of fields: the block's label, a plain attribute, a duration attribute, a nested block,
# a list of labelled blocks, a map printed as a block of string attributes, a driver config block.
LABEL, ATTR, DURATION, BLOCK, BLOCKS, MAP, CONFIG = "label", "attr", "duration", "block", "blocks", "map", "config"

_SCHEMA: dict[str, list[tuple[str, str, str]]] = {
    "job": [
        ("ID", LABEL, ""),
        ("Name", ATTR, "name"),
        ("Type", ATTR, "type"),
        ("Namespace", ATTR, "namespace"),
        ("Datacenters", ATTR, "datacenters"),
        ("Meta", MAP, "meta"),
        ("TaskGroups", BLOCKS, "group"),
    ],
    "group": [
        ("Name", LABEL, ""),
        ("Count", ATTR, "count"),
        ("Networks", BLOCKS, "network"),
        ("Services", BLOCKS, "service"),
        ("RestartPolicy", BLOCK, "restart"),
        ("ReschedulePolicy", BLOCK, "reschedule"),
        ("Meta", MAP, "meta"),
        ("Tasks", BLOCKS, "task"),
    ],
    "network": [
        ("Mode", ATTR, "mode"),
        ("DynamicPorts", BLOCKS, "port"),
    ],
    "port": [
        ("Label", LABEL, ""),
        ("To", ATTR, "to"),
    ],
    "service": [
        ("Name", ATTR, "name"),
        ("PortLabel", ATTR, "port"),
        ("Provider", ATTR, "provider"),
        ("Tags", ATTR, "tags"),
        ("Meta", MAP, "meta"),
        ("Checks", BLOCKS, "check"),
    ],
    "check": [
        ("Name", ATTR, "name"),
        ("Type", ATTR, "type"),
        ("Interval", DURATION, "interval"),
        ("Timeout", DURATION, "timeout"),
    ],
    "template": [
        ("EmbeddedTmpl", ATTR, "data"),
        ("DestPath", ATTR, "destination"),
        ("Envvars", ATTR, "env"),
        ("ChangeMode", ATTR, "change_mode"),
    ],
    "restart": [
        ("Attempts", ATTR, "attempts"),
        ("Interval", DURATION, "interval"),
        ("Delay", DURATION, "delay"),
        ("Mode", ATTR, "mode"),
    ],
    "reschedule": [
        ("Attempts", ATTR, "attempts"),
        ("Interval", DURATION, "interval"),
        ("Delay", DURATION, "delay"),
        ("DelayFunction", ATTR, "delay_function"),
        ("MaxDelay", DURATION, "max_delay"),
        ("Unlimited", ATTR, "unlimited"),
    ],
    "task": [
        ("Name", LABEL, ""),
        ("Driver", ATTR, "driver"),
        ("User", ATTR, "user"),
        ("Config", CONFIG, "config"),
        ("Templates", BLOCKS, "template"),
        ("Resources", BLOCK, "resources"),
        ("KillTimeout", DURATION, "kill_timeout"),
        ("LogConfig", BLOCK, "logs"),
        ("Meta", MAP, "meta"),
    ],
    "logs": [
        ("MaxFiles", ATTR, "max_files"),
        ("MaxFileSizeMB", ATTR, "max_file_size"),
    ],
    "resources": [
        ("CPU", ATTR, "cpu"),
        ("MemoryMB", ATTR, "memory"),
        ("MemoryMaxMB", ATTR, "memory_max"),
    ],
}

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Nomad's runtime variables (interpolated by the client when the task starts); port labels are
# lower case (${NOMAD_IP_vnc}).
_RUNTIME_VAR_RE = re.compile(r"\$\{NOMAD_[A-Za-z0-9_]+\}")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_INDENT = "  "


def hcl_string(value: str) -> str:
    """``value`` as a quoted HCL string that evaluates to exactly ``value`` (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        runtime = _RUNTIME_VAR_RE.match(value, i)
        # After a literal '$', "${" would read as the escape "$${": escape the variable too
        # (Nomad keeps the resulting "${NOMAD_...}" text for run time either way).
        if runtime and not (out and out[-1].endswith("$")):
            out.append(runtime.group())
            i = runtime.end()
            continue
        ch = value[i]
        if value.startswith("${", i) or value.startswith("%{", i):
            out.append(ch + ch + "{")
            i += 2
            continue
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
        i += 1
    return '"' + "".join(out) + '"'


def hcl_duration(nanoseconds: int) -> str:
    """Nanoseconds as a Go duration string Nomad's HCL accepts: 1800e9 -> "30m", 90e9 -> "1m30s"."""
    if not isinstance(nanoseconds, int) or isinstance(nanoseconds, bool) or nanoseconds < 0:
        raise ValueError(f"a duration must be a non-negative integer of nanoseconds, got {nanoseconds!r}")
    if nanoseconds % SECOND:
        if nanoseconds % 1_000_000 == 0:
            return f"{nanoseconds // 1_000_000}ms"
        return f"{nanoseconds}ns"
    seconds = nanoseconds // SECOND
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or "0s"


def _value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return hcl_string(value)
    if isinstance(value, list | tuple):
        items = [_value(item, where) for item in value]
        if sum(len(item) + 2 for item in items) <= 60:
            return "[" + ", ".join(items) + "]"
        # One line per flag and its value: "-smp", "1",
        lines: list[list[str]] = []
        after_flag = False
        for raw, item in zip(value, items, strict=True):
            is_flag = isinstance(raw, str) and raw.startswith("-")
            if after_flag and not is_flag:
                lines[-1].append(item)
                after_flag = False
            else:
                lines.append([item])
                after_flag = is_flag
        body = "".join(f"\n{_INDENT}" + ", ".join(line) + "," for line in lines)
        return "[" + body + "\n]"
    raise ValueError(f"{where}: cannot print {type(value).__name__} {value!r} as HCL")


def _ident(name: str, where: str) -> str:
    if not _IDENT_RE.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not an HCL identifier")
    return name


def _format(items: list[tuple[str, str, list[str] | None]], depth: int) -> list[str]:
    """Attributes (aligned like `nomad fmt`) and blocks, blank lines between groups."""
    pad = _INDENT * depth
    lines: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        if not run:
            return
        if lines:
            lines.append("")
        width = max(len(name) for name, _ in run)
        for name, text in run:
            text = text.replace("\n", "\n" + pad)
            lines.append(f"{pad}{name.ljust(width)} = {text}")
        run.clear()

    for name, text, block in items:
        if block is None:
            run.append((name, text))
            continue
        flush()
        if lines:
            lines.append("")
        lines.append(f"{pad}{text} {{")
        lines.extend(block)
        lines.append(f"{pad}}}")
    flush()
    return lines


def _block(kind: str, obj: Any, depth: int, where: str) -> tuple[str | None, list[str]]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    schema = _SCHEMA[kind]
    known = {key for key, _, _ in schema}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"{where}: no HCL form for {', '.join(unknown)}")
    label: str | None = None
    items: list[tuple[str, str, list[str] | None]] = []
    for key, field_kind, name in schema:
        if key not in obj or obj[key] is None:
            continue
        value = obj[key]
        here = f"{where}.{key}"
        if field_kind == LABEL:
            if not isinstance(value, str) or not _LABEL_RE.fullmatch(value):
                raise ValueError(f"{here}: {value!r} is not a usable block label")
            label = value
        elif field_kind == ATTR:
            if key == "Name" and value == obj.get("ID"):
                continue  # a job's name defaults to its ID
            items.append((name, _value(value, here), None))
        elif field_kind == DURATION:
            items.append((name, hcl_string(hcl_duration(value)), None))
        elif field_kind == BLOCK:
            _, body = _block(name, value, depth + 1, here)
            items.append((name, name, body))
        elif field_kind == BLOCKS:
            if not isinstance(value, list):
                raise ValueError(f"{here}: expected a list")
            for index, child in enumerate(value):
                child_label, body = _block(name, child, depth + 1, f"{here}[{index}]")
                # network, service, check and template blocks have no label.
                items.append((name, name if child_label is None else f"{name} {hcl_string(child_label)}", body))
        elif field_kind in (MAP, CONFIG):
            if not isinstance(value, dict):
                raise ValueError(f"{here}: expected an object")
            if not value and field_kind == MAP:
                continue
            entries: list[tuple[str, str, list[str] | None]] = []
            for sub, sub_value in value.items():
                if field_kind == MAP and not isinstance(sub_value, str):
                    raise ValueError(f"{here}.{sub}: meta values are strings in Nomad")
                entries.append((_ident(sub, here), _value(sub_value, f"{here}.{sub}"), None))
            items.append((name, name, _format(entries, depth + 2)))
    if kind != "job" and label is None and any(k == LABEL for _, k, _ in schema):
        raise ValueError(f"{where}: missing Name")
    return label, _format(items, depth + 1)


def to_hcl(job: dict[str, Any]) -> str:
    """The Nomad HCL of a job dict as returned by ``render_job``; raises ValueError on fields it cannot print."""
    label, body = _block("job", job, 0, "Job")
    if label is None:
        raise ValueError("Job: missing ID")
    header = f"# Nomad job {label}, rendered by vmgate's jobspecs.render_job; edit the renderer, not this file.\n"
    return header + "\n".join([f"job {hcl_string(label)} {{", *body, "}"]) + "\n"
