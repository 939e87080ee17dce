"""Bookkeeping shared by backends that keep the previous snapshot as a change-tracking base
(reflink copies, btrfs snapshots).

Record entry states: ``creating`` (recorded before the host is changed), ``in_use`` (handed to
the caller), ``base`` (released, kept so the next snapshot can compute changed extents).
release() turns ``in_use`` into ``base`` and drops the oldest bases of the same volume beyond
``keep``. recover() removes ``creating``/``in_use`` leftovers; purge() removes everything.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from snapshot_driver._record import SnapshotRecord

LIVE_STATES = ("creating", "in_use")


def next_seq(record: SnapshotRecord) -> int:
    return max([int(e.get("seq", 0)) for e in record.entries()] + [0]) + 1


def mark_base(record: SnapshotRecord, entry_id: str, keep: int,
              remove: Callable[[Dict[str, Any]], None]) -> None:
    """Mark ``entry_id`` a base and remove older bases of the same volume beyond ``keep``."""
    entry = record.get(entry_id)
    if entry is None:
        return
    if keep <= 0:
        remove(entry)
        record.remove(entry_id)
        return
    entry = dict(entry, state="base", seq=next_seq(record))
    record.put(entry)
    bases = sorted((e for e in record.entries()
                    if e.get("state") == "base" and e.get("volume") == entry.get("volume")),
                   key=lambda e: int(e.get("seq", 0)))
    for old in bases[:-keep]:
        remove(old)
        record.remove(old["id"])


def cleanup(record: SnapshotRecord, remove: Callable[[Dict[str, Any]], None], everything: bool,
            describe: Callable[[Dict[str, Any]], str]) -> List[str]:
    done = []
    for entry in record.entries():
        if everything or entry.get("state") in LIVE_STATES:
            remove(entry)
            record.remove(entry["id"])
            done.append(describe(entry))
    return done
