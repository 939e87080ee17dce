"""``live``: no snapshot at all; reads the device or image file as it is right now.

Use it when nothing else is available and the volume is idle, or for the bulk passes before a
final sync taken with fsfreeze. The copy is NOT point-in-time: blocks written while the reader
runs may be seen half old, half new. probe() says so; the caller decides.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import List, Optional

from snapshot_driver.base import (
    BAD_VOLUME,
    Backend,
    ProbeResult,
    Snapshot,
    SnapshotError,
    device_or_file_size,
    drop_cache,
)

CAVEAT = ("the copy is not point-in-time: writes made while it is read may be copied half "
          "done; stop the services writing to it, or use fsfreeze/a snapshot backend for the "
          "final sync")


def check_volume(name: str, volume: str) -> os.stat_result:
    """stat ``volume`` and require a block device or regular file, else SnapshotError."""
    try:
        st = os.stat(volume)
    except OSError as exc:
        raise SnapshotError(f"{name}: {volume} does not exist or cannot be read "
                            f"({exc.strerror}); check the disk name",
                            code=BAD_VOLUME, backend=name) from exc
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise SnapshotError(f"{name}: {volume} is neither a block device nor an image file",
                            code=BAD_VOLUME, backend=name)
    return st


class LiveSnapshot(Snapshot):
    point_in_time = False

    def path(self) -> str:
        self._check_live()
        return self.volume

    def release(self) -> None:
        self._released = True


class LiveBackend(Backend):
    name = "live"
    point_in_time = False
    tracks_changes = False

    def probe(self, volume: Optional[str] = None) -> ProbeResult:
        if volume is not None:
            try:
                check_volume(self.name, volume)
            except SnapshotError as exc:
                return ProbeResult(False, str(exc))
            if not os.access(volume, os.R_OK):
                return ProbeResult(False, f"live: {volume} is not readable; run the agent as root")
            return ProbeResult(True, f"live: reads {volume} in place; {CAVEAT}")
        return ProbeResult(True, f"live: reads the volume in place; {CAVEAT}")

    def create(self, volume: str, workdir: Path) -> Snapshot:
        check_volume(self.name, volume)
        try:
            size = device_or_file_size(volume)
        except OSError as exc:
            raise SnapshotError(f"live: cannot open {volume}: {exc.strerror}", code=BAD_VOLUME,
                                backend=self.name) from exc
        drop_cache(volume)
        return LiveSnapshot(self.name, volume, size)

    def recover(self, workdir: Path) -> List[str]:
        return []
