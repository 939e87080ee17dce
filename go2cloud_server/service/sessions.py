"""Fencing: one live agent session per source (``go2cloud_server.lease``), the fence on the agent API
and the epoch check on the data path."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from go2cloud_server import rules
from go2cloud_server.clock import iso
from go2cloud_server.errors import (
    InvalidInput,
    SessionBusy,
    SessionConflict,
    SessionRequired,
    SourceUnknown,
    StaleEpoch,
)
from go2cloud_server.lease import (
    GRANT_TAKEN_OVER,
    LEASE_INTERVALS,
    Lease,
    check_fingerprint,
    conflict_after,
    fingerprint_diff,
    fingerprint_of,
    open_lease,
    renew,
)
from go2cloud_server.repositories import cycle_writers as repo_cycle_writers
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories.db import Conn
from go2cloud_server.service.base import Concern
from go2cloud_server.store import dumps, loads

if TYPE_CHECKING:
    from go2cloud_server.service import Service

log = logging.getLogger(__name__)

#: refused agent processes remembered by the fence (refusal start, clone already reported) at most
FENCE_MEMORY = 10000


class Sessions(Concern):
    """Agent sessions (leases) of sources and the writers of each cycle."""

    def __init__(self, svc: Service) -> None:
        super().__init__(svc)
        #: fencing: when each refused agent process was first refused (source, instance), the
        #: refusals already reported as a clone, and the (task, cycle, epoch) writers recorded
        self._fence_lock = threading.Lock()
        self._contenders: Dict[Tuple[str, str], float] = {}
        self._flagged: set = set()
        self._writers_seen: set = set()

    def watch_lease(self, source_id: str) -> Optional[float]:
        """An import replacing ``source_id``: is its agent still running? A live lease is watched
        for up to ``Service.replace_watch_s`` (1.5 heartbeat intervals): a running agent renews it
        with a heartbeat within one interval. Returns the lease's expiry when it was live and not
        renewed meanwhile (its agent stopped, e.g. ``--abort`` just before this import: the
        replacement may go ahead), else None."""
        row = repo_sources.get(self.store, source_id)
        if row is None:
            return None
        first = self.lease_of(row)
        if not first.live(self.now()):
            return None
        deadline = time.monotonic() + self.svc.replace_watch_s
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            row = repo_sources.get(self.store, source_id)
            cur = self.lease_of(row or {})
            if cur.instance != first.instance or cur.expires != first.expires:
                return None  # renewed or taken over: an agent runs it
            if not cur.live(self.now()):
                return None
        return first.expires

    def live_session(self, old: Mapping[str, Any], unrenewed: Optional[float] = None) -> Optional[str]:
        """Why ``old`` cannot be replaced now because an agent still runs it (None: no live
        lease, or ``unrenewed``: a live lease seen not renewed for 1.5 heartbeat intervals, see
        :meth:`watch_lease`). Replacing it would cancel the task a running agent works on and
        revoke its key under it: the agent must be stopped first, or its lease left to expire."""
        lease = self.lease_of(old)
        now = self.now()
        if not lease.live(now) or (unrenewed is not None and lease.expires == unrenewed):
            return None
        left = max(1, int(lease.expires - now + 0.999))
        return (f"its agent is running: it holds the session of source {old['id']} (epoch {lease.epoch}, "
                f"renewed by its heartbeats; the lease expires at {iso(lease.expires)}, in {left}s if it "
                "stops). Stop that agent (on its machine: go2cloud_client --abort, or stop its service), "
                "or wait for its lease to expire, then replace the source again")

    @property
    def lease_ttl(self) -> float:
        return LEASE_INTERVALS * self.svc.heartbeat_interval

    @staticmethod
    def lease_of(row: Mapping[str, Any]) -> Lease:
        doc = loads(row.get("lease"), None) or {}
        fp = doc.get("fingerprint")
        return Lease(
            epoch=int(doc.get("epoch") or 0),
            session_id=str(doc.get("session_id") or ""),
            instance=str(doc.get("instance") or ""),
            fingerprint=fp if isinstance(fp, dict) else None,
            expires=float(doc.get("expires") or 0),
            granted_at=float(doc.get("granted_at") or 0),
        )

    @staticmethod
    def _save_lease(conn: Conn, source_id: str, lease: Lease) -> None:
        doc = {"epoch": lease.epoch, "session_id": lease.session_id, "instance": lease.instance,
               "fingerprint": lease.fingerprint, "expires": lease.expires, "granted_at": lease.granted_at}
        repo_sources.save_lease(conn, source_id, dumps(doc), lease.epoch)

    def _flag_clone(self, conn: Conn, source_id: str, code: str, message: str) -> None:
        """The operator's clone warning on the source (``source show``) and a warning event."""
        log.warning("source %s: %s", source_id, message)
        repo_sources.set_clone_warning(
            conn, source_id, dumps({"time": self.now_iso(), "code": code, "message": message[:2000]}))
        self.event(conn, source_id, "warning", code, message)

    def open_session(self, source_id: str, body: Any) -> Dict[str, Any]:
        """``POST /api/v1/sources/{id}/session``: the lease for the agent process ``instance``
        (of agent home ``session_id``, on the machine ``fingerprint``), or 409 ``session_busy``
        (Retry-After: another process holds a live lease; a restarted agent waits for its old
        process's lease to expire) or 409 ``session_conflict`` (refused for longer than a lease
        while the holder renewed it: a second live agent, most likely a cloned machine)."""
        body = rules.require_object(body)
        session_id = rules.require_str(body, "session_id", 64)
        instance = rules.require_str(body, "instance", 64)
        fingerprint = check_fingerprint(body.get("fingerprint"))
        now = self.now()
        key = (source_id, instance)
        refusal: Optional[Exception] = None
        with self.store.transaction() as conn:
            src = repo_sources.get(conn, source_id)
            if src is None:
                raise SourceUnknown(f"source {source_id} does not exist: import again")
            cur = self.lease_of(src)
            decision = open_lease(cur, session_id=session_id, instance=instance, fingerprint=fingerprint,
                                  now=now, ttl=self.lease_ttl)
            host = str((loads(src["inventory"], {}) or {}).get("hostname") or "")[:64]
            if decision.granted:
                lease = decision.lease
                self._save_lease(conn, source_id, lease)
                with self._fence_lock:
                    self._contenders.pop(key, None)
                if decision.outcome == GRANT_TAKEN_OVER:
                    self.event(conn, source_id, "info", "session_taken_over",
                                f"a new agent session (epoch {lease.epoch}) took over after the previous "
                                f"one (epoch {cur.epoch}) stopped renewing its lease at {iso(cur.expires)}; "
                                f"writes of epoch {cur.epoch} are refused from now on")
                differs = fingerprint_diff(fingerprint_of(loads(src["inventory"], {}) or {}), fingerprint)
                if differs:
                    self._flag_clone(
                        conn, source_id, "clone_suspected",
                        f"the agent of session epoch {lease.epoch} runs on another machine than the one "
                        f"imported as {source_id} ({'; '.join(differs)}). If that machine is a clone of "
                        "the imported one, run go2cloud_client --abort on the clone and import it again "
                        "with an activation code; if the hardware of this source changed, nothing to do.")
            else:
                with self._fence_lock:
                    # bounded: every refused agent process (a clone in a restart loop makes a new
                    # one each time) adds a key; forgetting them all costs at most a repeated
                    # warning event, never a refusal
                    if len(self._contenders) > FENCE_MEMORY:
                        self._contenders.clear()
                    if len(self._flagged) > FENCE_MEMORY:
                        self._flagged.clear()
                    first = self._contenders.setdefault(key, now)
                    new_flag = key not in self._flagged
                    final = now - first >= conflict_after(self.svc.heartbeat_interval)
                    if final or fingerprint_diff(cur.fingerprint, fingerprint):
                        self._flagged.add(key)
                holder = f"since {iso(cur.granted_at)}, epoch {cur.epoch}"
                advice = ("two agents share this source's identity, most likely because this machine "
                          "was cloned from an imported one (the agent home was copied with it). On the "
                          "clone: run go2cloud_client --abort, then import it again with an activation code.")
                differs = fingerprint_diff(cur.fingerprint, fingerprint)
                if new_flag and (final or differs):
                    what = f" ({'; '.join(differs)})" if differs else ""
                    self._flag_clone(
                        conn, source_id, "session_conflict",
                        f"a second agent tried to open a session of source {source_id} ({host}) while "
                        f"another agent holds it ({holder}){what}: it was refused. If a machine was "
                        "cloned from this one, run go2cloud_client --abort on the clone and import it "
                        "again with an activation code.")
                if final:
                    with self._fence_lock:
                        self._contenders.pop(key, None)
                    refusal = SessionConflict(
                        f"another agent holds the session of source {source_id} ({holder}) and is alive: "
                        + advice)
                else:
                    wait = max(1, min(int(cur.expires - now) + 1, int(self.lease_ttl) + 1))
                    refusal = SessionBusy(
                        f"another agent process holds the session of source {source_id} ({holder}); "
                        f"retry in {wait}s (a restarted agent waits for its old process's lease to expire)",
                        retry_after=wait)
        if refusal is not None:
            raise refusal
        lease = decision.lease
        log.info("source %s: session epoch %d %s (lease %.0fs)", source_id, lease.epoch, decision.outcome,
                 self.lease_ttl)
        return {"epoch": lease.epoch, "outcome": decision.outcome, "lease_seconds": self.lease_ttl,
                "expires_at": iso(lease.expires)}

    def fence(self, source_id: str, instance: Optional[str], *, renew_lease: bool = False) -> None:
        """Only the lease holder's requests reach the agent API (commands, acknowledgements,
        task documents, events); the holder's heartbeat (``renew_lease``) extends its lease. A
        source on which no session was ever opened has no lease (requests without the session
        header are served, as before fencing)."""
        row = repo_sources.get(self.store, source_id)
        if row is None or not row["lease_epoch"]:
            return
        cur = self.lease_of(row)
        if not instance:
            raise SessionRequired(f"source {source_id} has agent sessions: open one first "
                                  f"(POST /api/v1/sources/{source_id}/session)")
        if instance != cur.instance:
            raise SessionConflict(
                f"this agent process no longer holds the session of source {source_id}: another agent "
                f"took it at {iso(cur.granted_at)} (epoch {cur.epoch}). If this machine is a clone of the "
                "imported one, run go2cloud_client --abort here and import it again with an activation code.")
        if renew_lease:
            with self.store.transaction() as conn:
                row = repo_sources.get(conn, source_id)
                renewed = renew(self.lease_of(row or {}), instance, now=self.now(), ttl=self.lease_ttl)
                if renewed is None:
                    raise SessionConflict(f"this agent process no longer holds the session of source "
                                          f"{source_id}")
                self._save_lease(conn, source_id, renewed)

    def check_epoch(self, task_id: str, raw: Optional[str], *, writes: bool = True,
                    cycle: Optional[int] = None) -> None:
        """The data path's fence: a request of task ``task_id`` whose ``X-Go2cloud-Epoch``
        (``raw``) is not the source's current lease epoch is refused (409 ``stale_epoch``) before
        anything is read or written. A write records its epoch as a writer of the cycle (a cycle
        with two writers is never marked verified). Call after the task's credentials are checked."""
        raw = (raw or "").strip()
        if raw and (not raw.isdigit() or len(raw) > 12):
            raise InvalidInput("header X-Go2cloud-Epoch: a session epoch (a number) is required")
        epoch = int(raw) if raw else 0
        row = repo_tasks.cycle_and_epoch(self.store, task_id)
        if row is None:
            return
        current = int(row["lease_epoch"] or 0)
        if epoch != current:
            raise StaleEpoch(
                f"this write carries session epoch {epoch or 'none'} but source {row['source_id']} is at "
                f"epoch {current}: another agent session holds the source now; nothing was written")
        number = cycle if cycle is not None else row["current_cycle"]
        if writes and number:
            self._note_writer(task_id, int(number), epoch)

    def _note_writer(self, task_id: str, cycle: int, epoch: int) -> None:
        key = (task_id, cycle, epoch)
        with self._fence_lock:
            if key in self._writers_seen:
                return
        with self.store.transaction() as conn:
            repo_cycle_writers.add(conn, task_id, cycle, epoch, self.now_iso())
        with self._fence_lock:
            if len(self._writers_seen) > 100000:
                self._writers_seen.clear()
            self._writers_seen.add(key)

    def mixed_writers(self, task_id: str, cycle: int) -> Optional[str]:
        """Why cycle ``cycle`` of a task must not be marked verified (None: one session wrote it)."""
        epochs = repo_cycle_writers.epochs(self.store, task_id, cycle)
        if len(epochs) < 2:
            return None
        return (f"cycle {cycle} was written by {len(epochs)} agent sessions (epochs "
                f"{', '.join(map(str, epochs))}): its image may mix the disks of two machines and is not "
                "verified; see the source's events (source show), stop the second agent, then sync again")
