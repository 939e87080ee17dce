#!/usr/bin/env python3
"""Startup time and size of the packaged agent (docs/performance.md, "Executable startup").

    nice -n 19 python3 bench/bench_startup.py [--runs 10] [--exe PATH ...]

Default executables: the staticx one that is packaged (build/pyinstaller/dist/static/
go2cloud_client) and PyInstaller's program before staticx (build/pyinstaller/dist/
go2cloud_client), both from ``python3 packaging/build.py``. For each it runs ``--version`` and
``rsync-tunnel`` with no tunnel environment: the tunnel starts exactly as it does for every
rsync run (rsync's ``-e "<exe> rsync-tunnel"``), unpacks, imports its module, reads its
settings and stops ("invalid rsync target URL") before any network I/O, so the
time is the per-rsync-run start cost of the executable. Wall-clock median, min and max of
``--runs`` runs, the median CPU time (user + system, children included), and the size of each
file. Wall-clock times depend on the machine's load; the CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent


def measure(argv: List[str], runs: int) -> Tuple[List[float], List[float]]:
    """Wall-clock seconds and CPU seconds (user + system of the process and the children it
    waits for: staticx's start-up code, PyInstaller's two processes) of each run."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYINSTALLER_RESET_ENVIRONMENT": "1"}
    wall, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, env=env, check=False)
        wall.append(time.monotonic() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--exe", action="append", type=Path)
    args = parser.parse_args()
    exes = args.exe or [ROOT / "build/pyinstaller/dist/static/go2cloud_client",
                        ROOT / "build/pyinstaller/dist/go2cloud_client"]
    print(f"{'executable':50} {'size MB':>8} {'what':13} {'wall median':>11} {'min':>5} {'max':>5} "
          f"{'CPU median':>10}")
    for exe in exes:
        if not exe.is_file():
            print(f"{exe}: missing (python3 packaging/build.py)", file=sys.stderr)
            continue
        size = os.path.getsize(exe) / 1e6
        for what, argv in (("--version", [str(exe), "--version"]),
                           ("rsync-tunnel", [str(exe), "rsync-tunnel"])):
            wall, cpu = measure(argv, args.runs)
            name = str(exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe)
            print(f"{name:50} {size:8.1f} {what:13} {statistics.median(wall):11.2f} {min(wall):5.2f} "
                  f"{max(wall):5.2f} {statistics.median(cpu):10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
