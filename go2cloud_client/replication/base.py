"""The replicator contract and the types every replicator shares.

Two replicators move data to a target: :class:`~go2cloud_client.replication.rsync.FileReplicator`
(real rsync, one run per path) and :class:`~go2cloud_client.replication.block.BlockReplicator`
(whole disks in chunks). The task runner (:mod:`go2cloud_client.task`) and the block cycle
(:mod:`go2cloud_client.replication.block.cycle`) drive either through :class:`Replicator`:

* :meth:`Replicator.run_cycle` replicates everything once and commits it as the given cycle. It
  returns a :class:`CycleResult` (a subclass may add counters; ``to_dict`` is what the cycle's
  acknowledgement carries). When ``cancel`` is set it stops what it runs (rsync killed, block
  workers stopped) and raises :class:`TransferCancelled`: not an error, the same cycle can run
  again and resumes from what was already transferred. Any other failure is raised as an agent
  error (:class:`~go2cloud_client.errors.ReplicationError` and its kin, with ``retryable``
  telling the task runner whether to try again).
* Progress goes to the ``on_progress`` callback the replicator was built with, as a
  :class:`Progress` (totals plus one :class:`PathProgress` per path or disk), from the
  replicator's own threads; :meth:`Replicator.snapshot` returns the same picture on demand.
* One :meth:`~Replicator.run_cycle` at a time per replicator.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List, Optional, Protocol, TypeVar

#: the cycle description a replicator takes (file: ``rsync.Cycle``; block: ``block.BlockCycle``)
CycleT = TypeVar("CycleT", contravariant=True)


class TransferCancelled(Exception):
    """The cancel event was set; the transfer was stopped. Not an error: the cycle can be rerun."""


@dataclass
class PathProgress:
    path: str
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_sent: int = 0
    rate_bps: float = 0.0
    eta_s: Optional[float] = None
    state: str = "waiting"  # waiting|running|done
    bytes_zero: int = 0  # block mode: all-zero bytes sent as holes (always 0 for file level)
    compression: Optional[str] = None  # block mode: how data chunks go now: compressed|raw|off

    def to_dict(self) -> dict:
        doc = {"path": self.path, "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
               "bytes_sent": self.bytes_sent, "rate_bps": round(self.rate_bps, 1),
               "eta_s": None if self.eta_s is None else round(self.eta_s, 1), "state": self.state,
               "bytes_zero": self.bytes_zero}
        if self.compression is not None:
            doc["compression"] = self.compression
        return doc


@dataclass
class Progress:
    bytes_total: int
    bytes_done: int
    bytes_sent: int
    rate_bps: float
    eta_s: Optional[float]
    paths: List[PathProgress]

    def to_dict(self) -> dict:
        return {"bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "bytes_sent": self.bytes_sent, "rate_bps": round(self.rate_bps, 1),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
                "paths": [p.to_dict() for p in self.paths]}


@dataclass
class CycleResult:
    cycle: int
    bytes_total: int
    bytes_sent: int
    files: int
    passes: int
    started_at: str
    finished_at: str

    def to_dict(self) -> dict:
        return {"cycle": self.cycle, "bytes_total": self.bytes_total, "bytes_sent": self.bytes_sent,
                "files": self.files, "passes": self.passes, "started_at": self.started_at,
                "finished_at": self.finished_at}


class Replicator(Protocol[CycleT]):
    """What the task runner and the block cycle need from a replicator (see the module text)."""

    def run_cycle(self, cycle: CycleT, cancel: threading.Event) -> CycleResult:
        """Replicate once and commit as ``cycle``; raises :class:`TransferCancelled` on ``cancel``."""
        ...

    def snapshot(self) -> Progress:
        """The progress now (a copy; safe from any thread)."""
        ...


__all__ = ["CycleResult", "CycleT", "PathProgress", "Progress", "Replicator", "TransferCancelled"]
