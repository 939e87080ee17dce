"""Point-in-time snapshots and change tracking, one backend per mechanism.

Standard library only; imports nothing from go2cloud_client. See docs/snapshot-driver.md and
the contracts in :mod:`snapshot_driver.base`.
"""

from snapshot_driver.base import Backend, Extent, ProbeResult, Snapshot, SnapshotError
from snapshot_driver.registry import get, names, probe_all

__all__ = ["Backend", "Extent", "ProbeResult", "Snapshot", "SnapshotError", "get", "names",
           "probe_all"]
