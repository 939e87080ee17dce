"""``elastio-snap`` and ``dattobd``: snapshots by a kernel copy-on-write driver.

Both drivers (elastio-snap is a fork of dattobd) are driven by their control tool:

===================  =========================  ==========================
                     elastio-snap               dattobd
===================  =========================  ==========================
tool                 ``elioctl``                ``dbdctl``
state                ``/proc/elastio-snap-info``  ``/proc/datto-info``
snapshot device      ``/dev/elastio-snapN``     ``/dev/dattoN``
===================  =========================  ==========================

create(): ``setup-snapshot DEVICE COWFILE MINOR`` (COWFILE must be on the filesystem mounted
from DEVICE; we use ``<mountpoint>/.go2cloud-<flavour>-<seq>.cow``), or, when the device is
already tracked in incremental mode, ``transition-to-snapshot COWFILE MINOR``. The snapshot
reads ``/dev/<prefix>MINOR``. release(): ``destroy MINOR`` (the driver unlinks its COW file), or
with ``track=True`` ``transition-to-incremental MINOR`` so the driver keeps tracking changed
blocks for the next snapshot.

Change tracking: the changed-block bitmap lives in the COW file in a driver-specific format;
reading it is not implemented, so token() and changed_since() return None (the caller
hash-scans). Incremental mode still saves the driver from a fresh setup each cycle.

The drivers are kernel modules (dkms); installing one is an explicit, prompted step of the
agent. They cannot be loaded here, so this module is tested at the process boundary (fake
``elioctl``/``dbdctl`` on PATH, fake info files), not against a real driver.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from snapshot_driver import _mounts, _proc
from snapshot_driver._record import SnapshotRecord
from snapshot_driver.base import (
    BAD_VOLUME,
    NO_SPACE,
    RELEASE_FAILED,
    SNAPSHOT_FAILED,
    SNAPSHOT_UNSUPPORTED,
    TOOL_MISSING,
    Backend,
    ProbeResult,
    Snapshot,
    SnapshotError,
    device_or_file_size,
)
from snapshot_driver.live import check_volume

STATE_SNAPSHOT = 1
STATE_ACTIVE = 2

FLAVOURS: Dict[str, Dict[str, str]] = {
    "elastio-snap": {"tool": "elioctl", "info": "/proc/elastio-snap-info",
                     "prefix": "elastio-snap", "package": "elastio-snap"},
    "dattobd": {"tool": "dbdctl", "info": "/proc/datto-info", "prefix": "datto",
                "package": "dattobd"},
}
MAX_MINORS = 255


def parse_info(text: str) -> List[Dict[str, Any]]:
    """The ``devices`` list of the driver's info file (JSON)."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    devices = data.get("devices", []) if isinstance(data, dict) else []
    return [d for d in devices if isinstance(d, dict) and isinstance(d.get("minor"), int)]


class KernelSnapshot(Snapshot):
    def __init__(self, backend: KernelCowBackend, volume: str, size: int, snap_id: str,
                 minor: int, record: SnapshotRecord) -> None:
        super().__init__(backend.name, volume, size)
        self._b = backend
        self.snap_id = snap_id
        self.minor = minor
        self._record = record

    def path(self) -> str:
        self._check_live()
        return f"{self._b.dev_dir}/{self._b.flavour['prefix']}{self.minor}"

    def release(self) -> None:
        if self._released:
            return
        if self._b.track:
            self._b.ctl(["transition-to-incremental", str(self.minor)], RELEASE_FAILED)
            entry = self._record.get(self.snap_id) or {}
            self._record.put(dict(entry, id=self.snap_id, state="tracking"))
        else:
            self._b.destroy(self.minor)
            self._record.remove(self.snap_id)
        self._released = True


