"""The gateway keeps what VM starts read locked in memory (gateway/engine/pagecache.py, docs/IMAGES.md)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from gateway.engine import pagecache
from gateway.engine.templates import Templates
from gateway.web.app import background_executor


def locked_kib() -> int:
    """This process's locked memory (VmLck in /proc/self/status), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def test_pin_locks_files_and_release_lets_go(tmp_path: Path) -> None:
    data = tmp_path / "state"
    data.write_bytes(os.urandom(4 << 20))
    (tmp_path / "empty").write_bytes(b"")
    before = locked_kib()
    pinned = pagecache.pin([data, data, tmp_path / "empty", tmp_path / "missing"])
    if os.geteuid() == 0:  # root may lock; others get the read-ahead fallback
        assert list(pinned.locked) == [data] and pinned.locked_bytes == 4 << 20
        assert locked_kib() - before >= 4 << 10
    else:
        assert pinned.advised == [data]
    pinned.release()
    assert pinned.locked == {} and locked_kib() == before


def test_catalog_keeps_the_start_files_of_built_templates(tiny_images_dir: Path) -> None:
    catalog = Templates(tiny_images_dir)
    tiny = catalog.get("tiny")
    files = catalog.start_files()
    assert {tiny.boot, tiny.disk} <= set(files)
    warm = tiny.warm_image()
    assert warm is not None and {warm.state, warm.disk} <= set(files)
    before = locked_kib()
    catalog.keep_in_memory([])
    if os.geteuid() == 0:
        assert locked_kib() - before >= warm.state.stat().st_size >> 10
    catalog.keep_in_memory([])  # the same files: nothing changes
    catalog.release_memory()
    assert locked_kib() == before
    catalog.keep_in_memory([])  # released for good: a late call pins nothing
    assert locked_kib() == before


def test_the_gateways_background_work_runs_at_the_lowest_cpu_priority() -> None:
    """Locking and hashing the images after a start is work no request waits for: its thread runs at nice 19
    and yields the CPU to the VMs starting meanwhile, and the threads that answer requests keep their own."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with background_executor() as background:
        thread_nice = background.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert thread_nice == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own < 19
