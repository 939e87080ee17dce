"""The command journal: every command exactly once.

Every command id the agent has seen is recorded in ``state/ledger.json`` (the file kept its first
name) with its type, status (``accepted`` while it runs, then ``succeeded`` / ``failed`` /
``unsupported`` / ``rejected``), whether the control plane has the current status
(``ack_sent``), and the final error code, message and result. Rules:

* ``accept`` persists the entry *before* the agent acts, so a command id runs at most once, also
  across a crash or restart;
* a redelivered id is answered from the journal, never run again;
* acknowledgements that could not be sent are re-sent later (and at startup);
* the journal keeps the last ``max_entries`` ids (entries still running or with an unsent ack
  are never dropped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

from go2cloud_client.home import Home

LOG = logging.getLogger(__name__)

ACCEPTED = "accepted"
FINAL_STATUSES = frozenset({"succeeded", "failed", "unsupported", "rejected"})
STATUSES = FINAL_STATUSES | {ACCEPTED}


class CommandJournal:
    """``state/ledger.json`` of one home (see the module text); thread-safe."""

    def __init__(self, home: Home, *, max_entries: int = 1000) -> None:
        self.home = home
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Dict[str, Any]] = OrderedDict()
        self._lock = threading.RLock()
        self._dirty = False

    # -- persistence ------------------------------------------------------------------------

    def load(self) -> CommandJournal:
        doc = self.home.read_state(self.home.command_journal_file) or {}
        entries = doc.get("entries") or []
        with self._lock:
            self._entries.clear()
            for item in entries:
                if (isinstance(item, dict) and isinstance(item.get("id"), str)
                        and item.get("status") in STATUSES):
                    cid = item.pop("id")
                    self._entries[cid] = item
        return self

    def _save(self) -> None:
        self._prune()
        entries = [{"id": cid, **entry} for cid, entry in self._entries.items()]
        try:
            self.home.write_state(self.home.command_journal_file, {"entries": entries})
        except BaseException:
            self._dirty = True
            raise
        self._dirty = False

    def persist(self) -> None:
        """Write a final status that could not be written when it was recorded (the home was
        full): the entry stays in memory meanwhile and its acknowledgement is sent from there."""
        with self._lock:
            if self._dirty:
                self._save()

    def _prune(self) -> None:
        excess = len(self._entries) - self.max_entries
        if excess <= 0:
            return
        for cid in list(self._entries):
            if excess <= 0:
                break
            entry = self._entries[cid]
            if entry["status"] in FINAL_STATUSES and entry.get("ack_sent"):
                del self._entries[cid]
                excess -= 1

    # -- queries ----------------------------------------------------------------------------

    def get(self, cid: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            entry = self._entries.get(cid)
            return dict(entry) if entry is not None else None

    def __contains__(self, cid: object) -> bool:
        with self._lock:
            return cid in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def unsent(self) -> List[Tuple[str, Dict[str, Any]]]:
        """Entries whose current status the control plane has not confirmed, oldest first."""
        with self._lock:
            return [(cid, dict(e)) for cid, e in self._entries.items() if not e.get("ack_sent")]

    def in_progress(self) -> List[str]:
        with self._lock:
            return [cid for cid, e in self._entries.items() if e["status"] == ACCEPTED]

    # -- transitions ------------------------------------------------------------------------

    def accept(self, cid: str, ctype: str) -> bool:
        """Record ``cid`` as accepted (persisted before returning). False if it was seen before:
        the caller must then not run it."""
        with self._lock:
            if cid in self._entries:
                return False
            self._entries[cid] = {
                "type": ctype, "status": ACCEPTED, "ack_sent": False, "error_code": None,
                "message": None, "result": None, "updated_at": time.time(),
            }
            try:
                self._save()
            except BaseException:
                # not persisted, so not accepted: the command is delivered again and accepted then
                # (dropping the entry keeps "at most once" and loses no command)
                del self._entries[cid]
                raise
            return True

    def finish(
        self,
        cid: str,
        status: str,
        *,
        ctype: str = "",
        error_code: Optional[str] = None,
        message: Optional[str] = None,
        result: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Record the final status of ``cid`` (also for ids never accepted: unsupported or
        rejected commands). A final status is never overwritten. If it cannot be written (a
        full home) it is kept in memory, the error is raised, and :meth:`persist` writes it later."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status}")
        with self._lock:
            entry = self._entries.get(cid)
            if entry is not None and entry["status"] in FINAL_STATUSES:
                LOG.warning("command %s already has final status %s; keeping it", cid, entry["status"])
                return
            if entry is None:
                entry = {"type": ctype}
                self._entries[cid] = entry
            entry.update({
                "status": status, "ack_sent": False, "error_code": error_code, "message": message,
                "result": result, "updated_at": time.time(),
            })
            self._entries.move_to_end(cid)
            self._save()

    def mark_sent(self, cid: str, status: str) -> None:
        """The control plane confirmed ``status`` for ``cid`` (ignored if it moved on since)."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is None or entry["status"] != status or entry.get("ack_sent"):
                return
            entry["ack_sent"] = True
            self._save()

    def fail_interrupted(self, keep: Iterable[str], message: str) -> List[str]:
        """At startup: commands left ``accepted`` by a previous run that nothing will finish
        (all but ``keep``, the command whose sync cycle resumes) are failed with code
        ``interrupted``; they are not run again (at most once)."""
        keep = set(keep)
        failed = [cid for cid in self.in_progress() if cid not in keep]
        for cid in failed:
            self.finish(cid, "failed", error_code="interrupted", message=message)
        return failed
