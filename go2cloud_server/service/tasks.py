"""Migration tasks: start, the operator's actions (modify, pause, resume, sync, complete, cancel),
their views, automatic retries of transient failures."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from go2cloud_server import rules
from go2cloud_server.autoretry import AUTO_RETRY_EVENT, TRANSIENT_CODES
from go2cloud_server.clock import iso, parse_iso
from go2cloud_server.errors import Conflict, InvalidInput, NotFound, NothingStarted, ServerError
from go2cloud_server.repositories import artifacts as repo_artifacts
from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import drills as repo_drills
from go2cloud_server.repositories import events as repo_events
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories import workgroups as repo_workgroups
from go2cloud_server.repositories.db import Conn
from go2cloud_server.service.base import OPEN_TASK_STATUSES, TARGET_FULL, Concern, clip, rand_id
from go2cloud_server.store import dumps, loads
from go2cloud_server.verifier import REPORT_PENDING, REPORT_VERIFIED

log = logging.getLogger(__name__)

ACTIONS = ("modify", "pause", "resume", "sync", "complete", "cancel", "drill")
#: the task options a ``modify`` forwards to the agent (they apply without restarting the transfer)
_AGENT_OPTIONS = ("bandwidth_mbps", "bandwidth_schedule", "compression", "checksum")

def cycle_spec(number: int, last_committed: Optional[int]) -> Dict[str, Any]:
    return {
        "number": number,
        "dest": f"{number:06d}",
        "link_dest": f"{last_committed:06d}" if last_committed else None,
    }


class Tasks(Concern):
    """Migration tasks of sources and what the operator does with them."""

    def set_task(self, conn: Conn, task_id: str, **changes: Any) -> None:
        changes["updated_at"] = self.now_iso()
        if "status" in changes:  # the status history: [{"status", "at"}], a change appended once
            row = repo_tasks.status_and_history(conn, task_id)
            if row is not None and row["status"] != changes["status"]:
                history = loads(row["history"], [])
                history.append({"status": changes["status"], "at": changes["updated_at"]})
                changes["history"] = dumps(history[-100:])
        repo_tasks.update(conn, task_id, changes)

    def artifacts(self, task_id: str) -> List[Dict[str, Any]]:
        rows = repo_artifacts.of_task(self.store, task_id)
        out = []
        for r in rows:
            report = loads(r.pop("report"), None)
            r["disk"] = r["disk"] or None
            if r["disk"] is None:
                r.pop("sha256")
            else:
                r["report"] = report if isinstance(report, dict) else {}
                # rows recorded before verification ran in the background were verified at once
                r["report"].setdefault("state", REPORT_VERIFIED if r["sha256"] else REPORT_PENDING)
            out.append(r)
        return out

    def view(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        src = repo_sources.get(self.store, task["source_id"])
        hb = loads(src["heartbeat"], None) if src else None
        progress = hb.get("progress") if isinstance(hb, dict) and hb.get("task_id") == task["id"] else None
        return {
            "task_id": task["id"],
            "source_id": task["source_id"],
            "workgroup_id": task["workgroup_id"],
            "name": task["name"],
            "description": task["description"],
            "mode": task["mode"],
            "paths": loads(task["paths"], []),
            "disks": loads(task["disks"], []),
            "snapshot": task["snapshot"],
            "bandwidth_mbps": task["bandwidth_mbps"],
            "bandwidth_schedule": task["bandwidth_schedule"],
            "bandwidth_now": self._bandwidth_now(task, hb),
            "compression": task["compression"],
            "checksum": bool(task["checksum"]),
            "sync_every_s": task["sync_every_s"],
            "keep_images": task["keep_images"],
            "status": task["status"],
            "cycle": task["current_cycle"],
            "last_committed_cycle": task["last_committed"],
            "finalizing": bool(task["finalizing"]),
            "error": (
                {"code": task["error_code"], "message": task["error_message"]}
                if task["error_code"] or task["error_message"]
                else None
            ),
            "auto_retry": self._auto_retry_view(task),
            "created_at": task["created_at"],
            "updated_at": task["updated_at"],
            "finished_at": task["finished_at"],
            "progress": progress,
            "artifacts": self.artifacts(task["id"]),
            "drill_id": task["drill_command"],
            "drill_override": loads(task["drill_override"], None),
            "history": loads(task["history"], []),
            "snapshot_choice": task_snapshot_choice(task),
        }

    @staticmethod
    def _bandwidth_now(task: Mapping[str, Any], hb: Any) -> Optional[Dict[str, Any]]:
        """The limit in force now, as the source's agent evaluated its windows in its local time
        (its last heartbeat); without a schedule the task's limit; None when unknown."""
        if isinstance(hb, dict) and hb.get("task_id") == task["id"] and isinstance(hb.get("bandwidth"), dict):
            return dict(hb["bandwidth"])
        if not task["bandwidth_schedule"]:
            return {"limit_mbps": task["bandwidth_mbps"], "schedule": None}
        return None

    def _start_params(self, body: Mapping[str, Any]) -> Dict[str, Any]:
        mode = rules.mode(body.get("mode"))
        target = self.svc.targets.for_mode(mode)
        target.check_start(body)
        return {
            "mode": mode,
            "disks": rules.disks(body.get("disks")),
            "snapshot": target.snapshot(body),
            "name": rules.text(body.get("name"), "name", rules.TASK_NAME_LEN[1]) or None,
            "description": rules.text(body.get("description"), "description"),
            "paths": rules.paths(body.get("paths")),
            "bandwidth_mbps": rules.integer(
                body.get("bandwidth_mbps"), "bandwidth_mbps", rules.BANDWIDTH_MBPS, 0
            ),
            "bandwidth_schedule": rules.bandwidth_schedule(body.get("bandwidth_schedule")),
            "compression": rules.integer(
                body.get("compression"), "compression", rules.COMPRESSION, rules.COMPRESSION_DEFAULT
            ),
            "checksum": rules.boolean(body.get("checksum"), "checksum"),
            "sync_every_s": rules.sync_every(body.get("sync_every_s")),
            "keep_images": rules.integer(
                body.get("keep_images"), "keep_images", rules.KEEP_IMAGES, rules.KEEP_IMAGES_DEFAULT
            ),
            "drill": True if body.get("drill") is None else rules.boolean(body.get("drill"), "drill"),
            "by": rules.text(body.get("by"), "by", 128) or None,
        }

    def start_migration(
        self, body: Any, *, workgroup: Optional[str] = None, source: Optional[str] = None
    ) -> Dict[str, Any]:
        params = self._start_params(rules.require_object(body if body is not None else {}))
        if workgroup is not None:
            wg = self.svc.workgroups.get(None, workgroup)
            source_ids = repo_sources.ids_in_workgroup(self.store, wg["id"])
        else:
            source_ids = [self.svc.sources.get(None, source)["id"]]
        out: Dict[str, List[Dict[str, Any]]] = {"started": [], "skipped": [], "not_migratable": []}
        for sid in source_ids:
            kind, entry = self._start_one(sid, params)
            out[kind].append(entry)
        if source is not None and not out["started"]:
            entry = (out["skipped"] + out["not_migratable"])[0]
            raise NothingStarted(f"cannot start a migration of {entry['source_id']}: {entry['reason']}")
        if out["started"]:
            self.svc.commands.notify()
        return out

    def _start_one(self, source_id: str, params: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        task_id = rand_id("t-", 16)
        target = self.svc.targets.for_mode(params["mode"])
        with self.store.transaction() as conn:
            src = self.svc.sources.get(conn, source_id)
            if src["state"] != "active":
                return "not_migratable", {
                    "source_id": source_id,
                    "reason": f"replaced by {src['replaced_by']}",
                }
            if not src["workgroup_id"]:
                return "not_migratable", {
                    "source_id": source_id,
                    "reason": "not associated with a workgroup",
                }
            if self.svc.sources.is_offline(src):
                return "not_migratable", {
                    "source_id": source_id,
                    "reason": f"offline (last heartbeat {src['last_seen_at'] or 'never'})",
                }
            active = self.svc.sources.active_task(conn, source_id)
            if active is not None:
                return "skipped", {
                    "source_id": source_id,
                    "reason": f"already has migration task {active['id']} ({active['status']})",
                }
            wg = repo_workgroups.brief(conn, src["workgroup_id"])
            fields = target.new_task(params, loads(src["inventory"], {}))
            paths, disks = fields["paths"], fields["disks"]
            name = (
                params["name"]
                or f"{wg['name'] if wg else 'migration'}-{src['hostname'] or source_id}"[:128]
            )
            now = self.now_iso()
            status = "drilling" if params["drill"] else "syncing"
            repo_tasks.insert(conn, {
                "id": task_id,
                "source_id": source_id,
                "workgroup_id": src["workgroup_id"],
                "name": name,
                "description": params["description"],
                "mode": params["mode"],
                "paths": dumps(paths),
                "disks": dumps(disks),
                "snapshot": params["snapshot"],
                "block_token": fields["block_token"],
                "bandwidth_mbps": params["bandwidth_mbps"],
                "compression": params["compression"],
                "checksum": int(params["checksum"]),
                "sync_every_s": params["sync_every_s"],
                "keep_images": params["keep_images"],
                "status": status,
                "rsync_password": fields["rsync_password"],
                "created_at": now,
                "updated_at": now,
                "history": dumps([{"status": status, "at": now, **snapshot_choice(params, now)}]),
                "bandwidth_schedule": params["bandwidth_schedule"],
            })
            task = repo_tasks.get(conn, task_id)
            assert task is not None
            target.prepare_cycle(task_id, 1)
            if params["drill"]:
                cid = self.svc.drills.queue_drill(conn, task)
            else:
                cid = self.queue_start(conn, task)
        log.info(
            "task %s started for source %s (%s %s)",
            task_id,
            source_id,
            "disks" if disks else "paths",
            ", ".join([d["path"] for d in disks] or paths),
        )
        return "started", {"source_id": source_id, "task_id": task_id, "command_id": cid}

    def scope_params(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        """What a task migrates, as the ``start`` and ``drill`` commands carry it."""
        params: Dict[str, Any] = {"task_id": task["id"], "mode": task["mode"]}
        params.update(self.svc.targets.of(task).scope(task))
        return params

    def _start_params_of(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        """The ``start`` command's parameters, from the task row (its first cycle)."""
        cmd_params = self.scope_params(task)
        cmd_params.update(
            {
                "bandwidth_mbps": task["bandwidth_mbps"],
                "bandwidth_schedule": task["bandwidth_schedule"],
                "compression": task["compression"],
                "checksum": bool(task["checksum"]),
                "target": self.svc.targets.target(task),
                "cycle": cycle_spec(int(task["current_cycle"] or 1), task["last_committed"]),
            }
        )
        return cmd_params

    def queue_start(self, conn: Conn, task: Mapping[str, Any]) -> str:
        return self.svc.commands.queue(conn, task["source_id"], task["id"], "start",
                                       self._start_params_of(task))

    def _action_params(self, action: str, body: Mapping[str, Any]) -> Dict[str, Any]:
        if action == "complete":
            return {"final_sync": rules.boolean(body.get("final_sync"), "final_sync")}
        if action == "drill":
            by = body.get("by")
            if by is not None and (not isinstance(by, str) or len(by) > 128):
                raise InvalidInput("by: must be a string of at most 128 characters (who overrides)")
            return {"override": rules.boolean(body.get("override"), "override"), "by": by}
        if action != "modify":
            return {}
        out: Dict[str, Any] = {}
        if "name" in body:
            out["name"] = rules.text(body["name"], "name", rules.TASK_NAME_LEN[1], rules.TASK_NAME_LEN[0])
        if "description" in body:
            out["description"] = rules.text(body["description"], "description")
        if body.get("bandwidth_mbps") is not None:
            out["bandwidth_mbps"] = rules.integer(
                body["bandwidth_mbps"], "bandwidth_mbps", rules.BANDWIDTH_MBPS
            )
        if "bandwidth_schedule" in body:  # null or "" removes the schedule
            out["bandwidth_schedule"] = rules.bandwidth_schedule(body["bandwidth_schedule"])
        if body.get("compression") is not None:
            out["compression"] = rules.integer(body["compression"], "compression", rules.COMPRESSION)
        if body.get("checksum") is not None:
            out["checksum"] = rules.boolean(body["checksum"], "checksum")
        if "sync_every_s" in body:
            out["sync_every_s"] = rules.sync_every(body["sync_every_s"])
        if body.get("keep_images") is not None:
            out["keep_images"] = rules.integer(body["keep_images"], "keep_images", rules.KEEP_IMAGES)
        if not out:
            raise InvalidInput(
                "modify: give at least one of name, description, bandwidth_mbps, bandwidth_schedule, "
                "compression, "
                "checksum, sync_every_s, keep_images"
            )
        return out

    def migration_action(
        self, action: str, body: Any = None, *, workgroup: Optional[str] = None, source: Optional[str] = None
    ) -> Dict[str, Any]:
        if action not in ACTIONS:
            raise NotFound(f"no migration action {action!r} (one of {', '.join(ACTIONS)})")
        params = self._action_params(action, rules.require_object(body if body is not None else {}))
        if workgroup is not None:
            wg = self.svc.workgroups.get(None, workgroup)
            source_ids = repo_sources.ids_in_workgroup(self.store, wg["id"])
        else:
            source_ids = [self.svc.sources.get(None, source)["id"]]
        out: Dict[str, List[Dict[str, Any]]] = {"affected": [], "skipped": []}
        for sid in source_ids:
            task = self.svc.sources.active_task(None, sid)
            if task is None:
                out["skipped"].append({"source_id": sid, "reason": "no active migration task"})
                continue
            try:
                cid = self.task_action(task["id"], action, params)
            except Conflict as exc:
                out["skipped"].append({"source_id": sid, "task_id": task["id"], "reason": exc.message})
                continue
            out["affected"].append({"source_id": sid, "task_id": task["id"], "command_id": cid})
        if source is not None and out["skipped"]:
            raise Conflict(f"{action}: {out['skipped'][0]['reason']}")
        return out

    def task_action(
        self, task_id: str, action: str, params: Optional[Mapping[str, Any]] = None
    ) -> Optional[str]:
        """Apply one action to one task; raises Conflict when its status does not allow it."""
        params = params or {}
        after: List[Callable[[], None]] = []
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, task_id)
            if task is None:
                raise NotFound(f"no task {task_id}")
            handler = self.svc.drills.do_drill if action == "drill" else getattr(self, f"_do_{action}")
            cid = handler(conn, task, params, after)
        for fn in after:
            fn()
        if cid:
            self.svc.commands.notify()
            log.info("task %s: %s (command %s)", task_id, action, cid)
        return cid

    @staticmethod
    def need(task: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
        if task["status"] not in allowed:
            raise Conflict(f"task {task['id']} is {task['status']}: cannot {what}")

    def _do_modify(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self.need(task, OPEN_TASK_STATUSES, "modify it")
        changes = dict(params)
        if "checksum" in changes:
            changes["checksum"] = int(changes["checksum"])
        self.set_task(conn, task["id"], **changes)
        agent_fields = {k: params[k] for k in _AGENT_OPTIONS if k in params}
        if "keep_images" in params:
            keep, tid = int(params["keep_images"]), task["id"]
            after.append(lambda: self.svc.targets.apply_retention(tid, keep))
        if not agent_fields or task["status"] in ("drilling", "drill_abnormal"):
            return None  # before the start: the start command is built from the task then
        return self.svc.commands.queue(
            conn, task["source_id"], task["id"], "modify", {"task_id": task["id"], **agent_fields}
        )

    def _do_pause(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self.need(task, ("syncing", "pending"), "pause it")
        if task["finalizing"] and not task["current_cycle"]:
            raise Conflict(f"task {task['id']} is completing: cannot pause it")
        self.set_task(conn, task["id"], status="paused", paused_from=task["status"])
        return self._command(conn, task, "pause")

    def _do_resume(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self.need(task, ("paused",), "resume it (only a paused task can be resumed)")
        status = "syncing" if task["current_cycle"] else "pending"
        self.set_task(conn, task["id"], status=status, paused_from=None)
        return self._command(conn, task, "resume")

    def _next_cycle(self, conn: Conn, task: Mapping[str, Any]) -> Dict[str, Any]:
        number = task["current_cycle"] or (task["last_committed"] or 0) + 1
        self.svc.targets.of(task).prepare_cycle(task["id"], number)
        self.set_task(conn, task["id"], current_cycle=number)
        return cycle_spec(number, task["last_committed"])

    def _command(self, conn: Conn, task: Mapping[str, Any], ctype: str, **params: Any) -> str:
        """Queue a ``ctype`` command for the task's agent: its parameters are the task id and
        ``params``."""
        return self.svc.commands.queue(conn, task["source_id"], task["id"], ctype,
                                       {"task_id": task["id"], **params})

    def _do_sync(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        if task["status"] == "syncing":
            raise Conflict(f"task {task['id']} is already syncing: wait for the cycle to finish")
        self.need(task, ("pending", "failed", TARGET_FULL), "sync it")
        if task["status"] == TARGET_FULL and task["finalizing"]:
            # the final sync stopped on a full target: it runs again (the agent's finalize)
            cycle = self._next_cycle(conn, task)
            self.set_task(conn, task["id"], status="syncing", error_code=None, error_message=None)
            return self._command(conn, task, "finalize", cycle=cycle)
        if task["finalizing"]:
            raise Conflict(f"task {task['id']} is completing: no more syncs")
        cycle = self._next_cycle(conn, task)
        self.set_task(conn, task["id"], status="syncing", error_code=None, error_message=None)
        return self._command(conn, task, "sync", cycle=cycle)

    def _do_complete(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        if task["status"] == "syncing":
            raise Conflict(f"task {task['id']} is syncing: wait until it is pending, then complete")
        self.need(task, ("pending",), "complete it (it must be pending)")
        if task["finalizing"]:
            raise Conflict(f"task {task['id']} is already completing")
        cycle = None
        if params.get("final_sync"):
            cycle = self._next_cycle(conn, task)
            self.set_task(conn, task["id"], status="syncing", finalizing=1)
        else:
            self.set_task(conn, task["id"], finalizing=1)
        return self._command(conn, task, "finalize", cycle=cycle)

    def _do_cancel(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self.need(task, OPEN_TASK_STATUSES, "cancel it")
        repo_drills.cancel_running(conn, task["id"], self.now_iso())
        self.set_task(
            conn, task["id"], status="cancelled", finalizing=0, current_cycle=None, finished_at=self.now_iso()
        )
        repo_commands.supersede_queued(conn, task["id"], self.now_iso())
        snapshot = dict(task)
        after.append(lambda: self.svc.targets.release(snapshot))
        return self._command(conn, task, "abort")

    def workgroup_migration(self, ref: str) -> Dict[str, Any]:
        wg = self.svc.workgroups.get(None, ref)
        tasks: List[Dict[str, Any]] = []
        counts: Dict[str, int] = {}
        for src in repo_sources.list_all(self.store, wg["id"]):
            task = self.svc.sources.latest_task(None, src["id"])
            status = self.svc.sources.source_status(src, task)
            counts[status] = counts.get(status, 0) + 1
            if task is not None:
                view = self.view(task)
                view["source_status"] = status
                view["hostname"] = src["hostname"]
                tasks.append(view)
        return {
            "workgroup": {"id": wg["id"], "name": wg["name"]},
            "status": self.svc.workgroups.status(wg["id"]),
            "source_status_counts": counts,
            "tasks": tasks,
        }

    def source_migration(self, ref: str) -> Dict[str, Any]:
        src = self.svc.sources.get(None, ref)
        rows = repo_tasks.all_of_source(self.store, src["id"])
        return {
            "source_id": src["id"],
            "hostname": src["hostname"],
            "source_status": self.svc.sources.source_status(src, rows[0] if rows else None),
            "status": rows[0]["status"] if rows else "not_started",
            "tasks": [self.view(t) for t in rows],
        }

    def task_artifacts(self, task_id: str) -> Dict[str, Any]:
        if not repo_tasks.exists(self.store, task_id):
            raise NotFound(f"no task {task_id!r}: see 'go2cloud_server migration show'")
        return {"task_id": task_id, "artifacts": self.artifacts(task_id)}

    def _auto_retries_today(self, task: Mapping[str, Any]) -> int:
        return repo_events.count_since(self.store, task["source_id"], AUTO_RETRY_EVENT,
                                       iso(self.clock.now() - 86400), f"task {task['id']}:")

    def _auto_retry_view(self, task: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """``migration show``: the automatic retries of a task whose cycle failed for a transient
        cause (None for any other task)."""
        if task["status"] != "failed" or task["error_code"] not in TRANSIENT_CODES:
            return None
        done = self._auto_retries_today(task)
        due = self.svc.auto_retry.due_at(parse_iso(task["updated_at"]), done)
        return {"retries_last_24h": done, "max_per_24h": self.svc.auto_retry.per_day,
                "next_at": iso(due) if due is not None else None}

    def retry_transient_failures(self) -> List[str]:
        """The scheduler's check: each task whose cycle failed for a transient cause (network,
        control plane or target away: ``autoretry.TRANSIENT_CODES``) gets a ``sync`` queued once
        its backoff ran out, at most ``per_day`` times in 24 hours; each one is an event, and the
        last allowed one says that the next failure needs ``migration sync``."""
        queued: List[str] = []
        if self.svc.auto_retry.per_day <= 0:
            return queued
        rows = repo_tasks.failed_with(self.store, TRANSIENT_CODES)
        now = self.clock.now()
        for task in rows:
            done = self._auto_retries_today(task)
            due = self.svc.auto_retry.due_at(parse_iso(task["updated_at"]), done)
            if due is None or now < due:
                continue
            try:
                self.task_action(task["id"], "sync")
            except ServerError as exc:
                log.info("task %s: not retried automatically: %s", task["id"], exc)
                continue
            n = done + 1
            last = " (the last one today: if it fails again, run migration sync once the cause is fixed)" \
                if n >= self.svc.auto_retry.per_day else ""
            with self.store.transaction() as conn:
                self.event(conn, task["source_id"], "warning", AUTO_RETRY_EVENT,
                            f"task {task['id']}: its cycle failed ({task['error_code']}: "
                            f"{(task['error_message'] or '')[:300]}); sync queued again automatically, "
                            f"retry {n} of {self.svc.auto_retry.per_day} in 24 h{last}")
            log.warning("task %s: cycle failed with %s; sync queued again automatically (retry %d of %d "
                        "in 24 h)", task["id"], task["error_code"], n, self.svc.auto_retry.per_day)
            queued.append(task["id"])
        return queued

    def fail_at_start(self, task_id: Optional[str], what: str, exc: BaseException) -> None:
        """A task whose stored state broke a startup step: ``failed`` with the reason (shown by
        ``migration show``); the server starts all the same."""
        log.warning("task %s: %s: %s", task_id, what, exc)
        log.debug("startup failure of task %s", task_id, exc_info=True)
        if not task_id:
            return
        try:
            with self.store.transaction() as conn:
                task = repo_tasks.get(conn, task_id)
                if task is None or task["status"] in ("completed", "cancelled"):
                    return
                self.set_task(
                    conn, task_id, status="failed", finalizing=0, error_code="target_state_invalid",
                    error_message=clip(f"at server start, {what}: {exc}; run 'go2cloud_server migration "
                                        "sync' to retry the cycle, or cancel the task", 2000),
                )
        except Exception:  # noqa: BLE001 - the server starts even if this cannot be recorded
            log.exception("cannot record the startup failure of task %s", task_id)

    def auto_sync_candidates(self) -> List[Dict[str, Any]]:
        """Pending tasks with an automatic sync interval: id, interval and last committed cycle."""
        return repo_tasks.auto_sync_candidates(self.store)


def snapshot_choice(params: Mapping[str, Any], now: str) -> Dict[str, Any]:
    """``{"snapshot_choice": {...}}`` for the first history entry of a block task started with an
    explicit backend that is not point in time (fsfreeze, live): the operator's informed choice,
    who and when; ``{}`` otherwise."""
    backend = params.get("snapshot")
    if params.get("mode") != "block" or backend not in rules.NON_PIT_SNAPSHOTS:
        return {}
    return {"snapshot_choice": {"backend": backend, "by": params.get("by") or "operator (API)", "at": now,
                                "cost": rules.NON_PIT_SNAPSHOTS[backend]}}


def task_snapshot_choice(task: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The explicit non-point-in-time snapshot choice recorded in a task's history, or None."""
    for entry in loads(task["history"], []) if task.get("history") else []:
        if isinstance(entry, Mapping) and isinstance(entry.get("snapshot_choice"), Mapping):
            return dict(entry["snapshot_choice"])
    return None
