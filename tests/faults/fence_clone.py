"""Fault helpers of the fencing tests: a cloned agent in its own mount namespace.

A cloned VM carries a copy of the imported machine's agent home (key, source id, task state) but
has its own disks and machine id. :class:`CloneAgent` reproduces that on one machine: the home is
copied, and the agent runs under ``unshare -m`` where a different ``/etc/machine-id`` and, when
given, a different disk image are bind-mounted over the originals' paths, so the same path names
another machine's disk. Nothing is faked: the clone is the real agent talking to the real server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from tests.support.harness import Agent, Server, _env

MACHINE_ID = Path("/etc/machine-id")


def copy_home(home: Path, to: Path) -> Path:
    """The agent home as a disk clone carries it (every file, modes kept)."""
    shutil.copytree(home, to, symlinks=True)
    return to


class CloneAgent(Agent):
    """``go2cloud_client`` on a copied home, in its own mount namespace that looks like another
    machine (its own machine id; ``disk_over`` bind-mounted over ``disk_path``)."""

    def __init__(self, home: Path, server: Server, work: Path, *, machine_id: str,
                 disk_path: Optional[Path] = None, disk_over: Optional[Path] = None) -> None:
        super().__init__(home, server)
        self.work = work
        self.machine_id = machine_id
        self.disk_path = disk_path
        self.disk_over = disk_over

    def start(self) -> CloneAgent:  # type: ignore[override]
        self.work.mkdir(parents=True, exist_ok=True)
        mid = self.work / "machine-id"
        mid.write_text(self.machine_id + "\n")
        binds = [f"mount --bind -- {mid} {MACHINE_ID}"]
        if self.disk_path and self.disk_over:
            binds.append(f"mount --bind -- {self.disk_over} {self.disk_path}")
        argv = [sys.executable, "-m", "go2cloud_client", "--home", str(self.home), "--no-prompt", "--yes",
                "--server", self.server.url, "--server-fingerprint", self.server.fingerprint]
        script = " && ".join(binds) + ' && exec "$@"'
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "clone", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
            text=True, errors="replace")
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
