"""``vss``: Windows Volume Shadow Copy.

Two ways to drive it, chosen by ``tool``:

* ``powershell`` (default; works on client and server editions): one PowerShell run calls
  ``Win32_ShadowCopy.Create`` through CIM with context ``ClientAccessible``, looks up the new
  shadow's ``DeviceObject`` and the partition size, and prints one JSON object. Release:
  ``Get-CimInstance Win32_ShadowCopy -Filter "ID='{id}'" | Remove-CimInstance``.
* ``vssadmin`` (Windows Server only): ``vssadmin create shadow /for=C:`` (its "Shadow Copy ID"
  and "Shadow Copy Volume Name" lines are parsed) and ``vssadmin delete shadows
  /shadow={id} /quiet``; the volume size still comes from PowerShell (``Get-Partition``).

The snapshot's path() is the shadow device, e.g.
``\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy7``, which a reader opens raw. The volume
is a drive letter (``C:``); it and the shadow id are validated before they are placed in a
PowerShell command. No change tracking (None).

Runs only on Windows: tested here at the process boundary (fake ``powershell``/``vssadmin`` on
PATH).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from snapshot_driver import _proc
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
)

_DRIVE = re.compile(r"^([A-Za-z]):\\?$")
_GUID = re.compile(r"^\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}$")
_VSSADMIN_ID = re.compile(r"Shadow Copy ID:\s*(\{[0-9A-Fa-f-]+\})")
_VSSADMIN_DEV = re.compile(r"Shadow Copy Volume Name:\s*(\S+)")

#: Win32_ShadowCopy.Create return values: (meaning, code, retryable)
CREATE_RESULTS: Dict[int, Tuple[str, str, bool]] = {
    1: ("access denied: run the agent as Administrator", SNAPSHOT_FAILED, False),
    2: ("invalid argument", SNAPSHOT_FAILED, False),
    3: ("the volume was not found", BAD_VOLUME, False),
    4: ("the volume does not support shadow copies", SNAPSHOT_UNSUPPORTED, False),
    5: ("unsupported shadow copy context", SNAPSHOT_UNSUPPORTED, False),
    6: ("insufficient storage for the shadow copy: free space or enlarge the shadow storage "
         "(vssadmin resize shadowstorage)", NO_SPACE, False),
    7: ("the volume is in use", SNAPSHOT_FAILED, True),
    8: ("the maximum number of shadow copies is reached: delete old ones", NO_SPACE, False),
    9: ("another shadow copy operation is in progress", SNAPSHOT_FAILED, True),
    10: ("a shadow copy provider vetoed the operation", SNAPSHOT_FAILED, True),
    11: ("the shadow copy provider is not registered", SNAPSHOT_UNSUPPORTED, False),
    12: ("the shadow copy provider failed", SNAPSHOT_FAILED, True),
}

PS = ["powershell", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-Command"]


def create_script(letter: str) -> str:
    return (
        "$ErrorActionPreference='Stop'; "
        "$r = Invoke-CimMethod -ClassName Win32_ShadowCopy -MethodName Create "
        f"-Arguments @{{Volume='{letter}:\\'; Context='ClientAccessible'}}; "
        "if ($r.ReturnValue -ne 0) { @{rv=[int]$r.ReturnValue} | ConvertTo-Json -Compress; exit 0 }; "
        "$s = Get-CimInstance -ClassName Win32_ShadowCopy -Filter (\"ID='\" + $r.ShadowID + \"'\"); "
        f"$p = Get-Partition -DriveLetter {letter}; "
        "@{rv=0; id=$s.ID; device=$s.DeviceObject; size=[int64]$p.Size} | ConvertTo-Json -Compress"
    )


def delete_script(shadow_id: str) -> str:
    return (f"$ErrorActionPreference='Stop'; Get-CimInstance -ClassName Win32_ShadowCopy "
            f"-Filter \"ID='{shadow_id}'\" | Remove-CimInstance")


def size_script(letter: str) -> str:
    return f"$ErrorActionPreference='Stop'; [int64](Get-Partition -DriveLetter {letter}).Size"


def parse_vssadmin_create(text: str) -> Tuple[str, str]:
    """(shadow id, device) from ``vssadmin create shadow`` output; ValueError if absent."""
    m_id, m_dev = _VSSADMIN_ID.search(text), _VSSADMIN_DEV.search(text)
    if not (m_id and m_dev):
        raise ValueError("no Shadow Copy ID / Volume Name in vssadmin output")
    return m_id.group(1), m_dev.group(1)


def _last_json(text: str) -> Dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    raise ValueError("no JSON object in PowerShell output")


class VssSnapshot(Snapshot):
    def __init__(self, backend: VssBackend, volume: str, size: int, snap_id: str,
                 shadow_id: str, device: str, record: SnapshotRecord) -> None:
        super().__init__(backend.name, volume, size)
        self._b = backend
        self.snap_id = snap_id
        self.shadow_id = shadow_id
        self.device = device
        self._record = record

    def path(self) -> str:
        self._check_live()
        return self.device

    def release(self) -> None:
        if self._released:
            return
        self._b.delete(self.shadow_id)
        self._record.remove(self.snap_id)
        self._released = True


class VssBackend(Backend):
    name = "vss"
    point_in_time = True
    tracks_changes = False

    def __init__(self, tool: str = "powershell", windows: Optional[bool] = None) -> None:
        if tool not in ("powershell", "vssadmin"):
            raise ValueError("vss tool must be 'powershell' or 'vssadmin'")
        self.tool = tool
        self.windows = (os.name == "nt") if windows is None else bool(windows)

    def _run(self, args: List[str], code: str = SNAPSHOT_FAILED) -> _proc.Result:
        try:
            return _proc.run(args, timeout=600)
        except _proc.ProcessError as exc:
            if exc.not_found:
                raise SnapshotError(f"vss: {args[0]} was not found; it ships with Windows, check "
                                    "PATH", code=TOOL_MISSING, backend=self.name) from exc
            text = (exc.stdout + exc.stderr).lower()
            nospace = "insufficient storage" in text
            raise SnapshotError(f"vss: {args[0]} failed: {exc}",
                                code=NO_SPACE if nospace else code, retryable=not nospace,
                                backend=self.name) from exc

    def _host(self) -> None:
        if not self.windows:
            raise SnapshotError("vss: Volume Shadow Copy is a Windows service and this host is not "
                                "Windows; use fsfreeze, lvm, reflink or btrfs here",
                                code=SNAPSHOT_UNSUPPORTED, backend=self.name)
        for tool in {self.tool, "powershell"}:
            if _proc.which(tool) is None:
                raise SnapshotError(f"vss: {tool} was not found on PATH; it ships with Windows",
                                    code=TOOL_MISSING, backend=self.name)

    @staticmethod
    def letter(volume: str) -> str:
        m = _DRIVE.match(volume.strip())
        if not m:
            raise SnapshotError(f"vss: {volume!r} is not a drive letter such as C:",
                                code=BAD_VOLUME, backend="vss")
        return m.group(1).upper()

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        try:
            self._host()
            if volume is not None:
                self.letter(volume)
        except SnapshotError as exc:
            return ProbeResult(False, str(exc))
        return ProbeResult(True, f"vss: shadow copies through {self.tool}")

    def delete(self, shadow_id: str) -> None:
        if not _GUID.match(shadow_id):
            raise SnapshotError(f"vss: {shadow_id!r} is not a shadow copy id", code=BAD_VOLUME,
                                backend=self.name)
        if self.tool == "vssadmin":
            try:
                _proc.run(["vssadmin", "delete", "shadows", f"/shadow={shadow_id}", "/quiet"],
                          timeout=600)
            except _proc.ProcessError as exc:
                if "no items found" in (exc.stdout + exc.stderr).lower():
                    return                       # already gone: release is idempotent
                raise SnapshotError(f"vss: deleting shadow copy {shadow_id} failed: {exc}",
                                    code=RELEASE_FAILED, retryable=True, backend=self.name) from exc
        else:
            self._run([*PS, delete_script(shadow_id)], RELEASE_FAILED)

    def create(self, volume: str, workdir: Path) -> Snapshot:
        self._host()
        letter = self.letter(volume)
        record = SnapshotRecord(workdir, self.name)
        snap_id = uuid.uuid4().hex[:12]
        record.put({"id": snap_id, "state": "creating", "volume": volume})
        try:
            shadow_id, device, size = self._create(letter)
        except BaseException:
            record.remove(snap_id)
            raise
        record.put({"id": snap_id, "state": "in_use", "volume": volume, "shadow": shadow_id})
        return VssSnapshot(self, volume, size, snap_id, shadow_id, device, record)

    def _create(self, letter: str) -> Tuple[str, str, int]:
        if self.tool == "vssadmin":
            out = self._run(["vssadmin", "create", "shadow", f"/for={letter}:"]).stdout
            try:
                shadow_id, device = parse_vssadmin_create(out)
            except ValueError as exc:
                raise SnapshotError(f"vss: could not read vssadmin's answer: {exc}",
                                    code=SNAPSHOT_FAILED, retryable=True, backend=self.name) from exc
            try:
                size = int(self._run([*PS, size_script(letter)]).stdout.strip().splitlines()[-1])
            except (ValueError, IndexError, SnapshotError) as exc:
                self.delete(shadow_id)
                raise SnapshotError(f"vss: could not read the size of {letter}: {exc}",
                                    code=SNAPSHOT_FAILED, retryable=True, backend=self.name) from exc
            return shadow_id, device, size
        out = self._run([*PS, create_script(letter)]).stdout
        try:
            data = _last_json(out)
            rv = int(data.get("rv", -1))
        except ValueError as exc:
            raise SnapshotError(f"vss: could not read PowerShell's answer: {exc}",
                                code=SNAPSHOT_FAILED, retryable=True, backend=self.name) from exc
        if rv != 0:
            what, code, retry = CREATE_RESULTS.get(rv, (f"error {rv}", SNAPSHOT_FAILED, True))
            raise SnapshotError(f"vss: Win32_ShadowCopy.Create on {letter}: failed: {what}",
                                code=code, retryable=retry, backend=self.name)
        shadow_id, device = str(data.get("id", "")), str(data.get("device", ""))
        if not _GUID.match(shadow_id) or not device:
            raise SnapshotError("vss: PowerShell returned no shadow id or device",
                                code=SNAPSHOT_FAILED, retryable=True, backend=self.name)
        return shadow_id, device, int(data.get("size", 0))

    def recover(self, workdir: Path) -> List[str]:
        record = SnapshotRecord(workdir, self.name)
        done = []
        for e in record.entries():
            if e.get("shadow"):
                self.delete(e["shadow"])
                done.append(f"vss: deleted shadow copy {e['shadow']} of {e.get('volume')}")
            record.remove(e["id"])
        return done
