"""``failing``: a scripted backend for tests; it injects faults on a script.

Without a script it is a correct, point-in-time backend for an image file or device: create()
copies the volume into ``<workdir>/failing/`` (sparsely), the snapshot reads the copy, release()
keeps the copy as a change-tracking base (newest ``keep``), and changed_since() compares the
base and the current copy block by block (exact, 4 KiB granularity).

The script (a dict, JSON-friendly so a child process can be given the same one) injects faults:

``probe``               str: probe() says unusable with this reason
``fail_create``         error code (str) for create(), e.g. "no_space"; retryable per the code
``fail_create_times``   int: only the first N create() calls fail (default: all)
``fail_read_after``     int: open() readers raise SnapshotError(read_failed) after N bytes, and
                        path() holds only the first N bytes (a pread past them returns short)
``fail_release_once``   bool: the first release() raises SnapshotError(release_failed)
``changed_since_none``  bool: changed_since() always returns None
``no_token``            bool: token() returns None
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, cast

from snapshot_driver import _kept
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import (
    BAD_VOLUME,
    NO_SPACE,
    READ_FAILED,
    RELEASE_FAILED,
    SNAPSHOT_UNSUPPORTED,
    TOOL_MISSING,
    Backend,
    Extent,
    ProbeResult,
    Snapshot,
    SnapshotError,
    device_or_file_size,
    merge_extents,
)
from snapshot_driver.live import check_volume

BLOCK = 4096
_PERMANENT = {NO_SPACE, SNAPSHOT_UNSUPPORTED, TOOL_MISSING, BAD_VOLUME}


def _remove(entry: Dict[str, Any]) -> None:
    try:
        os.unlink(entry.get("copy", ""))
    except FileNotFoundError:
        pass


def _copy_sparse(src: str, dst: str, limit: Optional[int] = None) -> int:
    size = device_or_file_size(src)
    end = size if limit is None else min(size, limit)
    zero = bytes(1 << 20)
    with open(src, "rb", buffering=0) as fi, open(dst, "wb") as fo:
        pos = 0
        while pos < end:
            buf = fi.read(min(1 << 20, end - pos))
            if not buf:
                break
            if buf == zero[:len(buf)]:
                fo.seek(len(buf), os.SEEK_CUR)
            else:
                fo.write(buf)
            pos += len(buf)
        fo.truncate(end)
        fo.flush()
        os.fsync(fo.fileno())
    return size


class _FailingReader(io.RawIOBase):
    def __init__(self, path: str, fail_after: int) -> None:
        self._f = open(path, "rb", buffering=0)
        self._left = fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._left <= 0:
            raise SnapshotError("failing: injected read error", code=READ_FAILED, retryable=True,
                                backend="failing")
        view = memoryview(b)[: self._left]
        n = self._f.readinto(view) or 0
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class FailingSnapshot(Snapshot):
    def __init__(self, backend: FailingBackend, volume: str, size: int, snap_id: str,
                 copy: str, record: SnapshotRecord) -> None:
        super().__init__(backend.name, volume, size)
        self._b = backend
        self.snap_id = snap_id
        self.copy = copy
        self._record = record
        self.point_in_time = backend.point_in_time

    def path(self) -> str:
        self._check_live()
        return self.copy

    def open(self) -> BinaryIO:
        after = self._b.script.get("fail_read_after")
        if after is None:
            return super().open()
        self._check_live()
        return cast(BinaryIO, _FailingReader(self.copy, int(after)))

    def token(self) -> Optional[str]:
        return None if self._b.script.get("no_token") else f"failing:{self.snap_id}"

    def changed_since(self, token: Optional[str]) -> Optional[List[Extent]]:
        self._check_live()
        if self._b.script.get("changed_since_none") or not token or \
                not token.startswith("failing:"):
            return None
        base = self._record.get(token.split(":", 1)[1])
        if base is None or base.get("state") != "base" or not os.path.exists(base["copy"]):
            return None
        changed = []
        with open(base["copy"], "rb") as a, open(self.copy, "rb") as b:
            pos = 0
            while pos < self.size:
                x, y = a.read(BLOCK), b.read(BLOCK)
                if x != y:
                    changed.append(Extent(pos, BLOCK))
                pos += BLOCK
        return merge_extents(changed, self.size)

    def release(self) -> None:
        if self._released:
            return
        if self._b.script.get("fail_release_once") and not self._b.release_failed:
            self._b.release_failed = True
            raise SnapshotError("failing: injected release failure", code=RELEASE_FAILED,
                                retryable=True, backend=self.backend)
        _kept.mark_base(self._record, self.snap_id, self._b.keep, _remove)
        self._released = True


class FailingBackend(Backend):
    name = "failing"
    tracks_changes = True

    def __init__(self, script: Optional[Dict[str, Any]] = None, keep: int = 2,
                 point_in_time: bool = True) -> None:
        self.script: Dict[str, Any] = dict(script or {})
        self.keep = int(keep)
        self.point_in_time = bool(point_in_time)
        self.creates = 0
        self.release_failed = False

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        if self.script.get("probe"):
            return ProbeResult(False, f"failing: {self.script['probe']}")
        if volume is not None:
            try:
                check_volume(self.name, volume)
            except SnapshotError as exc:
                return ProbeResult(False, str(exc))
        return ProbeResult(True, "failing: test backend (copies the volume)")

    def create(self, volume: str, workdir: Path) -> Snapshot:
        self.creates += 1
        code = self.script.get("fail_create")
        times = self.script.get("fail_create_times")
        if code and (times is None or self.creates <= int(times)):
            raise SnapshotError(f"failing: injected create failure ({code})", code=str(code),
                                retryable=str(code) not in _PERMANENT, backend=self.name)
        check_volume(self.name, volume)
        d = Path(workdir) / "failing"
        d.mkdir(parents=True, exist_ok=True)
        snap_id = uuid.uuid4().hex[:12]
        copy = str(d / f"{snap_id}.img")
        record = SnapshotRecord(workdir, self.name)
        entry = {"id": snap_id, "state": "creating", "copy": copy, "volume": os.path.abspath(volume)}
        record.put(entry)
        after = self.script.get("fail_read_after")
        size = _copy_sparse(volume, copy, None if after is None else int(after))
        record.put(dict(entry, state="in_use"))
        return FailingSnapshot(self, volume, size, snap_id, copy, record)

    def recover(self, workdir: Path) -> List[str]:
        return _kept.cleanup(SnapshotRecord(workdir, self.name), _remove, False,
                             lambda e: f"failing: removed copy {e.get('copy')}")

    def purge(self, workdir: Path) -> List[str]:
        return _kept.cleanup(SnapshotRecord(workdir, self.name), _remove, True,
                             lambda e: f"failing: removed copy {e.get('copy')}")
