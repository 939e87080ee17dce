"""Backends by name.

``get("fsfreeze", max_window=30)`` returns a new backend instance configured with the options;
unknown names raise SnapshotError(code="unknown_backend") listing the known ones. Names are
case-insensitive and ``_`` is accepted for ``-`` (``elastio_snap``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from snapshot_driver.base import UNKNOWN_BACKEND, Backend, ProbeResult, SnapshotError


def _factories() -> Dict[str, Callable[..., Backend]]:
    from snapshot_driver import btrfs, failing, fsfreeze, kernel_cow, live, lvm, reflink, vss

    return {
        "live": live.LiveBackend,
        "fsfreeze": fsfreeze.FsfreezeBackend,
        "reflink": reflink.ReflinkBackend,
        "btrfs": btrfs.BtrfsBackend,
        "lvm": lvm.LvmBackend,
        "elastio-snap": kernel_cow.elastio_snap,
        "dattobd": kernel_cow.dattobd,
        "vss": vss.VssBackend,
        "failing": failing.FailingBackend,
    }


def names() -> List[str]:
    """Known backend names, sorted."""
    return sorted(_factories())


def get(name: str, **options: Any) -> Backend:
    """A new backend ``name`` built with ``options``; SnapshotError for an unknown name."""
    key = str(name).strip().lower().replace("_", "-")
    factories = _factories()
    if key not in factories:
        raise SnapshotError(f"unknown snapshot backend {name!r}; known backends: "
                            f"{', '.join(sorted(factories))}", code=UNKNOWN_BACKEND)
    return factories[key](**options)


def probe_all(volume: Optional[str] = None) -> Dict[str, ProbeResult]:
    """probe() of every backend except ``failing`` (a test backend), by name. A probe that
    raises (its contract says it never does) reads as unusable, with the error as the reason."""
    out: Dict[str, ProbeResult] = {}
    for n in names():
        if n == "failing":
            continue
        try:
            out[n] = get(n).probe(volume)
        except Exception as exc:  # noqa: BLE001 - one broken probe must not hide the others
            out[n] = ProbeResult(False, f"{n}: probe failed ({exc})")
    return out
