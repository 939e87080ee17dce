"""``fsfreeze``: freeze the filesystem mounted from the volume, read the device, thaw.

create() runs ``fsfreeze -f MOUNTPOINT``: the kernel flushes the filesystem and blocks every
writer, so the block device holds a consistent image for as long as the freeze lasts. The
snapshot's path() is the device itself. release() runs ``fsfreeze -u MOUNTPOINT``.

A frozen filesystem stalls the services writing to it, so the freeze is bounded twice:

* a watchdog thread in this process thaws after ``max_window`` seconds (default 60) and marks
  the snapshot expired (check() then raises ``snapshot_expired``: what was read is not
  point-in-time any more);
* a guard process (``python -I -B -c ...`` in its own session) holds a pipe from us: if this
  process dies (even ``kill -9``) the pipe closes and the guard thaws at once; it also thaws a
  few seconds after the window in case the watchdog thread is stuck.

recover() thaws what the record says a crashed run froze. The workdir must not be on the frozen
filesystem (the record could not be written while frozen).

Use it for short read windows: the final sync, or small volumes.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import List, Optional

from snapshot_driver import _mounts, _proc
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import (
    BAD_VOLUME,
    RELEASE_FAILED,
    SNAPSHOT_EXPIRED,
    SNAPSHOT_FAILED,
    SNAPSHOT_UNSUPPORTED,
    TOOL_MISSING,
    Backend,
    ProbeResult,
    Snapshot,
    SnapshotError,
    device_or_file_size,
    drop_cache,
)
from snapshot_driver.live import check_volume

LOG = logging.getLogger(__name__)

#: Filesystems whose kernel driver implements freeze (others answer EOPNOTSUPP).
FREEZABLE = {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "nilfs2", "reiserfs", "gfs2",
             "ocfs2"}

_GUARD = r"""
import select, subprocess, sys, time
mp, window, tool = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + window
buf = b""
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    r, _, _ = select.select([0], [], [], left)
    if not r:
        break
    chunk = __import__("os").read(0, 64)
    if not chunk:
        break
    buf += chunk
    if b"release" in buf:
        sys.exit(0)
