"""``lvm``: a classic LVM snapshot (``lvcreate --snapshot``) of a logical volume.

create() asks ``lvs`` for the origin's size, its volume group's free space and whether it is a
thin volume, then runs ``lvcreate --snapshot --permission r -L <cow>m -n go2cloud-snap-<id>
-- VG/LV`` (thin volumes: no ``-L``, ``--setactivationskip n``). The snapshot reads
``/dev/VG/go2cloud-snap-<id>``. The copy-on-write store is ``cow_percent`` of the origin (default
20 %, at least 64 MiB) unless ``cow_size`` (bytes) is given; if writes to the origin overflow it
the kernel invalidates the snapshot, and check() reports ``snapshot_expired``. release() runs
``lvremove -f -- VG/NAME``. No change tracking (None).

Needs device-mapper: on a host without /dev/mapper/control probe() says so. In this repository
it is tested at the process boundary (fake lvcreate/lvs/lvremove on PATH), not on real LVM.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from snapshot_driver import _proc
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import (
    BAD_VOLUME,
    NO_SPACE,
    RELEASE_FAILED,
    SNAPSHOT_EXPIRED,
    SNAPSHOT_FAILED,
    SNAPSHOT_UNSUPPORTED,
    TOOL_MISSING,
    Backend,
    ProbeResult,
    Snapshot,
    SnapshotError,
)

MIB = 1024 * 1024
LVS_FIELDS = "lv_name,vg_name,lv_size,lv_attr,vg_free"


@dataclass(frozen=True)
class LvInfo:
    lv: str
    vg: str
    size: int
    attr: str
    vg_free: int

    @property
    def thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def invalid_snapshot(self) -> bool:
        # lv_attr[0] 'S' = invalid snapshot; lv_attr[4] 'I' = invalid snapshot state
        return self.attr[:1] == "S" or self.attr[4:5] == "I"


def parse_lvs(text: str) -> List[LvInfo]:
    """Rows of ``lvs --noheadings --nosuffix --units b --separator '|' -o LVS_FIELDS``."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().split("|")]
        if len(parts) < 5 or not parts[0]:
            continue
        try:
            rows.append(LvInfo(parts[0], parts[1], int(float(parts[2])), parts[3],
                               int(float(parts[4] or 0))))
        except ValueError:
            continue
    return rows


def _lvs(target: str) -> LvInfo:
    res = _proc.run(["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
                     "-o", LVS_FIELDS, "--", target], timeout=60)
    rows = parse_lvs(res.stdout)
    if not rows:
        raise _proc.ProcessError(res.cmd, res.returncode, res.stdout, res.stderr,
                                 reason="printed no logical volume")
    return rows[0]


def _gone(err: _proc.ProcessError) -> bool:
    text = err.stderr.lower()
    return "failed to find logical volume" in text or "not found" in text


class LvmSnapshot(Snapshot):
    def __init__(self, name: str, volume: str, size: int, snap_id: str, vg: str, lv: str,
                 record: SnapshotRecord, dev_dir: str) -> None:
        super().__init__(name, volume, size)
        self.snap_id = snap_id
        self.vg = vg
        self.lv = lv
        self._record = record
        self._dev_dir = dev_dir

    def path(self) -> str:
        self._check_live()
        return f"{self._dev_dir}/{self.vg}/{self.lv}"

    def check(self) -> None:
        self._check_live()
        try:
            info = _lvs(f"{self.vg}/{self.lv}")
        except _proc.ProcessError as exc:
            raise SnapshotError(f"lvm: cannot query snapshot {self.vg}/{self.lv}: {exc}",
                                code=SNAPSHOT_FAILED, retryable=True, backend=self.backend) from exc
        if info.invalid_snapshot:
            raise SnapshotError(f"lvm: snapshot {self.vg}/{self.lv} overflowed its copy-on-write "
                                "store and was invalidated; retry with a larger cow_percent",
                                code=SNAPSHOT_EXPIRED, retryable=True, backend=self.backend)

    def release(self) -> None:
        if self._released:
            return
        _remove(self.vg, self.lv)
        self._record.remove(self.snap_id)
        self._released = True


def _remove(vg: str, lv: str) -> bool:
    """lvremove VG/LV; False if it did not exist. Raises SnapshotError(release_failed)."""
    try:
        _proc.run(["lvremove", "-f", "--", f"{vg}/{lv}"], timeout=120)
        return True
    except _proc.ProcessError as exc:
        if _gone(exc):
            return False
        raise SnapshotError(f"lvm: could not remove snapshot {vg}/{lv}: {exc}",
                            code=RELEASE_FAILED, retryable=True, backend="lvm") from exc


