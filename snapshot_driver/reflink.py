"""``reflink``: a copy-on-write clone of an image FILE on a filesystem with reflinks (XFS with
``reflink=1``, btrfs).

create() clones the image with the FICLONE ioctl (no data is copied; the clone shares the
image's blocks) and the snapshot reads the clone. Writes to the image after create() go to new
blocks and are not visible in the clone.

Change tracking: release() keeps the clone as the *base* of the next snapshot (the newest
``keep`` bases per image are kept, default 2). changed_since(token) compares the extent maps
(FIEMAP) of the base named by the token and of the current clone: ranges that map to the same
physical blocks are unchanged (while the base exists its blocks cannot be rewritten), everything
else is reported. A missing base, or a filesystem without FIEMAP, gives None.

Clones live in ``<workdir>/reflink`` when the workdir is on the image's filesystem, else in a
``.go2cloud-reflink`` directory next to the image (a clone cannot cross filesystems). Kept bases
cost space as the image diverges from them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from snapshot_driver import _kept, _mounts, _proc
from snapshot_driver._extentmap import clone_file, diff_maps, fiemap_path
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import (
    NO_SPACE,
    SNAPSHOT_FAILED,
    SNAPSHOT_UNSUPPORTED,
    Backend,
    Extent,
    ProbeResult,
    Snapshot,
    SnapshotError,
    image_file_mount,
)

REFLINK_FS = ("xfs", "btrfs")
SIDE_DIR = ".go2cloud-reflink"


def _remove_file(entry: Dict[str, Any]) -> None:
    try:
        os.unlink(entry.get("copy", ""))
    except FileNotFoundError:
        pass


class ReflinkSnapshot(Snapshot):
    def __init__(self, name: str, volume: str, size: int, snap_id: str, copy: str,
                 record: SnapshotRecord, keep: int) -> None:
        super().__init__(name, volume, size)
        self.snap_id = snap_id
        self.copy = copy
        self._record = record
        self._keep = keep

    def path(self) -> str:
        self._check_live()
        return self.copy

    def token(self) -> Optional[str]:
        return f"reflink:{self.snap_id}"

    def changed_since(self, token: Optional[str]) -> Optional[List[Extent]]:
        self._check_live()
        if not token or not token.startswith("reflink:"):
            return None
        base = self._record.get(token.split(":", 1)[1])
        if base is None or base.get("volume") != os.path.abspath(self.volume) \
                or base.get("state") != "base":
            return None
        try:
            old_size = os.stat(base["copy"]).st_size
            old = fiemap_path(base["copy"])
            new = fiemap_path(self.copy)
        except OSError:
            return None
        return diff_maps(old, old_size, new, self.size)

    def release(self) -> None:
        if self._released:
            return
        try:
            os.chmod(self.copy, 0o400)
        except OSError:
            pass
        _kept.mark_base(self._record, self.snap_id, self._keep, _remove_file)
        self._released = True


class ReflinkBackend(Backend):
    name = "reflink"
    point_in_time = True
    tracks_changes = True

    def __init__(self, keep: int = 2) -> None:
        self.keep = int(keep)

    def _check(self, volume: str) -> _mounts.Mount:
        m = image_file_mount(self.name, volume, "this backend snapshots disk image files (use "
                                                "fsfreeze, lvm or a kernel driver for devices)")
        if m is None or m.fstype not in REFLINK_FS:
            fs = m.fstype if m else "an unknown filesystem"
            where = m.mountpoint if m else os.path.dirname(volume)
            raise SnapshotError(f"reflink: {where} is on {fs}, which has no reflink support; use "
                                "an XFS (reflink=1) or btrfs filesystem", code=SNAPSHOT_UNSUPPORTED,
                                backend=self.name)
        return m

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        if volume is None:
            return ProbeResult(True, "reflink: usable for disk image files on XFS (reflink=1) or "
                                     "btrfs; give the image path to check it")
        try:
            m = self._check(volume)
        except SnapshotError as exc:
            return ProbeResult(False, str(exc))
        if m.fstype == "xfs" and _proc.which("xfs_info"):
            try:
                info = _proc.run(["xfs_info", m.mountpoint], timeout=30).stdout
            except _proc.ProcessError:
                info = ""
            if "reflink=0" in info:
                return ProbeResult(False, f"reflink: the XFS filesystem on {m.mountpoint} was made "
                                          "without reflink (reflink=0); recreate it with "
                                          "mkfs.xfs -m reflink=1 or use another backend")
        return ProbeResult(True, f"reflink: {volume} is on {m.fstype} ({m.mountpoint}); clones are "
                                 "instant and changed extents come from the extent maps")

    def _copy_dirs(self, volume: str, workdir: Path) -> List[Path]:
        return [Path(workdir) / "reflink", Path(os.path.dirname(os.path.abspath(volume))) / SIDE_DIR]

    def create(self, volume: str, workdir: Path) -> Snapshot:
        self._check(volume)
        record = SnapshotRecord(workdir, self.name)
        snap_id = uuid.uuid4().hex[:12]
        tag = hashlib.sha256(os.path.abspath(volume).encode()).hexdigest()[:8]
        last: Optional[OSError] = None
        for d in self._copy_dirs(volume, workdir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            copy = str(d / f"{tag}-{snap_id}.img")
            record.put({"id": snap_id, "state": "creating", "copy": copy,
                        "volume": os.path.abspath(volume)})
            try:
                clone_file(volume, copy)
            except OSError as exc:
                last = exc
                record.remove(snap_id)
                if exc.errno == errno.EXDEV:
                    continue
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SnapshotError(f"reflink: no space left to clone {volume}: free some "
                                        "space on its filesystem", code=NO_SPACE,
                                        backend=self.name) from exc
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise SnapshotError(f"reflink: the filesystem of {volume} refused to clone it "
                                        f"({exc.strerror}); use an XFS (reflink=1) or btrfs "
                                        "filesystem", code=SNAPSHOT_UNSUPPORTED,
                                        backend=self.name) from exc
                raise SnapshotError(f"reflink: cloning {volume} failed: {exc.strerror}",
                                    code=SNAPSHOT_FAILED, retryable=True, backend=self.name) from exc
            record.put({"id": snap_id, "state": "in_use", "copy": copy,
                        "volume": os.path.abspath(volume)})
            size = os.stat(copy).st_size
            return ReflinkSnapshot(self.name, volume, size, snap_id, copy,
                                   record, self.keep)
        raise SnapshotError(f"reflink: could not clone {volume} next to it or into {workdir}: "
                            f"{last.strerror if last else 'unknown error'}",
                            code=SNAPSHOT_UNSUPPORTED, backend=self.name)

    def recover(self, workdir: Path) -> List[str]:
        return _kept.cleanup(SnapshotRecord(workdir, self.name), _remove_file, False,
                             lambda e: f"reflink: removed clone {e.get('copy')}")

    def purge(self, workdir: Path) -> List[str]:
        return _kept.cleanup(SnapshotRecord(workdir, self.name), _remove_file, True,
                             lambda e: f"reflink: removed clone {e.get('copy')}")