class KernelCowBackend(Backend):
    point_in_time = True
    tracks_changes = False

    def __init__(self, flavour: str = "dattobd", track: bool = False,
                 info_path: Optional[str] = None, dev_dir: str = "/dev",
                 mountinfo: str = _mounts.MOUNTINFO) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown kernel snapshot flavour {flavour!r}")
        self.name = flavour
        self.flavour = FLAVOURS[flavour]
        self.track = bool(track)
        self.info_path = info_path or self.flavour["info"]
        self.dev_dir = dev_dir
        self.mountinfo = mountinfo

    # -- helpers ---------------------------------------------------------------------------
    def ctl(self, args: List[str], code: str = SNAPSHOT_FAILED) -> _proc.Result:
        tool = self.flavour["tool"]
        try:
            return _proc.run([tool, *args], timeout=300)
        except _proc.ProcessError as exc:
            if exc.not_found:
                raise SnapshotError(self._missing_tool(), code=TOOL_MISSING,
                                    backend=self.name) from exc
            text = exc.stderr.lower()
            nospace = "no space" in text
            raise SnapshotError(f"{self.name}: {tool} {args[0]} failed: {exc}",
                                code=NO_SPACE if nospace else code, retryable=not nospace,
                                backend=self.name) from exc

    def destroy(self, minor: int) -> bool:
        if not any(d["minor"] == minor for d in self.devices()):
            return False
        self.ctl(["destroy", str(minor)], RELEASE_FAILED)
        return True

    def devices(self) -> List[Dict[str, Any]]:
        try:
            with open(self.info_path, encoding="utf-8") as f:
                return parse_info(f.read())
        except OSError:
            return []

    def _missing_tool(self) -> str:
        return (f"{self.name}: {self.flavour['tool']} is not installed; install the "
                f"{self.flavour['package']} package (its kernel module is installed with dkms)")

    def _host(self) -> None:
        if _proc.which(self.flavour["tool"]) is None:
            raise SnapshotError(self._missing_tool(), code=TOOL_MISSING, backend=self.name)
        if not os.path.exists(self.info_path):
            raise SnapshotError(f"{self.name}: the {self.flavour['package']} kernel module is not "
                                f"loaded ({self.info_path} is missing); install it and run "
                                f"'modprobe {self.flavour['package'].replace('-', '_')}', or use "
                                "another backend", code=SNAPSHOT_UNSUPPORTED, backend=self.name)

    def _mount(self, volume: str) -> _mounts.Mount:
        st = check_volume(self.name, volume)
        if not volume.startswith("/"):
            raise SnapshotError(f"{self.name}: give the device as an absolute path, not {volume}",
                                code=BAD_VOLUME, backend=self.name)
        found = _mounts.mounts_of_device(volume, self.mountinfo)
        if not found:
            what = "device" if stat.S_ISBLK(st.st_mode) else "volume"
            raise SnapshotError(f"{self.name}: {what} {volume} is not mounted; the driver keeps its "
                                "copy-on-write file on the mounted filesystem (an unmounted "
                                "volume can be read with the live backend)",
                                code=SNAPSHOT_UNSUPPORTED, backend=self.name)
        return found[0]

    # -- Backend ---------------------------------------------------------------------------
    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        try:
            self._host()
            if volume is None:
                return ProbeResult(True, f"{self.name}: driver loaded; snapshots of mounted "
                                         "devices")
            m = self._mount(volume)
        except SnapshotError as exc:
            return ProbeResult(False, str(exc))
        return ProbeResult(True, f"{self.name}: {volume} ({m.fstype} on {m.mountpoint}) can be "
                                 "snapshotted by the kernel driver")

    def create(self, volume: str, workdir: Path) -> Snapshot:
        self._host()
        m = self._mount(volume)
        real = os.path.realpath(volume)
        devices = self.devices()
        mine = [d for d in devices if os.path.realpath(str(d.get("block_device", ""))) == real]
        record = SnapshotRecord(workdir, self.name)
        snap_id = uuid.uuid4().hex[:12]
        seq = int(mine[0].get("seq_id", 0)) + 1 if mine else 1
        cow = os.path.join(m.mountpoint, f".go2cloud-{self.name}-{seq % 2}.cow")
        if mine:
            minor = int(mine[0]["minor"])
            entry = {"id": snap_id, "state": "in_use", "minor": minor, "volume": volume,
                     "cow": cow}
            for old in record.entries():
                if old.get("minor") == minor:
                    record.remove(old["id"])
            record.put(entry)
            if int(mine[0].get("state", 0)) & STATE_SNAPSHOT:
                # a snapshot left active by a crashed run is stale: go back to incremental first
                self.ctl(["transition-to-incremental", str(minor)])
            self.ctl(["transition-to-snapshot", cow, str(minor)])
        else:
            used = {int(d["minor"]) for d in devices}
            free = [n for n in range(MAX_MINORS) if n not in used]
            if not free:
                raise SnapshotError(f"{self.name}: all {MAX_MINORS} minors are in use",
                                    code=SNAPSHOT_FAILED, retryable=True, backend=self.name)
            minor = free[0]
            record.put({"id": snap_id, "state": "in_use", "minor": minor, "volume": volume,
                        "cow": cow})
            try:
                self.ctl(["setup-snapshot", volume, cow, str(minor)])
            except SnapshotError:
                record.remove(snap_id)
                raise
        return KernelSnapshot(self, volume, device_or_file_size(volume), snap_id, minor, record)

    def _cleanup(self, workdir: Path, everything: bool) -> List[str]:
        record = SnapshotRecord(workdir, self.name)
        done = []
        for e in record.entries():
            if e.get("state") == "tracking" and not everything:
                continue
            minor = int(e.get("minor", -1))
            if minor >= 0 and self.destroy(minor):
                done.append(f"{self.name}: destroyed minor {minor} ({e.get('volume')})")
            record.remove(e["id"])
        return done

    def recover(self, workdir: Path) -> List[str]:
        return self._cleanup(workdir, False)

    def purge(self, workdir: Path) -> List[str]:
        return self._cleanup(workdir, True)


def elastio_snap(**options: Any) -> KernelCowBackend:
    return KernelCowBackend("elastio-snap", **options)


def dattobd(**options: Any) -> KernelCowBackend:
    return KernelCowBackend("dattobd", **options)
