"""Memory sampler for benchmarks (off unless ``GO2CLOUD_MEMTRACE`` names a file).

``GO2CLOUD_MEMTRACE=/tmp/trace.txt go2cloud_server serve ...`` starts :mod:`tracemalloc` and a
thread that, every ``GO2CLOUD_MEMTRACE_INTERVAL`` seconds (default 60), appends to that file:
the process's RSS, the Python heap traced by tracemalloc, glibc's own figures (``mallinfo2``: bytes
in use, free bytes kept in its arenas, mmapped bytes) and the source lines whose allocations grew
most since the first sample. It tells a leak of Python objects (the traced size grows, with the
lines that hold it) from memory the allocator keeps (RSS and free arena bytes grow, traced size
flat) and from memory outside Python's allocator (RSS grows, neither does). tracemalloc costs CPU
and memory: for measuring only, never in production (bench/bench_fleet.py --memtrace).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
import tracemalloc
from typing import Dict, Optional

log = logging.getLogger(__name__)

ENV = "GO2CLOUD_MEMTRACE"
ENV_INTERVAL = "GO2CLOUD_MEMTRACE_INTERVAL"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def mallinfo() -> Optional[Dict[str, int]]:
    """glibc's totals over all arenas (None where there is no ``mallinfo2``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {"arena": info.arena, "in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_from_env() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    interval = float(os.environ.get(ENV_INTERVAL) or 60)
    tracemalloc.start(int(os.environ.get("GO2CLOUD_MEMTRACE_FRAMES") or 1))
    log.warning("%s=%s: tracing memory allocations (benchmarks only: it costs CPU and memory)", ENV, path)
    threading.Thread(target=_run, args=(path, interval), name="memtrace", daemon=True).start()


def _run(path: str, interval: float) -> None:
    first: Optional[tracemalloc.Snapshot] = None
    started = time.monotonic()
    while True:
        time.sleep(interval)
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        traced, _ = tracemalloc.get_traced_memory()
        lines = [f"t={time.monotonic() - started:.0f}s rss_kib={rss_kib()} traced_kib={traced // 1024} "
                 f"threads={threading.active_count()} mallinfo={mallinfo()}"]
        if first is None:
            first = snap
        else:
            for stat in snap.compare_to(first, "traceback")[:20]:
                lines.append(f"  {stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d} blocks) now "
                             f"{stat.size / 1024:.1f} KiB: " + " <- ".join(
                                 f"{f.filename.rsplit('/', 2)[-2:]}:{f.lineno}" for f in stat.traceback))
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
