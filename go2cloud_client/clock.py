"""The agent's wall clock, for what humans and the control plane read (event and report times,
``started_at``/``finished_at`` of a cycle): the one place that formats "now" as a UTC timestamp.

Intervals, timeouts and backoff use ``time.monotonic()`` instead (never this clock).
"""

from __future__ import annotations

from datetime import datetime, timezone

#: ISO 8601, UTC, whole seconds: ``2026-01-31T12:00:00Z``
UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> str:
    """Now as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return datetime.now(timezone.utc).strftime(UTC_FORMAT)
