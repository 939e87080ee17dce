"""Fault helpers of the agent side (issue 17, item 8): an agent killed with SIGKILL at a random
point of a transfer and started again with the same home, as systemd's ``Restart=always`` would,
and what each side holds at the moment of the kill.

Everything is real: ``python -m go2cloud_client`` in its own process with the worktree on its
PYTHONPATH (tests/support/harness.py), killed with ``kill -9`` (no cleanup of any kind runs),
then started again with the same ``--home`` and no token code: it must find its identity, its
task and the interrupted cycle by itself. What the killed run left behind is read from outside:
the block engine's pass journal (``<home>/state/block/<task>/<disk>.pass``), the target's
``current.img`` and the bytes of the file cycle's directory on the target.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from tests.faults.server_harness import proc_cmdline, processes_naming
from tests.support.harness import Agent, wait_for

#: the pass journal's layout (go2cloud_client/replication/block/chunkmap.py, PASS_VERSION 1),
#: restated here so that the test reads the file the killed agent left, not the agent's reading of it
_PASS_HEAD = struct.Struct(">8sIIIIQII")
_PASS_MAGIC = b"G2CBPAS1"
_REC = struct.Struct(">II16sI")
_UNCHANGED = 1 << 31


def live_pids() -> List[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def session_of(pid: int) -> Optional[int]:
    """The session id of a live (not zombie) process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[3])


class RestartableAgent(Agent):
    """An :class:`Agent` that can be killed with SIGKILL and started again with the same home."""

    def kill9(self) -> int:
        """SIGKILL the agent process; its pid. The agent runs no cleanup: its children (rsync,
        the TLS tunnel) are in their own sessions and are not signalled by this."""
        assert self.proc is not None and self.proc.poll() is None, "the agent is not running"
        pid = self.proc.pid
        # the sessions of its children (rsync leads one; the tunnel rsync starts is in it)
        self.child_sessions = {session_of(p) for p in processes_naming(str(self.home)) if p != pid} - {None}
        os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.killed_output = self.output()
        return pid

    def leftovers(self) -> Dict[int, List[str]]:
        """Live processes whose command line names the agent's home (rsync's filter file and
        work directory are in it), or in the session of a child the agent had at the kill
        (rsync's TLS tunnel)."""
        found = processes_naming(str(self.home))
        for pid in live_pids():
            if session_of(pid) in getattr(self, "child_sessions", set()):
                found.setdefault(pid, proc_cmdline(pid))
        return found

    def wait_no_leftovers(self, timeout: float = 60) -> None:
        try:
            wait_for(lambda: not self.leftovers(), timeout, "no process of the killed agent left")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: still running: {self.leftovers()}") from None

    def restart(self) -> RestartableAgent:
        """Start again with the same home and no code (as a service manager would)."""
        self.start()
        return self

    @property
    def log_file(self) -> Path:
        return self.home / "Logs" / "go2cloud_client.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# -- file level ------------------------------------------------------------------------------------
def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (what rsync's data is; files being written
    count with what they hold now)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def stable_bytes(root: Path, settle: float = 1.0, timeout: float = 60) -> int:
    """``tree_bytes(root)`` once it stopped changing for ``settle`` seconds (what the killed
    run delivered, once nothing of it writes any more)."""
    deadline = time.monotonic() + timeout
    last = tree_bytes(root)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = tree_bytes(root)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError(f"the target under {root} kept changing for {timeout:g}s after the kill")


_RSYNC_DONE = re.compile(r"cycle (\d+): (.+) done \((\d+) bytes, (\d+) sent, (\d+) passes\)")


def rsync_done(log: str, cycle: int) -> List[Tuple[str, int, int]]:
    """``(path, bytes, sent)`` of every "cycle N: PATH done (...)" line of the agent's log:
    rsync's own --stats (Total file size, Total bytes sent) of the run that finished the path."""
    return [(m.group(2), int(m.group(3)), int(m.group(4)))
            for m in _RSYNC_DONE.finditer(log) if int(m.group(1)) == cycle]


# -- block level -----------------------------------------------------------------------------------
class Journal:
    """What a pass journal holds: its header and the chunks it records done (and sent)."""

    def __init__(self, path: Path) -> None:
        raw = path.read_bytes()
        magic, version, self.cycle, self.chunk_size, self.flags, self.disk_size, self.base_cycle, _ = \
            _PASS_HEAD.unpack_from(raw)
        assert magic == _PASS_MAGIC and version == 1, f"{path}: not a version-1 pass journal"
        assert zlib.crc32(raw[:_PASS_HEAD.size - 4]) == struct.unpack_from(">I", raw, _PASS_HEAD.size - 4)[0]
        self.done: Set[int] = set()
        self.sent: Set[int] = set()
        off = _PASS_HEAD.size
        while off + _REC.size <= len(raw):
            index, count, _digest, crc = _REC.unpack_from(raw, off)
            if zlib.crc32(raw[off:off + _REC.size - 4]) != crc:
                break  # a torn last record: the agent cuts it too
            n = count & ~_UNCHANGED
            run = set(range(index, index + n))
            if n == 0:
                self.done.discard(index)
                self.sent.discard(index)
            else:
                self.done |= run
                if not count & _UNCHANGED:
                    self.sent |= run
            off += _REC.size


def find_journal(home: Path, disk: str) -> Path:
    found = list((home / "state" / "block").glob(f"*/{disk}.pass"))
    assert len(found) == 1, f"one pass journal of {disk} expected under {home}, found {found}"
    return found[0]


def data_chunks(image: Path, chunk_size: int) -> Set[int]:
    """Chunks of a sparse image file that hold non-zero data (read from the file itself)."""
    found: Set[int] = set()
    with open(image, "rb") as fh:
        index = 0
        while True:
            block = fh.read(chunk_size)
            if not block:
                return found
            if block.count(0) != len(block):
                found.add(index)
            index += 1


def chunks_equal(disk: Path, target: Path, chunk_size: int, indices: Set[int]) -> Set[int]:
    """Of ``indices``, the chunks whose bytes in ``target`` equal those of ``disk``."""
    equal: Set[int] = set()
    with open(disk, "rb") as a, open(target, "rb") as b:
        for i in sorted(indices):
            a.seek(i * chunk_size)
            b.seek(i * chunk_size)
            if a.read(chunk_size) == b.read(chunk_size):
                equal.add(i)
    return equal


def find_current_image(server_data: Path, disk: str) -> Path:
    found = [p for p in server_data.rglob("current.img") if p.parent.name == disk]
    assert len(found) == 1, f"one current.img of {disk} expected under {server_data}, found {found}"
    return found[0]


_BLOCK_DONE = re.compile(r"disk (\S+): cycle (\d+) committed \((\d+) chunks: (\d+) sent, (\d+) holes, "
                         r"(\d+) unchanged, (\d+) resumed\)")


def block_committed(log: str, disk: str, cycle: int) -> Optional[Dict[str, int]]:
    """The engine's summary of the pass that committed ``cycle`` of ``disk`` (the last one)."""
    found = None
    for m in _BLOCK_DONE.finditer(log):
        if m.group(1) == disk and int(m.group(2)) == cycle:
            found = {"chunks": int(m.group(3)), "sent": int(m.group(4)), "holes": int(m.group(5)),
                     "unchanged": int(m.group(6)), "resumed": int(m.group(7))}
    return found
