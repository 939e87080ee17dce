"""Automatic retry of a cycle that failed for a transient cause (docs/reliability.md, 5).

The agent retries a failing cycle itself under its time budget (30 min for the network, 1 h for
the control plane away); when that budget runs out it acknowledges the cycle ``failed``. If the
cause is transient (the codes below: the network, the control plane or the target away), the
control plane's scheduler queues a ``sync`` of the task again after ``after_s`` seconds, doubled
for each automatic retry of the last 24 hours, at most ``per_day`` of them (``serve
--auto-retry-after``, ``--auto-retries-per-day``). Each retry is an event on the source
(``sync_retried_automatically``); ``migration show`` has the count and the next time. A full target
is not here: it is a task state of its own (``target_full``) resumed when space returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: the error codes of a cycle that may succeed later without anyone changing anything
TRANSIENT_CODES = frozenset({
    "rsync_connection_failed",    # the rsync session: reset, stalled, refused by a busy target
    "server_unreachable",         # the agent could not reach the control plane
    "control_plane_unreachable",
    "server_error",               # the control plane answered 5xx
    "rate_limited",
    "protocol_error",             # a response cut in the middle
    "block_target_failed",        # the block receiver could not be reached
})
AUTO_RETRY_EVENT = "sync_retried_automatically"


@dataclass(frozen=True)
class AutoRetry:
    after_s: float = 300.0
    per_day: int = 3

    def due_at(self, failed_at: Optional[float], done_today: int) -> Optional[float]:
        """When the next automatic retry is due (epoch seconds), None when no more today."""
        if failed_at is None or done_today >= self.per_day:
            return None
        return failed_at + self.after_s * (2 ** done_today)
