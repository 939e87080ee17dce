"""The agent's session with the control plane (fencing, docs/protocol.md "Fencing").

A source's identity (its key in the agent home) is copied with the machine when a VM is cloned.
So every agent process asks the control plane for the source's lease at start and holds it by
its heartbeats; only the holder gets commands, and every data write carries the lease's epoch.

* ``session_id``: random, kept in ``<home>/state/session_id``. A restart of this agent home on
  the same machine resumes the same epoch once the old process's lease has expired.
* ``instance``: random per process.
* the machine's fingerprint (machine id, disk serials, MAC addresses) lets the control plane tell
  a clone from the imported machine.

:func:`open_session` waits while another process holds a live lease (a restarted agent waits for
its killed predecessor's lease to expire, a few heartbeat intervals) and raises
:class:`SessionConflictError` when the control plane says another live agent holds it.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any, Callable, Dict, Optional, cast

import tenacity

from go2cloud_client import backoff, inventory, platform
from go2cloud_client.errors import SessionBusyError
from go2cloud_client.home import Home

LOG = logging.getLogger(__name__)

#: the longest single wait between two attempts (the control plane's Retry-After is shorter)
MAX_WAIT_S = 60.0


def session_id(home: Home) -> str:
    """This agent home's session id (created once)."""
    path = home.state_dir / "session_id"
    saved = (home.read_text(path) or "").strip()
    if saved:
        return saved[:64]
    new = secrets.token_hex(16)
    home.write_bytes(path, (new + "\n").encode())
    return new


def fingerprint(home: Home) -> Dict[str, Any]:
    """What tells this machine from a clone: machine id, disk serials, MAC addresses."""
    serials = sorted({str(d["serial"]) for d in platform.block_devices() if d.get("serial")})
    macs = sorted({str(n["mac"]) for n in inventory.nics() if n.get("mac")})
    return {"machine_id": inventory.machine_id(home), "disk_serials": serials, "macs": macs}


def open_session(
    open_call: Callable[[str, str, Dict[str, Any]], int],
    home: Home,
    *,
    stop_event: threading.Event,
    on_wait: Optional[Callable[[str], None]] = None,
) -> int:
    """Open this process's session (``open_call(session_id, instance, fingerprint)`` is
    ``ControlPlane.open_session``); returns the epoch. Waits as long as the control plane answers
    ``session_busy``; raises SessionConflictError when it answers ``session_conflict``. Returns 0
    when ``stop_event`` is set while it waits."""
    sid = session_id(home)
    instance = secrets.token_hex(16)
    fp = fingerprint(home)

    def told(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:  # one warning per wait, not one per attempt
            exc = state.outcome.exception() if state.outcome else None
            LOG.warning("%s", exc)
            if on_wait is not None:
                on_wait(f"Another agent process holds this source's session; waiting up to a few "
                        f"heartbeat intervals for it to end ({exc})")

    policy = backoff.retrying(lambda exc: isinstance(exc, SessionBusyError), wait=_busy_wait, attempts=None,
                              sleep=backoff.interruptible_sleep(stop_event, _Stopping), before_sleep=told)
    try:
        return cast(int, policy(open_call, sid, instance, fp))
    except _Stopping:
        return 0  # stopping: no session


class _Stopping(Exception):
    """The agent stops while waiting for the session."""


def _busy_wait(state: tenacity.RetryCallState) -> float:
    """The wait after a ``session_busy``: the control plane's Retry-After (5 s when it gave none),
    between 1 s and MAX_WAIT_S."""
    exc = state.outcome.exception() if state.outcome else None
    retry_after = exc.retry_after if isinstance(exc, SessionBusyError) else None
    return min(MAX_WAIT_S, max(1.0, float(retry_after or 5)))
