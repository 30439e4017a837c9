"""A fleet VM's VNC password: a new one for every start, set in the job the Nomad driver submits.

On a fleet QEMU's VNC listens on the node's private address (a unix socket cannot reach websockify on
another node), so whoever reaches that address could open the console. Every fleet start therefore carries a
fresh random password: the job's args get ``-object secret,id=vmgate-vnc,data=PASSWORD`` and the ``-vnc``
option ``password-secret=vmgate-vnc``, and QEMU then asks every VNC client for it (RFB security type 2, VNC
authentication). The gateway reads it back from the job Nomad runs (``password_of``) into the VM's console
target in Redis; websockify answers QEMU's challenge on the browser's behalf (console/vnc_auth.py), so the
password never reaches a browser.

VNC authentication uses at most 8 characters (DES): ``new_password`` gives 8 of 62 (47 bits), new at each
start. It keeps out anyone who merely reaches the port; it is no encryption of the session (docs/SECURITY.md).
The local driver needs none: its VNC is a unix socket in a 0700 directory.
"""

from __future__ import annotations

import copy
import itertools
import re
import secrets
import string
from typing import Any

SECRET_ID = "vmgate-vnc"  # noqa: S105 (the name of the QEMU object holding it, not a password)
LENGTH = 8  # what VNC authentication uses of a password
ALPHABET = string.ascii_letters + string.digits
PASSWORD = rf"[A-Za-z0-9]{{1,{LENGTH}}}"
_SECRET_RE = re.compile(rf"secret,id={SECRET_ID},data=({PASSWORD})")
_OPTION = f",password-secret={SECRET_ID}"


def new_password() -> str:
    """A random VNC password: LENGTH characters of A-Z a-z 0-9."""
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def _args(job: dict[str, Any]) -> list[str]:
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    if not isinstance(args, list):
        raise ValueError("the job's task has no args list")
    return args


def with_password(job: dict[str, Any], password: str) -> dict[str, Any]:
    """A copy of ``job`` whose QEMU asks VNC clients for ``password`` (replacing any password it had)."""
    if not re.fullmatch(PASSWORD, password):
        raise ValueError(f"a VNC password is 1-{LENGTH} of A-Z a-z 0-9")
    out = copy.deepcopy(job)
    args = _args(out)
    kept: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "-object" and i + 1 < len(args) and args[i + 1].startswith(f"secret,id={SECRET_ID},"):
            i += 2
            continue
        kept.append(args[i])
        i += 1
    if "-vnc" not in kept:
        raise ValueError("the job has no -vnc argument")
    at = kept.index("-vnc") + 1
    kept[at] = kept[at].replace(_OPTION, "") + _OPTION
    kept += ["-object", f"secret,id={SECRET_ID},data={password}"]
    out["TaskGroups"][0]["Tasks"][0]["Config"]["args"] = kept
    return out


def password_of(job: dict[str, Any] | None) -> str | None:
    """The VNC password the job's QEMU asks for, or None (a job without one, or not a VM job)."""
    try:
        args = _args(job or {})
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    asks, secret = True, None  # every -vnc must ask for it
    for flag, value in itertools.pairwise(args):
        if flag == "-vnc":
            asks = asks and _OPTION in str(value)
        elif flag == "-object" and isinstance(value, str) and (match := _SECRET_RE.fullmatch(value)):
            secret = match[1]
    return secret if asks else None
