"""Child processes of the server that die with it, or are found and stopped at its next start.

Two guards, because ``kill -9`` of ``serve`` runs none of the server's own cleanup:

* every child is started (by :func:`go2cloud_server.proc.spawn`, the server's one process
  gateway, with its minimal environment) with ``PR_SET_PDEATHSIG = SIGKILL`` (Linux): the kernel kills it when
  the server's thread that started it ends, which a SIGKILL of the server does at once. The child
  checks, right after setting it, that its parent is still the server (one that died in between
  would never signal it) and exits otherwise. The child leads its own process group (what it
  starts in turn is stopped with it).
* every child is recorded in ``<data-dir>/run/children/<pid>.json`` while it runs, with the
  identity of that process: its start time in clock ticks since boot (``/proc/<pid>/stat``, field
  22), the boot id and its command line. At the next start, :meth:`Children.stop_leftovers` stops
  the process group of each recorded child that still exists **and** is still that process (same
  boot, start time and command line); a pid that was reused by another process is never signalled,
  only its stale record removed. A recorded child that is gone may have left processes it started
  in its session: those are stopped too (the kernel does not reuse a pid as long as a session of
  that id has a member, so they are the child's).

The rsync sessions (go2cloud_server/rsyncd.py) need neither: a session's daemon reads end-of-file
on its socket when the server dies and exits; the directories of their configurations (with a
task's rsync password) are removed at the next start (:func:`remove_stale_dirs`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from go2cloud_server import proc
from go2cloud_server.atomicfile import write_atomic

log = logging.getLogger(__name__)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> Optional[Tuple[int, List[str]]]:
    """(start time in clock ticks since boot, command line) of a live process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is already dead
        return None
    return int(fields[19]), argv


def session_members(sid: int) -> List[int]:
    """Live processes of session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return found


class Children:
    """The records of running children under ``run_dir`` (``<data-dir>/run/children``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._boot = boot_id()
        self._lock = threading.Lock()

    def _record(self, pid: int) -> Path:
        return self.run_dir / f"{pid}.json"

    def popen(self, argv: Sequence[str], **kw: Any) -> proc.Popen:
        """:func:`proc.spawn` of ``argv`` (``kw``: its keywords) that dies with the server and is
        recorded until :meth:`forget` (its own session: ``killpg`` reaches what it starts)."""
        child = proc.spawn(argv, die_with_server=True, **kw)
        ident = process_identity(child.pid)
        if ident is not None:
            doc = {"pid": child.pid, "start_ticks": ident[0], "boot_id": self._boot, "argv": list(argv)}
            try:
                self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_atomic(self._record(child.pid), json.dumps(doc) + "\n")
            except OSError as exc:  # the child runs all the same: it dies with the server
                log.warning("cannot record child %d (%s): %s", child.pid, argv[0], exc)
        return child

    def forget(self, child: proc.Popen) -> None:
        with contextlib.suppress(OSError):
            self._record(child.pid).unlink()

    def run(self, argv: Sequence[str], timeout: float, **kw: Any) -> Tuple[int, bytes]:
        """:func:`proc.run` of ``argv`` (stdout and stderr together), the child recorded while it
        runs; on ``timeout`` its process group is killed and :data:`proc.TimeoutExpired` raised."""
        started: List[proc.Popen] = []

        def spawner(args: Sequence[str], **spawn_kw: Any) -> proc.Popen:
            started.append(self.popen(args, **spawn_kw))
            return started[-1]

        try:
            return proc.run(argv, timeout=timeout, spawner=spawner, **kw)
        finally:
            for child in started:
                self.forget(child)

    def stop_leftovers(self, grace: float = 5.0) -> int:
        """At start: stop every recorded child that is still the process it names (its process
        group, SIGKILL), remove every record; how many were stopped."""
        stopped = 0
        try:
            records = sorted(self.run_dir.glob("*.json"))
        except OSError:
            return 0
        for path in records:
            try:
                doc: Dict[str, Any] = json.loads(path.read_text())
                pid = int(doc["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("unreadable child record %s: removed", path)
                path.unlink(missing_ok=True)
                continue
            ident = process_identity(pid)
            same = (ident is not None and doc.get("boot_id") == self._boot
                    and ident[0] == doc.get("start_ticks") and ident[1] == doc.get("argv"))
            if same:
                log.warning("a child of the previous server run is still running (pid %d: %s): stopped",
                            pid, " ".join(doc.get("argv") or [])[:200])
                proc.kill_group(pid)
                deadline = time.monotonic() + grace
                while process_identity(pid) is not None and time.monotonic() < deadline:
                    time.sleep(0.05)
                stopped += 1
            elif ident is not None:
                log.info("child record %s names pid %d, now another process: left alone", path.name, pid)
            else:
                # the child is gone; what it started may live on in its session, whose id (the
                # child's pid) the kernel does not hand out again while a member lives
                for member in session_members(pid):
                    log.warning("a process started by a child of the previous server run is still "
                                "running (pid %d): stopped", member)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(member, signal.SIGKILL)
                    stopped += 1
            path.unlink(missing_ok=True)
        return stopped


def remove_stale_dirs(parent: Path) -> int:
    """At start: remove every entry of ``parent`` (the rsync sessions' configuration
    directories: no session runs before the server does); how many went."""
    removed = 0
    try:
        entries = list(parent.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


#: the server's registry (``serve`` installs it; None in tests that run parts of the server)
REGISTRY: Optional[Children] = None


def install(run_dir: Path) -> Children:
    global REGISTRY
    REGISTRY = Children(run_dir)
    return REGISTRY
