"""``btrfs``: a read-only btrfs subvolume snapshot of the subvolume holding an image FILE.

create() runs ``btrfs subvolume snapshot -r SUBVOL SUBVOL/.go2cloud-snapshots/NAME`` (the
snapshot directory lives inside the source subvolume, where later snapshots see it as an empty
directory) and the snapshot reads the image's twin inside it.

Change tracking: the token records the snapshot's generation ("Gen at creation"). For the next
snapshot, ``btrfs subvolume find-new SNAP GEN`` lists the file extents written in generation GEN
or later; those of the image's inode are the changed ranges. find-new cannot see ranges that
became holes (hole punching on a no-holes filesystem) or in-place writes to NOCOW files whose
extents are not shared with a snapshot, so the base snapshot is kept (the newest ``keep`` per
image, default 2): while it exists every write to a shared extent makes a new extent, and
allocation differences (hole vs data, size) are found by comparing both images' extent maps.
Without the base snapshot changed_since() returns None.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from snapshot_driver import _kept, _mounts, _proc
from snapshot_driver._extentmap import diff_maps, fiemap_path
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import (
    NO_SPACE,
    RELEASE_FAILED,
    SNAPSHOT_FAILED,
    SNAPSHOT_UNSUPPORTED,
    TOOL_MISSING,
    Backend,
    Extent,
    ProbeResult,
    Snapshot,
    SnapshotError,
    image_file_mount,
    merge_extents,
)

SNAP_DIR = ".go2cloud-snapshots"
SUBVOL_ROOT_INO = 256     # BTRFS_FIRST_FREE_OBJECTID: the root directory of every subvolume
_FIND_NEW = re.compile(r"^inode (\d+) file offset (\d+) len (\d+) .*\bgen (\d+)\b")
_GEN = re.compile(r"^\s*Gen at creation:\s*(\d+)", re.M)


def subvolume_root(path: str) -> str:
    """The root directory of the btrfs subvolume that holds ``path``."""
    d = os.path.dirname(os.path.realpath(path))
    while True:
        if os.stat(d).st_ino == SUBVOL_ROOT_INO or d == "/":
            return d
        d = os.path.dirname(d)


def parse_find_new(text: str, inode: int) -> List[Extent]:
    """Extents of ``inode`` in the output of ``btrfs subvolume find-new``."""
    out = []
    for line in text.splitlines():
        m = _FIND_NEW.match(line.strip())
        if m and int(m.group(1)) == inode:
            out.append(Extent(int(m.group(2)), int(m.group(3))))
    return out


def _delete_subvolume(entry: Dict[str, Any]) -> None:
    snap = entry.get("snapshot", "")
    if not snap or not os.path.lexists(snap):
        return
    try:
        _proc.run(["btrfs", "subvolume", "delete", "--", snap], timeout=120)
    except _proc.ProcessError as exc:
        if os.path.lexists(snap):
            raise SnapshotError(f"btrfs: could not delete snapshot {snap}: {exc}",
                                code=RELEASE_FAILED, retryable=True, backend="btrfs") from exc


class BtrfsSnapshot(Snapshot):
    def __init__(self, name: str, volume: str, size: int, snap_id: str, snapshot: str,
                 image: str, gen: int, record: SnapshotRecord, keep: int) -> None:
        super().__init__(name, volume, size)
        self.snap_id = snap_id
        self.snapshot = snapshot
        self.image = image
        self.gen = gen
        self._record = record
        self._keep = keep

    def path(self) -> str:
        self._check_live()
        return self.image

    def token(self) -> Optional[str]:
        return f"btrfs:{self.gen}:{self.snap_id}"

    def changed_since(self, token: Optional[str]) -> Optional[List[Extent]]:
        self._check_live()
        parts = (token or "").split(":")
        if len(parts) != 3 or parts[0] != "btrfs" or not parts[1].isdigit():
            return None
        base = self._record.get(parts[2])
        if (base is None or base.get("state") != "base"
                or base.get("volume") != os.path.abspath(self.volume)
                or not os.path.isfile(base.get("image", ""))):
            return None
        try:
            out = _proc.run(["btrfs", "subvolume", "find-new", "--", self.snapshot, parts[1]],
                            timeout=300).stdout
        except _proc.ProcessError as exc:
            if exc.not_found:
                return None
            raise SnapshotError(f"btrfs: find-new on {self.snapshot} failed: {exc}",
                                code=SNAPSHOT_FAILED, retryable=True, backend=self.backend) from exc
        written = parse_find_new(out, os.stat(self.image).st_ino)
        try:
            old_size = os.stat(base["image"]).st_size
            allocation = diff_maps(fiemap_path(base["image"]), old_size, fiemap_path(self.image),
                                   self.size, physical=False)
        except OSError:
            return None
        return merge_extents(written + allocation, self.size)

    def release(self) -> None:
        if self._released:
            return
        _kept.mark_base(self._record, self.snap_id, self._keep, _delete_subvolume)
        self._released = True


class BtrfsBackend(Backend):
    name = "btrfs"
    point_in_time = True
    tracks_changes = True

    def __init__(self, keep: int = 2) -> None:
        self.keep = int(keep)

    def _check(self, volume: str) -> _mounts.Mount:
        m = image_file_mount(self.name, volume, "this backend snapshots disk image files kept in a "
                                                "btrfs subvolume")
        if m is None or m.fstype != "btrfs":
            fs = m.fstype if m else "an unknown filesystem"
            raise SnapshotError(f"btrfs: {volume} is on {fs}, not btrfs; use the reflink backend on "
                                "XFS, or lvm/fsfreeze for devices", code=SNAPSHOT_UNSUPPORTED,
                                backend=self.name)
        if _proc.which("btrfs") is None:
            raise SnapshotError("btrfs: the btrfs tool is not installed; install btrfs-progs",
                                code=TOOL_MISSING, backend=self.name)
        return m

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        if volume is None:
            if _proc.which("btrfs") is None:
                return ProbeResult(False, "btrfs: the btrfs tool is not installed; install "
                                          "btrfs-progs")
            return ProbeResult(True, "btrfs: usable for disk image files kept in a btrfs "
                                     "subvolume; give the image path to check it")
        try:
            self._check(volume)
        except SnapshotError as exc:
            return ProbeResult(False, str(exc))
        if os.geteuid() != 0:
            return ProbeResult(False, "btrfs: creating and deleting snapshots needs root; run the "
                                      "agent as root")
        return ProbeResult(True, f"btrfs: {volume} is in the btrfs subvolume "
                                 f"{subvolume_root(volume)}; read-only snapshots with change "
                                 "tracking by generation")

    def create(self, volume: str, workdir: Path) -> Snapshot:
        self._check(volume)
        real = os.path.realpath(volume)
        subvol = subvolume_root(real)
        snapdir = Path(subvol) / SNAP_DIR
        snapdir.mkdir(mode=0o700, exist_ok=True)
        snap_id = uuid.uuid4().hex[:12]
        tag = hashlib.sha256(os.path.abspath(volume).encode()).hexdigest()[:8]
        snapshot = str(snapdir / f"{tag}-{snap_id}")
        image = os.path.join(snapshot, os.path.relpath(real, subvol))
        record = SnapshotRecord(workdir, self.name)
        entry = {"id": snap_id, "state": "creating", "snapshot": snapshot, "image": image,
                 "volume": os.path.abspath(volume)}
        record.put(entry)
        try:
            _proc.run(["btrfs", "subvolume", "snapshot", "-r", "--", subvol, snapshot], timeout=300)
            show = _proc.run(["btrfs", "subvolume", "show", "--", snapshot], timeout=60).stdout
        except _proc.ProcessError as exc:
            try:
                _delete_subvolume(entry)
                record.remove(snap_id)
            except SnapshotError:
                pass
            nospace = "no space" in exc.stderr.lower()
            raise SnapshotError(f"btrfs: snapshot of {subvol} failed: {exc}",
                                code=NO_SPACE if nospace else SNAPSHOT_FAILED,
                                retryable=not nospace, backend=self.name) from exc
        m = _GEN.search(show)
        gen = int(m.group(1)) if m else 0
        record.put(dict(entry, state="in_use", gen=gen))
        return BtrfsSnapshot(self.name, volume, os.stat(image).st_size, snap_id, snapshot, image,
                             gen, record, self.keep)

    def recover(self, workdir: Path) -> List[str]:
        return _kept.cleanup(SnapshotRecord(workdir, self.name), _delete_subvolume, False,
                             lambda e: f"btrfs: deleted snapshot {e.get('snapshot')}")

    def purge(self, workdir: Path) -> List[str]:
        return _kept.cleanup(SnapshotRecord(workdir, self.name), _delete_subvolume, True,
                             lambda e: f"btrfs: deleted snapshot {e.get('snapshot')}")
