"""What the control plane keeps of an agent's heartbeat report: its supervised loops and the
retry of its current cycle, validated and bounded (the heartbeat is stored on the source row and
shown by ``source show``).

A heartbeat is never refused for a malformed optional report (it also renews the agent's lease):
an invalid ``loops`` or ``retry`` is dropped (None), an oversized one cut to the limits below.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

#: at most this many loops are kept (the agent has 4: heartbeat, commands, acks, events)
MAX_LOOPS = 16
LOOP_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
ERROR_MAX = 500
MESSAGE_MAX = 1000
CODE_RE = re.compile(r"^[a-z0-9_]{1,64}$")
TIME_MAX = 40
#: numbers beyond this are not believable (about 30 years in seconds; attempts likewise)
NUMBER_MAX = 1e9


def _text(value: Any, max_len: int) -> Optional[str]:
    return value[:max_len] if isinstance(value, str) else None


def _count(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= NUMBER_MAX:
        return None
    return value


def _seconds(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not 0 <= value <= NUMBER_MAX:  # also NaN
        return None
    return round(value, 1)


def loops(value: Any) -> Optional[Dict[str, Dict[str, Any]]]:
    """``{name: {alive, failures, last_error, last_failure_at}}`` or None if not a valid report."""
    if not isinstance(value, dict):
        return None
    out: Dict[str, Dict[str, Any]] = {}
    for name, loop in value.items():
        if len(out) >= MAX_LOOPS:
            break
        if not isinstance(name, str) or not LOOP_NAME_RE.match(name) or not isinstance(loop, dict):
            continue
        alive, failures = loop.get("alive"), _count(loop.get("failures"))
        if not isinstance(alive, bool) or failures is None:
            continue
        out[name] = {
            "alive": alive,
            "failures": failures,
            "last_error": _text(loop.get("last_error"), ERROR_MAX),
            "last_failure_at": _text(loop.get("last_failure_at"), TIME_MAX),
        }
    return out or None


def retry(value: Any) -> Optional[Dict[str, Any]]:
    """``{code, message, attempt, next_attempt_in_s, failing_for_s, budget_s}`` or None."""
    if not isinstance(value, dict):
        return None
    code, attempt = value.get("code"), _count(value.get("attempt"))
    if not isinstance(code, str) or not CODE_RE.match(code) or attempt is None:
        return None
    return {
        "code": code,
        "message": _text(value.get("message"), MESSAGE_MAX),
        "attempt": attempt,
        "next_attempt_in_s": _seconds(value.get("next_attempt_in_s")),
        "failing_for_s": _seconds(value.get("failing_for_s")),
        "budget_s": _seconds(value.get("budget_s")),
    }


def failing_loops(report: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """The loops worth an operator's eye: not alive now, or failed at least once."""
    return {name: loop for name, loop in (report or {}).items() if not loop["alive"] or loop["failures"]}


def bandwidth(value: Any) -> Optional[Dict[str, Any]]:
    """``{limit_mbps, schedule, zone, next_change_at, next_limit_mbps}`` (the limit in force now as the
    agent evaluated its bandwidth windows in the source's local time) or None."""
    if not isinstance(value, dict):
        return None
    limit = _count(value.get("limit_mbps"))
    if limit is None:
        return None
    out: Dict[str, Any] = {"limit_mbps": limit, "schedule": None}
    for key, max_len in (("schedule", 1024), ("zone", 64), ("next_change_at", TIME_MAX)):
        text = _text(value.get(key), max_len)
        if text is not None:  # printable characters only: this reaches an operator's terminal
            out[key] = "".join(c for c in text if c.isprintable())
    nxt = _count(value.get("next_limit_mbps"))
    if nxt is not None:
        out["next_limit_mbps"] = nxt
    return out
