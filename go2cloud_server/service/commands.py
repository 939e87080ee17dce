"""Commands for agents: queued in a transaction, waited for by the agents' long poll, and their
final acknowledgements applied (a cycle committed, a task failed or completed) exactly once."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

from go2cloud_server.repositories import artifacts as repo_artifacts
from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories.db import Conn
from go2cloud_server.service.base import CYCLE_COMMANDS, TARGET_FULL, Concern, rand_id
from go2cloud_server.space import is_disk_full
from go2cloud_server.store import dumps, loads

if TYPE_CHECKING:
    from go2cloud_server.service import Service

log = logging.getLogger(__name__)

FINAL_COMMAND_STATUSES = ("succeeded", "failed", "unsupported", "rejected", "superseded")


class Commands(Concern):
    """The command queue and the application of final acknowledgements."""

    def __init__(self, svc: Service) -> None:
        super().__init__(svc)
        #: notified when a command is queued (the agents' long poll) and on close
        self.commands_cv = threading.Condition()
        self.closed = False
        #: one lock per task while its acknowledgement is applied (weak: gone when unused, so the
        #: table does not grow with every task the server ever ran)
        self._apply_locks: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()
        # a command queued through another replica on the same database wakes these polls too
        self.store.listen(repo_commands.COMMANDS_CHANNEL, lambda _source_id: self.notify())

    def wait_for(self, fetch: Callable[[], List[Dict[str, Any]]], wait: float,
                 monotonic: Callable[[], float] = time.monotonic) -> List[Dict[str, Any]]:
        """``fetch()`` once it returns something (checked again each time a command is queued),
        after ``wait`` seconds, or at once when closed: what it returned last."""
        deadline = monotonic() + max(0.0, wait)
        with self.commands_cv:
            while True:
                found = fetch()
                remaining = deadline - monotonic()
                if found or remaining <= 0 or self.closed:
                    return found
                self.commands_cv.wait(remaining)

    def close(self) -> None:
        """Wake every long poll: they answer at once from now on."""
        with self.commands_cv:
            self.closed = True
            self.commands_cv.notify_all()

    def notify(self) -> None:
        with self.commands_cv:
            self.commands_cv.notify_all()

    def apply_final(self, cmd: Mapping[str, Any]) -> None:
        """Apply a command's final acknowledgement (stored with ``applied = 0``), then mark it
        applied. Idempotent: the cycle commit and retention are, and one lock per task keeps a
        retried acknowledgement from applying it twice at the same time."""
        with self._locks_guard:
            key = str(cmd["task_id"] or cmd["id"])
            lock = self._apply_locks.get(key)
            if lock is None:
                lock = self._apply_locks[key] = threading.Lock()
        with lock:
            applied = repo_commands.is_applied(self.store, cmd["id"])
            if applied is None or applied:
                return
            self.on_command_final(cmd, cmd["status"], cmd["error_code"], cmd["message"],
                                   loads(cmd["result"], {}) or {})
            with self.store.transaction() as conn:
                repo_commands.mark_applied(conn, cmd["id"])

    def apply_unfinished(self) -> int:
        """Apply the final acknowledgements whose application a stop or crash interrupted."""
        rows = repo_commands.unapplied(self.store)
        for cmd in rows:
            log.info("command %s (%s) of %s: applying its %s acknowledgement again after a restart",
                     cmd["id"], cmd["type"], cmd["source_id"], cmd["status"])
            try:
                self.apply_final(cmd)
            except Exception as exc:  # noqa: BLE001 - one task's bad state never stops the server
                what = f"the {cmd['type']} acknowledgement cannot be applied"
                self.svc.tasks.fail_at_start(cmd["task_id"], what, exc)
        return len(rows)

    def start_taken(self, cmd: Mapping[str, Any]) -> None:
        """The agent accepted the ``start`` queued after a passed drill: the task is syncing now."""
        self.start_taken_for(cmd["task_id"])

    def start_taken_for(self, task_id: str) -> None:
        """A ``drill_passed`` task's start is taken: by the agent's ``accepted`` acknowledgement,
        or by its first data request when that comes first (the agent writes at once and
        acknowledges on another thread)."""
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, task_id)
            if task is not None and task["status"] == "drill_passed":
                self.svc.tasks.set_task(conn, task_id, status="syncing")

    def on_command_final(
        self,
        cmd: Mapping[str, Any],
        status: str,
        error_code: Optional[str],
        message: Optional[str],
        result: Mapping[str, Any],
    ) -> None:
        task_id = cmd["task_id"]
        if not task_id:
            return
        params = loads(cmd["params"], {})
        ctype = cmd["type"]
        if ctype == "drill":
            self.svc.drills.on_final(cmd, status, error_code, message, result)
            return
        cycle = params.get("cycle") if ctype in CYCLE_COMMANDS else None
        number = int(cycle["number"]) if isinstance(cycle, dict) and cycle.get("number") else None
        if status != "succeeded":
            if ctype in CYCLE_COMMANDS and error_code == TARGET_FULL:
                if not self._superseded_cycle(cmd):
                    self.svc.targets.mark_target_full(task_id,
                                                      f"the agent reported: {message or 'target full'}")
                return
            if ctype in CYCLE_COMMANDS:
                with self.store.transaction() as conn:
                    task = repo_tasks.get(conn, task_id)
                    open_ = ("syncing", "pending", "paused", "drill_passed", TARGET_FULL)
                    if task and task["status"] in open_:
                        self.svc.tasks.set_task(
                            conn,
                            task_id,
                            status="failed",
                            finalizing=0,
                            error_code=error_code or "replication_failed",
                            error_message=message or f"{ctype} command {status}",
                        )
            else:
                with self.store.transaction() as conn:
                    self.svc.tasks.set_task(
                        conn,
                        task_id,
                        error_code=error_code or f"{ctype}_{status}",
                        error_message=message or f"{ctype} command {status}",
                    )
            return
        if ctype not in CYCLE_COMMANDS:
            return
        rows: List[Dict[str, Any]] = []
        removed: List[int] = []
        task = repo_tasks.get(self.store, task_id)
        if task is None or task["status"] in ("cancelled", "completed"):
            return
        if number is not None:
            try:
                rows = self.svc.targets.commit_cycle(task, number)
            except Exception as exc:  # noqa: BLE001 - reported to the operator as the task's error
                if is_disk_full(exc) or getattr(exc, "code", None) == TARGET_FULL:
                    self.svc.targets.mark_target_full(task_id, f"committing cycle {number}: {exc}")
                    return
                log.warning("committing cycle %d of %s failed: %s", number, task_id, exc)
                log.debug("commit failure", exc_info=True)
                with self.store.transaction() as conn:
                    self.svc.tasks.set_task(
                        conn,
                        task_id,
                        status="failed",
                        finalizing=0,
                        error_code="target_commit_failed",
                        error_message=f"the target could not record cycle {number}: {exc}",
                    )
                return
            removed = self.svc.targets.retain(task, int(task["keep_images"]), just_committed=number)
        mixed = self.svc.sessions.mixed_writers(task_id, number) if number is not None else None
        if mixed:  # fenced: never verified (the verifier refuses it too, after a restart)
            log.warning("task %s: %s", task_id, mixed)
            rows = [self.svc.targets.refused_row(row, mixed) for row in rows]
        finished = ctype == "finalize"
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, task_id)
            if task is None:
                return
            for row in rows:
                repo_artifacts.upsert(conn, task_id, number, row)
            for n in removed:
                repo_artifacts.delete_cycle(conn, task_id, n)
            changes: Dict[str, Any] = {"error_code": None, "error_message": None}
            if mixed:
                changes.update(error_code="mixed_sessions", error_message=mixed)
            if number is not None:
                changes.update(current_cycle=None, last_committed=number)
            if task["status"] in ("cancelled", "completed"):
                pass
            elif finished:
                changes.update(status="completed", finalizing=0, finished_at=self.now_iso())
            elif task["status"] == "paused":
                changes.update(paused_from="pending")
            else:
                changes.update(status="pending")
            self.svc.tasks.set_task(conn, task_id, **changes)
        for row in rows:  # block generations: verified in the background, after this answer
            if row["disk"] and row["sha256"] is None and number is not None and not mixed:
                self.svc.targets.verifier.submit(task_id, number, row["disk"])
        if finished:
            self.svc.targets.release(dict(task, current_cycle=None))
            log.info("task %s completed", task_id)

    def queue(
        self,
        conn: Conn,
        source_id: str,
        task_id: Optional[str],
        ctype: str,
        params: Mapping[str, Any],
    ) -> str:
        cid = rand_id("c-", 16)
        repo_commands.insert(conn, cid, source_id, task_id, ctype, dumps(params), self.now_iso())
        return cid

    def _superseded_cycle(self, cmd: Mapping[str, Any]) -> bool:
        """Whether a newer cycle command of the same task was queued after ``cmd`` (a late
        acknowledgement of a cycle the scheduler already resumed must not stop the new one)."""
        return repo_commands.newer_cycle_command(self.store, cmd["task_id"], cmd["id"])
