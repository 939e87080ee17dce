"""The target: where a task's cycles are written (a file tree per task or a block store per task),
committed, verified, retained and released; the target's room (``target_full``)."""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Generator, List, Mapping, Optional

from go2cloud_server.errors import AuthFailed, Conflict, InvalidInput, ServerError
from go2cloud_server.repositories import artifacts as repo_artifacts
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories.db import DbError
from go2cloud_server.rsyncd import SessionSpec
from go2cloud_server.service.base import ACTIVE_TASK_STATUSES, OPEN_TASK_STATUSES, TARGET_FULL, Concern, clip
from go2cloud_server.service.target_modes import BlockStore, BlockTarget, FileTarget, TaskTarget, Tree
from go2cloud_server.space import describe, human
from go2cloud_server.store import dumps, loads
from go2cloud_server.verifier import REPORT_FAILED, REPORT_PENDING, REPORT_VERIFIED, GenerationVerifier

if TYPE_CHECKING:
    from go2cloud_server.service import Service

log = logging.getLogger(__name__)

#: free space a target_full task waits for before it resumes by itself: what the agent said the
#: cycle has left, within these bounds (an estimate: compression and holes make it smaller)
RESUME_AT_LEAST = 16 * 1024 * 1024
RESUME_AT_MOST = 1024 * 1024 * 1024
#: an rsync session that failed (exit 11/23) with less free than this (or 5 % of the
#: filesystem) on the target is taken for a full target (rsync removes its partial file)
NEARLY_FULL = 64 * 1024 * 1024

