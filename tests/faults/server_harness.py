"""Fault helpers of the server side (issue 17, items 2, 3 and 7): a server that can be killed
with SIGKILL and started again on the same port, and what its process tree looks like.

Everything is real: ``python -m go2cloud_server serve`` in its own process (tests/integration/
harness.py), killed with ``kill -9`` at a random point of a migration and started again with the
same data directory and port, so the agents' next connection reaches the new process.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tests.support.harness import Server, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cmdline(pid: int) -> List[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def processes_naming(needle: str) -> Dict[int, List[str]]:
    """Live processes (not zombies) whose command line mentions ``needle`` (a data directory:
    every child of a server names it, e.g. ``rsync --config=<data-dir>/rsync-sessions/...``)."""
    found: Dict[int, List[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        argv = proc_cmdline(pid)
        if any(needle in a for a in argv):
            found[pid] = argv
    return found


class RestartableServer(Server):
    """A :class:`Server` that keeps its port across ``kill -9`` and restarts (the agents know
    one URL). ``children()`` are the processes other than the server naming its data dir."""

    def __init__(self, data_dir: Path, **kw) -> None:  # type: ignore[no-untyped-def]
        self.fixed_port = free_port()
        extra = list(kw.pop("extra_args", []) or [])
        super().__init__(data_dir, extra_args=extra, **kw)

    def start(self) -> RestartableServer:
        # the last --listen wins (click): the same port at every start
        self.extra_args = [a for a in self.extra_args if not a.startswith("--listen=")]
        self.extra_args.append(f"--listen=127.0.0.1:{self.fixed_port}")
        super().start()
        return self

    def kill9(self) -> int:
        """SIGKILL the server process (nothing of it runs any more); its pid."""
        assert self.proc is not None
        pid = self.proc.pid
        os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if getattr(self, "log", None):
            self.log.close()
        return pid

    def children(self) -> Dict[int, List[str]]:
        mine = self.proc.pid if self.proc is not None and self.proc.poll() is None else -1
        return {p: a for p, a in processes_naming(str(self.data_dir)).items()
                if p != mine and "go2cloud_server" not in " ".join(a[:3])}

    def restart(self) -> float:
        """Start again (same data dir and port); seconds until it answered."""
        started = time.monotonic()
        self.start()
        return time.monotonic() - started


def kill_at_random_point(kill: Callable[[], object], progress: Callable[[], float],
                         low: float, high: float, rng: Optional[random.Random] = None,
                         timeout: float = 120) -> float:
    """Wait until ``progress()`` (0..1, e.g. bytes on the target / bytes of the source) passes a
    random point in [low, high), then call ``kill``; the point chosen."""
    rng = rng or random.Random()
    point = rng.uniform(low, high)
    wait_for(lambda: progress() >= point, timeout, f"progress {point:.2f}", interval=0.05)
    kill()
    return point