class LvmBackend(Backend):
    name = "lvm"
    point_in_time = True
    tracks_changes = False

    def __init__(self, cow_percent: float = 20.0, cow_size: Optional[int] = None,
                 mapper_control: str = "/dev/mapper/control", dev_dir: str = "/dev") -> None:
        self.cow_percent = float(cow_percent)
        self.cow_size = cow_size
        self.mapper_control = mapper_control
        self.dev_dir = dev_dir

    def cow_bytes(self, origin_size: int) -> int:
        want = self.cow_size if self.cow_size else int(origin_size * self.cow_percent / 100)
        want = max(want, 64 * MIB)
        return -(-want // MIB) * MIB

    def _host(self) -> None:
        missing = [t for t in ("lvs", "lvcreate", "lvremove") if _proc.which(t) is None]
        if missing:
            raise SnapshotError(f"lvm: {', '.join(missing)} not installed; install the lvm2 "
                                "package", code=TOOL_MISSING, backend=self.name)
        if not os.path.exists(self.mapper_control):
            raise SnapshotError(f"lvm: {self.mapper_control} is missing: device-mapper is not "
                                "available in this kernel, so LVM snapshots cannot be made here; "
                                "use fsfreeze or live", code=SNAPSHOT_UNSUPPORTED, backend=self.name)

    def _origin(self, volume: str) -> LvInfo:
        try:
            return _lvs(volume)
        except _proc.ProcessError as exc:
            raise SnapshotError(f"lvm: {volume} is not an LVM logical volume "
                                f"({(exc.stderr.strip().splitlines() or [exc.reason])[-1]}); use "
                                "fsfreeze or a kernel snapshot driver for plain partitions",
                                code=BAD_VOLUME, backend=self.name) from exc

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        try:
            self._host()
            if volume is None:
                return ProbeResult(True, "lvm: available for logical volumes with free space in "
                                         "their volume group")
            info = self._origin(volume)
        except SnapshotError as exc:
            return ProbeResult(False, str(exc))
        if not info.thin:
            need = self.cow_bytes(info.size)
            if info.vg_free < need:
                return ProbeResult(False, f"lvm: volume group {info.vg} has {info.vg_free // MIB} "
                                          f"MiB free but the snapshot of {info.lv} needs "
                                          f"{need // MIB} MiB; add a disk to the volume group "
                                          "(vgextend) or give a smaller cow size")
        return ProbeResult(True, f"lvm: {volume} is {info.vg}/{info.lv} "
                                 f"({'thin' if info.thin else 'classic'} snapshot)")

    def create(self, volume: str, workdir: Path) -> Snapshot:
        self._host()
        info = self._origin(volume)
        snap_id = uuid.uuid4().hex[:8]
        name = f"go2cloud-snap-{snap_id}"
        args = ["lvcreate", "--snapshot", "--permission", "r"]
        if info.thin:
            args += ["--setactivationskip", "n"]
        else:
            need = self.cow_bytes(info.size)
            if info.vg_free < need:
                raise SnapshotError(f"lvm: volume group {info.vg} has {info.vg_free // MIB} MiB "
                                    f"free but the snapshot needs {need // MIB} MiB; add space "
                                    "(vgextend) or give a smaller cow size", code=NO_SPACE,
                                    backend=self.name)
            args += ["-L", f"{need // MIB}m"]
        args += ["-n", name, "--", f"{info.vg}/{info.lv}"]
        record = SnapshotRecord(workdir, self.name)
        record.put({"id": snap_id, "state": "in_use", "vg": info.vg, "lv": name,
                    "volume": volume})
        try:
            _proc.run(args, timeout=300)
        except _proc.ProcessError as exc:
            try:
                _remove(info.vg, name)
                record.remove(snap_id)
            except SnapshotError:
                pass
            nospace = "insufficient" in exc.stderr.lower()
            raise SnapshotError(f"lvm: lvcreate of a snapshot of {info.vg}/{info.lv} failed: {exc}",
                                code=NO_SPACE if nospace else SNAPSHOT_FAILED,
                                retryable=not nospace, backend=self.name) from exc
        return LvmSnapshot(self.name, volume, info.size, snap_id, info.vg, name, record,
                           self.dev_dir)

    def recover(self, workdir: Path) -> List[str]:
        record = SnapshotRecord(workdir, self.name)
        done = []
        for e in record.entries():
            existed = _remove(e["vg"], e["lv"])
            record.remove(e["id"])
            if existed:
                done.append(f"lvm: removed snapshot {e['vg']}/{e['lv']}")
        return done
