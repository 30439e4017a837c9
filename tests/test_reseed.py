"""images/reseed.py's program, run on this host: it reseeds the kernel's RNG once for each byte it reads and
answers each with "0" (done) or "1" (refused), and ends at the end of its input (docs/IMAGES.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from images import reseed


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "vmgate-reseed"
    path.write_bytes(reseed.program())
    path.chmod(0o755)
    return path


def test_it_waits_and_reseeds_once_per_byte(program: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("RNDRESEEDCRNG needs CAP_SYS_ADMIN")
    done = subprocess.run([str(program)], input=b"\n\n\n", capture_output=True, timeout=10, check=False)
    assert (done.returncode, done.stdout) == (0, b"000")


def test_without_the_right_it_says_so(program: Path) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root to drop to another user")
    done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           str(program)], input=b"\n", capture_output=True, timeout=10, check=False)
    assert (done.returncode, done.stdout) == (0, b"1")


def test_it_ends_with_its_input(program: Path) -> None:
    done = subprocess.run([str(program)], input=b"", capture_output=True, timeout=10, check=False)
    assert (done.returncode, done.stdout) == (0, b"")