class Targets(Concern):
    """The task targets of the server (file trees, block stores) and their room."""

    def __init__(self, svc: Service) -> None:
        super().__init__(svc)
        #: free bytes on the target when each target_full task stopped (its resume needs more)
        self._full_free: Dict[str, int] = {}
        self._block_stores: Dict[str, BlockStore] = {}
        self._block_lock = threading.Lock()
        #: verifies block generations (sha256, fsck) after their cycle was acknowledged
        self.verifier = GenerationVerifier(self._verify_generation)
        #: the target strategy of each mode (``target_modes``)
        self.file = FileTarget(self)
        self.block = BlockTarget(self)
        self._modes: Dict[str, TaskTarget] = {t.mode: t for t in (self.file, self.block)}

    def for_mode(self, mode: str) -> TaskTarget:
        """The target strategy of ``mode`` (``rules.mode`` checked it)."""
        return self._modes[mode]

    def of(self, task: Mapping[str, Any]) -> TaskTarget:
        """The target strategy of a task, from its mode (a row without a block mode is a file task)."""
        return self._modes.get(task.get("mode") or "", self.file)

    def forget_block_store(self, task_id: str) -> None:
        """Drop the cached block store of a task that ended."""
        with self._block_lock:
            self._block_stores.pop(task_id, None)

    def start_verifier(self) -> int:
        """Start the generation verifier, with every block artifact whose verification is still
        pending (the server stopped or crashed before it finished) or failed queued again (an
        image that cannot be read keeps its final ``failed`` report on disk, which is returned at
        once; an unexpected error gets another try). Returns how many were queued."""
        self.verifier.start()
        rows = repo_artifacts.unverified_generations(self.store)
        again = (REPORT_PENDING, REPORT_FAILED)
        pending = [r for r in rows if (loads(r["report"], None) or {}).get("state") in again]
        for r in pending:
            self.verifier.submit(r["task_id"], int(r["cycle"]), r["disk"])
        if pending:
            log.info("%d block generation(s) not verified yet: queued again", len(pending))
        return len(pending)

    def tree_root(self, task_id: str) -> Path:
        return self.svc.target_dir / "tasks" / task_id / "tree"

    def tree(self, task_id: str) -> Tree:
        return self.svc.tree_factory(self.tree_root(task_id))

    def block_root(self, task_id: str) -> Path:
        return self.svc.target_dir / "tasks" / task_id / "block"

    def block_store(self, task_id: str) -> BlockStore:
        """The block store of a task (one object per task, shared by the receiver and commits),
        told once, when it is made, which disks the task has and how large each may be (see
        ``blockstore.declared_disk_limits``): the receiver's hot path asks the database nothing more."""
        with self._block_lock:
            bs = self._block_stores.get(task_id)
        if bs is not None:
            return bs
        from go2cloud_server.blockstore import declared_disk_limits

        row = repo_tasks.disks_and_inventory(self.store, task_id)
        limits = declared_disk_limits(loads(row["disks"], []) if row else [],
                                      loads(row["inventory"], {}) if row else {})
        with self._block_lock:
            bs = self._block_stores.get(task_id)
            if bs is None:
                bs = self.svc.block_store_factory(self.block_root(task_id))
                bs.declare(limits)
                # a write that meets ENOSPC makes the task target_full at once (before the agent's
                # acknowledgement), with the database's room released first
                with contextlib.suppress(AttributeError):
                    bs.on_full = lambda what, tid=task_id: self.mark_target_full(tid, what)  # type: ignore[attr-defined]
                self._block_stores[task_id] = bs
            return bs

    def block_store_for(self, task_id: str, token: str) -> Optional[BlockStore]:
        """The block receiver's resolver: the store of an active block task whose per-task token is
        ``token`` (constant-time comparison), else None. Never raises for bad input."""
        if not isinstance(task_id, str) or not isinstance(token, str) or not token:
            return None
        try:
            task = repo_tasks.get(self.store, task_id)
        except DbError:
            log.warning("block receiver: cannot look up task %s", task_id, exc_info=True)
            return None
        expected = (task or {}).get("block_token") or ""
        ok = hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8"))
        if task is None or not ok or not expected:
            return None
        if not self.of(task).accepts_block:
            return None
        if task["status"] == "drill_passed" and task["current_cycle"]:
            # the agent's first request came before its 'accepted' acknowledgement of start (sent
            # on another thread): the start is taken
            self.svc.commands.start_taken_for(task_id)
        elif task["status"] not in ACTIVE_TASK_STATUSES:
            return None
        self.check_room(task_id)
        return self.block_store(task_id)

    def target(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        """The target document of a task (where and how its agent writes)."""
        return self.of(task).describe(task)

    def rsync_session_spec(self, task_id: str, password: str, cycle: Any, path: Any,
                           epoch: Optional[str] = None) -> SessionSpec:
        """What an agent's rsync connection may write (``httpapi``, before the upgrade): the
        task's credentials (constant-time), a file task that is syncing, the cycle it is writing,
        one of its paths and the source's current session ``epoch`` (``X-Go2cloud-Epoch``; 409
        ``stale_epoch`` otherwise, see ``Sessions.check_epoch``). Nothing is started or written here."""
        task = None
        if isinstance(task_id, str) and isinstance(password, str) and password:
            task = repo_tasks.get(self.store, task_id)
        expected = ((task or {}).get("rsync_password") or "").encode("utf-8")
        ok = hmac.compare_digest(str(password).encode("utf-8"), expected)
        if task is None or not expected or not ok or not self.of(task).accepts_rsync:
            raise AuthFailed("the rsync credentials are not those of an active file task")
        if task["status"] not in ("syncing", "drill_passed") or not task["current_cycle"]:
            raise Conflict(f"task {task_id} is {task['status']}: it is not writing a cycle now")
        self.check_room(task_id)
        if not isinstance(cycle, int) or cycle != int(task["current_cycle"]):
            raise Conflict(f"task {task_id} is writing cycle {task['current_cycle']}, not {cycle}")
        paths = [str(p) for p in loads(task["paths"], [])]
        if path not in paths:
            raise InvalidInput(f"path {str(path)[:200]!r} is not one of the task's paths")
        self.svc.sessions.check_epoch(task_id, epoch, cycle=cycle)  # 409 stale_epoch: nothing started
        if task["status"] == "drill_passed":  # the agent's data came before its 'accepted'
            self.svc.commands.start_taken_for(task_id)
        return SessionSpec(
            task_id=task_id,
            tree_root=self.tree_root(task_id),
            cycle=cycle,
            path=path,
            link_cycle=int(task["last_committed"]) if task["last_committed"] else None,
            other_paths=tuple(p for p in paths if p != path),
            user=task_id,
            password=task["rsync_password"],
        )

    def release(self, task: Mapping[str, Any]) -> None:
        """End the task's data sessions and discard its unfinished cycle (committed cycles stay)."""
        self.of(task).release(task)

    def commit_cycle(self, task: Mapping[str, Any], number: int) -> List[Dict[str, Any]]:
        """Commit cycle ``number`` on the target; the artifact rows to record (one per disk for a
        block task, one for a file task)."""
        return self.of(task).commit_cycle(task, number)

    def generation_row(self, rec: Mapping[str, Any]) -> Dict[str, Any]:
        """The artifact row of a block generation's report (``state`` pending, verified or failed;
        ``sha256`` null until verified)."""
        report = {k: v for k, v in rec.items() if k not in ("disk", "cycle", "path", "bytes", "sha256")}
        report.setdefault("state", REPORT_VERIFIED if rec.get("sha256") else REPORT_PENDING)
        return {
            "disk": str(rec["disk"]),
            "path": str(rec["path"]),
            "bytes": int(rec.get("bytes") or 0),
            "files": 0,
            "created_at": str(rec.get("created_at") or self.now_iso()),
            "sha256": rec.get("sha256") if report["state"] == REPORT_VERIFIED else None,
            "report": dumps(report),
        }

    @staticmethod
    def refused_row(row: Dict[str, Any], reason: str) -> Dict[str, Any]:
        """An artifact row whose generation is refused verification (written by two sessions)."""
        if not row["disk"]:
            return row
        report = dict(loads(row["report"], None) or {})
        report.update(state=REPORT_FAILED, error=reason, error_code="mixed_sessions")
        return dict(row, sha256=None, report=dumps(report))

    def _verify_generation(self, task_id: str, cycle: int, disk: str) -> Generator[None, None, None]:
        """The verifier's job: verify one generation and fill in its artifact row. A generator of
        steps (``verify_generation_steps``): the verifier takes turns between tasks after each.
        A generation discarded meanwhile (retention, a removed task) is skipped; a row deleted
        meanwhile is not recreated. An unexpected error marks the row ``failed`` (the on-disk
        report stays pending, so the operator can see the error now and a restart tries again)."""
        mixed = self.svc.sessions.mixed_writers(task_id, cycle)
        if mixed:  # written by two sessions: never verified, whatever its checks would say
            with self.store.transaction() as conn:
                row = repo_artifacts.generation(conn, task_id, cycle, disk)
                if row is not None:
                    repo_artifacts.refuse_verification(conn, task_id, cycle, disk,
                                                       self.refused_row(row, mixed)["report"])
            return
        with self._block_lock:  # not cached again for a task that ended meanwhile
            bs = self._block_stores.get(task_id) or self.svc.block_store_factory(self.block_root(task_id))
        try:
            rec = yield from bs.verify_generation_steps(disk, cycle)
        except Exception as exc:  # noqa: BLE001 - shown to the operator in the artifact's report
            log.warning("cannot verify generation %s of disk %s of task %s: %s", cycle, disk, task_id, exc)
            log.debug("verification failure", exc_info=True)
            with self.store.transaction() as conn:
                row = repo_artifacts.generation(conn, task_id, cycle, disk)
                if row is not None:
                    report = dict(loads(row["report"], None) or {})
                    report.update(state=REPORT_FAILED, error=str(exc)[:2000])
                    repo_artifacts.set_report(conn, task_id, cycle, disk, dumps(report))
            return
        if rec is None:
            log.info("generation %s of disk %s of task %s was discarded before it was verified", cycle, disk,
                     task_id)
            return
        row = self.generation_row(rec)
        with self.store.transaction() as conn:
            repo_artifacts.set_verified(conn, task_id, cycle, disk, row["bytes"], row["sha256"],
                                        row["report"])
            # a fold may have made a delta a full image since its row was written
            repo_artifacts.set_path(conn, task_id, cycle, disk, row["path"], row["report"])

    def refresh_generation_paths(self, task_id: str, bs: BlockStore) -> None:
        """After retention: a delta folded into a full image has another path (``gen-N.img``
        instead of ``gen-N.delta``); its artifact row (path, and kind in its report) follows."""
        rows = repo_artifacts.of_task(self.store, task_id)
        with self.store.transaction() as conn:
            for r in rows:
                if not r["disk"]:
                    continue
                rep = bs.generation_report(r["disk"], int(r["cycle"]))
                if rep is None or rep.get("path") == r["path"]:
                    continue
                report = dict(loads(r["report"], None) or {})
                report.update({k: rep.get(k) for k in ("kind", "image", "note")})
                repo_artifacts.set_path(conn, task_id, int(r["cycle"]), r["disk"], str(rep["path"]),
                                        dumps(report))

    def retain(self, task: Mapping[str, Any], keep: int, just_committed: Optional[int] = None) -> List[int]:
        """Remove the task's committed cycles beyond the ``keep`` latest; their numbers."""
        return self.of(task).retain(task, keep, just_committed)

    def apply_retention(self, task_id: str, keep: int) -> None:
        task = repo_tasks.get(self.store, task_id)
        if task is None:
            return
        removed = self.retain(task, keep)
        if removed:
            with self.store.transaction() as conn:
                for n in removed:
                    repo_artifacts.delete_cycle(conn, task_id, n)

    def check_room(self, task_id: str) -> None:
        """Refuse a data write (a block request, a new rsync session) with ``507 target_full``
        while the database's reserve is released and the filesystem has no room to take it back
        (``space.SpaceGuard``): the images must not eat the room the database is living on."""
        from go2cloud_server.blockstore import TargetFull

        why = self.svc.space.refusal() if self.svc.space is not None else None
        if why is not None:
            raise TargetFull(f"task {task_id}: {why}; free space on the target, the sync resumes by itself")

    def _space_reason(self, task: Mapping[str, Any], detail: str) -> str:
        """What the operator reads: what filled, how much is free where, how much more is needed."""
        src = repo_sources.get(self.store, task["source_id"])
        hb = loads(src["heartbeat"], None) if src else None
        progress = hb.get("progress") if isinstance(hb, dict) and hb.get("task_id") == task["id"] else None
        need = ""
        if isinstance(progress, dict):
            total, done = progress.get("bytes_total"), progress.get("bytes_done")
            if isinstance(total, (int, float)) and isinstance(done, (int, float)) and total > done:
                need = (f"; the cycle has about {human(int(total - done))} left to transfer "
                        f"({human(int(done))} of {human(int(total))} done)")
        reserve = ""
        if self.svc.space is not None and self.svc.space.reserve_bytes:
            reserve = (f"; data writes resume once {human(self.svc.space.reserve_bytes)} (the database's "
                       "reserve) plus a margin are free")
        return clip(f"the target's storage is full: {describe(self.tree_root(task['id']))}{need}{reserve} "
                     f"({detail}). Nothing committed is lost: free space on the target (or move it with "
                     "'serve --target-dir' to a larger filesystem); the cycle resumes by itself, or run "
                     "'go2cloud_server migration sync'", 2000)

    def mark_target_full(self, task_id: str, detail: str) -> None:
        """The task's cycle stopped because the target is full: ``target_full`` with the reason
        (shown by ``migration show``, and an event on the source), its cycle kept for the resume
        (``resume_when_room``). The database's reserve is released first, so this write and every
        request after it succeed. Idempotent (the event once per episode)."""
        if self.svc.space is not None:
            self.svc.space.release(f"task {task_id}: {detail}")
        task = repo_tasks.get(self.store, task_id)
        if task is None or task["status"] in ("cancelled", "completed", "failed"):
            return
        reason = self._space_reason(task, detail)
        free = self._free_now(task_id)
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, task_id)
            if task is None or task["status"] not in ("syncing", "pending", "drill_passed", TARGET_FULL):
                return
            first = task["status"] != TARGET_FULL
            self.svc.tasks.set_task(conn, task_id, status=TARGET_FULL, error_code=TARGET_FULL,
                                    error_message=reason)
            if first:  # in this transaction: the connection goes back to the pool after it
                self.event(conn, task["source_id"], "error", TARGET_FULL, f"task {task_id}: {reason}")
        if free is not None:
            self._full_free[task_id] = free
        if first:
            log.warning("task %s: %s", task_id, reason)

    def rsync_session_ended(self, task_id: str, rc: int) -> None:
        """The exit status of an rsync session (``httpapi``, after the daemon ended): 11 (file
        I/O) or 23 (some files not transferred) on a target filesystem with less than
        :data:`NEARLY_FULL` free is a full target, recorded at once; the agent's acknowledgement
        (``target_full`` from rsync's "No space left on device", or another error) follows."""
        if rc not in (11, 23):
            return
        try:
            from go2cloud_server.space import usage

            fs = usage(self.tree_root(task_id))
        except OSError:
            return
        if fs.free < max(NEARLY_FULL, fs.total // 20):
            self.mark_target_full(task_id, f"the rsync session ended with exit {rc} on a nearly full target")

    def _free_now(self, task_id: str) -> Optional[int]:
        try:
            from go2cloud_server.space import usage

            return usage(self.tree_root(task_id)).free
        except OSError:
            return None

    def resume_when_room(self) -> List[str]:
        """The scheduler's check: each ``target_full`` task whose filesystem has room again (the
        database's reserve back in place, and more free than when the cycle stopped, by at least
        the cycle's remaining bytes as the agent last reported them, else 16 MiB) gets its cycle
        queued again. Returns the ids resumed."""
        resumed: List[str] = []
        rows = repo_tasks.with_status(self.store, (TARGET_FULL,))
        if not rows or (self.svc.space is not None and self.svc.space.refusal() is not None):
            return resumed
        for task in rows:
            free = self._free_now(task["id"])
            if free is None:
                continue
            src = repo_sources.get(self.store, task["source_id"])
            hb = loads(src["heartbeat"], None) if src else None
            progress = hb.get("progress") if isinstance(hb, dict) and hb.get("task_id") == task["id"] else {}
            left = 0
            if isinstance(progress, dict):
                total, done = progress.get("bytes_total"), progress.get("bytes_done")
                if isinstance(total, (int, float)) and isinstance(done, (int, float)):
                    left = max(0, int(total - done))
            need = min(left, RESUME_AT_MOST) if left else RESUME_AT_LEAST
            # (not kept across a restart: then the free space alone decides)
            before = self._full_free.get(task["id"], 0)
            if free - before < need:
                continue
            try:
                self.svc.tasks.task_action(task["id"], "sync")
            except ServerError as exc:
                log.info("task %s: not resumed after the full target: %s", task["id"], exc)
                continue
            where = describe(self.tree_root(task["id"]))
            with self.store.transaction() as conn:
                self.event(conn, task["source_id"], "info", "target_space_returned",
                            f"task {task['id']}: the target has room again ({where}): the cycle resumes")
            log.info("task %s: the target has room again (%s free): cycle queued again", task["id"],
                     human(free))
            resumed.append(task["id"])
        return resumed

    def restore_targets(self) -> int:
        """After a restart: the running cycle of every open task is ready again (the directory of a
        file task's cycle exists again; nothing for a block task). One task whose state on disk is
        unusable fails with the reason; the others and the server go on (a source can write into
        its tree, so nothing found there may stop the server)."""
        rows = repo_tasks.with_status(self.store, OPEN_TASK_STATUSES)
        for task in rows:
            if not task["current_cycle"]:
                continue
            try:
                self.of(task).restore_cycle(task["id"], int(task["current_cycle"]))
            except Exception as exc:  # noqa: BLE001 - that task's error, never the server's
                what = f"its cycle {task['current_cycle']} cannot be prepared"
                self.svc.tasks.fail_at_start(task["id"], what, exc)
        return len(rows)