subprocess.run([tool, "-u", mp], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL, timeout=60)
"""


def _not_frozen(err: _proc.ProcessError) -> bool:
    # fsfreeze -u on a filesystem that is not frozen: EINVAL ("Invalid argument")
    return "invalid argument" in err.stderr.lower()


def thaw(mountpoint: str) -> bool:
    """Thaw ``mountpoint``; True if it was frozen, False if it was not. Raises ProcessError."""
    try:
        _proc.run(["fsfreeze", "-u", mountpoint], timeout=60)
        return True
    except _proc.ProcessError as exc:
        if _not_frozen(exc):
            return False
        raise


class FreezeSnapshot(Snapshot):
    def __init__(self, backend: FsfreezeBackend, volume: str, size: int, mountpoint: str,
                 snap_id: str, record: SnapshotRecord, guard: Optional[_proc.Guard[bytes]],
                 window: float) -> None:
        super().__init__(backend.name, volume, size)
        self.mountpoint = mountpoint
        self.snap_id = snap_id
        self._record = record
        self._guard = guard
        self._lock = threading.Lock()
        self._expired = False
        self._thawed = False
        self._timer = threading.Timer(window, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._thawed:
                return
            LOG.warning("fsfreeze: %s stayed frozen for the whole window; thawing it now",
                        self.mountpoint)
            self._expired = True
            try:
                thaw(self.mountpoint)
                self._thawed = True
            except _proc.ProcessError as exc:
                LOG.warning("fsfreeze: watchdog could not thaw %s: %s", self.mountpoint, exc)

    def path(self) -> str:
        self._check_live()
        return self.volume

    def check(self) -> None:
        self._check_live()
        if self._expired:
            raise SnapshotError(
                f"fsfreeze: the freeze of {self.mountpoint} hit its time limit and was thawed "
                "while reading; the copy is not point-in-time: read again (faster, or with a "
                "longer max_window)", code=SNAPSHOT_EXPIRED, retryable=True, backend=self.backend)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._timer.cancel()
            if not self._thawed:
                try:
                    thaw(self.mountpoint)
                except _proc.ProcessError as exc:
                    raise SnapshotError(f"fsfreeze: could not thaw {self.mountpoint}: {exc}",
                                        code=RELEASE_FAILED, retryable=True,
                                        backend=self.backend) from exc
                self._thawed = True
            _stop_guard(self._guard)
            self._guard = None
            self._record.remove(self.snap_id)
            self._released = True


def _stop_guard(guard: Optional[_proc.Guard[bytes]]) -> None:
    if guard is None:
        return
    try:
        if guard.stdin is not None:
            guard.stdin.write(b"release\n")
            guard.stdin.close()
    except OSError:
        pass
    try:
        guard.wait(timeout=10)
    except _proc.TimeoutExpired:
        guard.kill()
        guard.wait()


class FsfreezeBackend(Backend):
    name = "fsfreeze"
    point_in_time = True
    tracks_changes = False

    def __init__(self, max_window: float = 60.0, guard: bool = True) -> None:
        self.max_window = float(max_window)
        self.guard = bool(guard)

    def _mountpoint(self, volume: str) -> _mounts.Mount:
        st = check_volume(self.name, volume)
        if not stat.S_ISBLK(st.st_mode):
            raise SnapshotError(f"fsfreeze: {volume} is not a block device; fsfreeze freezes the "
                                "filesystem mounted from a device (use reflink or btrfs for "
                                "image files)", code=BAD_VOLUME, backend=self.name)
        found = _mounts.mounts_of_device(volume)
        if not found:
            raise SnapshotError(f"fsfreeze: {volume} is not mounted; an unmounted filesystem "
                                "does not change, so read it with the live backend",
                                code=SNAPSHOT_UNSUPPORTED, backend=self.name)
        m = found[0]
        if m.fstype not in FREEZABLE:
            raise SnapshotError(f"fsfreeze: {volume} is mounted on {m.mountpoint} as {m.fstype}, "
                                "which cannot be frozen; use lvm or a kernel snapshot driver",
                                code=SNAPSHOT_UNSUPPORTED, backend=self.name)
        if m.mountpoint == "/":
            LOG.info("fsfreeze: %s is the root filesystem; keep the window short", volume)
        return m

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        if _proc.which("fsfreeze") is None:
            return ProbeResult(False, "fsfreeze: the fsfreeze tool is not installed; install "
                                      "util-linux")
        if os.geteuid() != 0:
            return ProbeResult(False, "fsfreeze: freezing a filesystem needs root; run the agent "
                                      "as root")
        if volume is None:
            return ProbeResult(True, "fsfreeze: available; it stalls writers while the volume is "
                                     "read, so keep it for short windows such as the final sync")
        try:
            m = self._mountpoint(volume)
        except SnapshotError as exc:
            return ProbeResult(False, str(exc))
        return ProbeResult(True, f"fsfreeze: {volume} ({m.fstype} on {m.mountpoint}) can be frozen "
                                 f"for up to {self.max_window:g}s while it is read; writers stall "
                                 "meanwhile")

    def create(self, volume: str, workdir: Path) -> Snapshot:
        m = self._mountpoint(volume)
        if _proc.which("fsfreeze") is None:
            raise SnapshotError("fsfreeze: the fsfreeze tool is not installed; install util-linux",
                                code=TOOL_MISSING, backend=self.name)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if os.stat(workdir).st_dev == os.stat(m.mountpoint).st_dev:
            raise SnapshotError(f"fsfreeze: the work directory {workdir} is on {m.mountpoint}, the "
                                "filesystem to freeze; put the agent's home on another filesystem",
                                code=BAD_VOLUME, backend=self.name)
        size = device_or_file_size(volume)
        record = SnapshotRecord(workdir, self.name)
        snap_id = uuid.uuid4().hex[:12]
        record.put({"id": snap_id, "state": "frozen", "mountpoint": m.mountpoint,
                    "volume": volume, "pid": os.getpid()})
        guard = None
        if self.guard:
            guard = _proc.start_guard([sys.executable, "-I", "-B", "-c", _GUARD, m.mountpoint,
                                       str(self.max_window + 5.0), "fsfreeze"])
        try:
            _proc.run(["fsfreeze", "-f", m.mountpoint], timeout=120)
        except _proc.ProcessError as exc:
            _stop_guard(guard)
            record.remove(snap_id)
            unsupported = "not supported" in exc.stderr.lower()
            raise SnapshotError(f"fsfreeze: could not freeze {m.mountpoint}: {exc}",
                                code=SNAPSHOT_UNSUPPORTED if unsupported else SNAPSHOT_FAILED,
                                retryable=not unsupported, backend=self.name) from exc
        drop_cache(volume)
        return FreezeSnapshot(self, volume, size, m.mountpoint, snap_id, record, guard,
                              self.max_window)

    def recover(self, workdir: Path) -> List[str]:
        record = SnapshotRecord(workdir, self.name)
        done = []
        for entry in record.entries():
            mp = entry.get("mountpoint", "")
            try:
                was = thaw(mp) if mp else False
            except _proc.ProcessError as exc:
                raise SnapshotError(f"fsfreeze: could not thaw {mp}: {exc}", code=RELEASE_FAILED,
                                    retryable=True, backend=self.name) from exc
            record.remove(entry["id"])
            done.append(f"fsfreeze: thawed {mp}" if was else f"fsfreeze: {mp} was already thawed")
        return done
