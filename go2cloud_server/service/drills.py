"""The drill: the read-only checks an agent runs before the first sync, its report and the
operator's re-run or override."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional

from go2cloud_server.errors import Conflict, NotFound
from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import drills as repo_drills
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories.db import Conn
from go2cloud_server.service.base import Concern, clip
from go2cloud_server.service.tasks import task_snapshot_choice
from go2cloud_server.store import dumps, loads

log = logging.getLogger(__name__)

#: interrupted drills (the agent restarted while one ran) queued again per task before the task
#: stops at ``drill_abnormal`` like any drill that could not run
DRILL_REQUEUES = 2
DRILL_SEVERITIES = ("critical", "warning", "info")
MAX_DRILL_ITEMS = 200


class Drills(Concern):
    """Drills of tasks."""

    def _drill_params(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        """The ``drill`` command's parameters: what will be migrated and where the target is (its
        address only: a drill needs no password or token)."""
        params = self.svc.tasks.scope_params(task)
        target = self.svc.targets.target(task)
        params["target"] = {k: v for k, v in target.items() if k not in ("password", "token", "user")}
        return params

    def queue_drill(self, conn: Conn, task: Mapping[str, Any]) -> str:
        cid = self.svc.commands.queue(conn, task["source_id"], task["id"], "drill", self._drill_params(task))
        repo_drills.insert(conn, cid, task["source_id"], task["id"], self.now_iso())
        self.svc.tasks.set_task(conn, task["id"], status="drilling", drill_command=cid)
        return cid

    def on_final(
        self,
        cmd: Mapping[str, Any],
        status: str,
        error_code: Optional[str],
        message: Optional[str],
        result: Mapping[str, Any],
    ) -> None:
        """A drill's report arrived: record it; if it is the task's current drill, go on
        (``drill_passed`` + start) or stop (``drill_abnormal``). A drill the agent's restart
        interrupted (``interrupted``: it never finished, nothing was found) is queued again, up to
        :data:`DRILL_REQUEUES` times per task: the drill only reads, so running it again is safe."""
        src = repo_sources.get(self.store, cmd["source_id"])
        version = (src or {}).get("agent_version") or "unknown"
        report = drill_report(status, message, result, agent_version=version)
        passed = report["passed"]
        if status == "failed" and error_code == "interrupted" and self._requeue_drill(cmd, report):
            return
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, cmd["task_id"])
            if task is not None:
                report = with_snapshot_choice(report, task_snapshot_choice(task))
            repo_drills.finish(conn, cmd["id"], "passed" if passed else "abnormal", dumps(report),
                               self.now_iso())
            if task is None or task["status"] != "drilling" or task["drill_command"] != cmd["id"]:
                return
            if passed:
                self.svc.tasks.set_task(conn, task["id"], status="drill_passed", error_code=None,
                                        error_message=None)
                self.svc.tasks.queue_start(conn, task)
            else:
                first = next(i for i in report["items"] if i["severity"] == "critical")
                self.svc.tasks.set_task(
                    conn,
                    task["id"],
                    status="drill_abnormal",
                    error_code="drill_abnormal",
                    error_message=f"drill: {report['summary']['critical']} critical item(s), "
                    f"first: {first['finding']}"[:2000],
                )
        log.info("drill %s of task %s: %s", cmd["id"], cmd["task_id"], "passed" if passed else "abnormal")
        if passed:
            self.svc.commands.notify()

    def _requeue_drill(self, cmd: Mapping[str, Any], report: Mapping[str, Any]) -> bool:
        """Record ``cmd``'s drill as interrupted and queue it again if it is still the task's
        current drill and the task has re-run fewer than :data:`DRILL_REQUEUES` interrupted
        drills; False (nothing done) otherwise."""
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, cmd["task_id"])
            if task is None or task["status"] != "drilling" or task["drill_command"] != cmd["id"]:
                return False
            if repo_drills.count_interrupted(conn, task["id"]) >= DRILL_REQUEUES:
                return False
            repo_drills.finish(conn, cmd["id"], "interrupted", dumps(report), self.now_iso())
            again = self.queue_drill(conn, task)
        log.warning(
            "drill %s of task %s was interrupted by the agent's restart: running it again (%s)",
            cmd["id"], cmd["task_id"], again,
        )
        self.svc.commands.notify()
        return True

    def do_drill(
        self,
        conn: Conn,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        """Re-run the drill (``drill_abnormal``), or with ``override`` start the task despite its
        critical items (``drill_abnormal``, or ``drilling`` when the report never comes)."""
        if params.get("override"):
            self.svc.tasks.need(
                task, ("drill_abnormal", "drilling"), "override its drill (only before the first sync)"
            )
            repo_commands.supersede_if_queued(conn, task["drill_command"], self.now_iso())
            override = {
                "by": params.get("by") or "operator",
                "at": self.now_iso(),
                "drill": task["drill_command"],
            }
            self.svc.tasks.set_task(
                conn,
                task["id"],
                status="drill_passed",
                drill_override=dumps(override),
                error_code=None,
                error_message=None,
            )
            log.warning("task %s: drill overridden by %s", task["id"], override["by"])
            return self.svc.tasks.queue_start(conn, task)
        if task["status"] == "drilling":
            raise Conflict(f"the drill of task {task['id']} is running: wait for its report")
        self.svc.tasks.need(task, ("drill_abnormal",),
                            "re-run its drill (the drill runs before the first sync)")
        return self.queue_drill(conn, task)

    def source_drill(self, ref: str) -> Dict[str, Any]:
        """The latest drill of a source: status, report, and the task's override."""
        src = self.svc.sources.get(None, ref)
        row = repo_drills.latest_of_source(self.store, src["id"])
        if row is None:
            raise NotFound(f"source {src['id']} has no drill yet: start a migration (the drill runs first)")
        task = repo_tasks.get(self.store, row["task_id"])
        return {
            "source_id": src["id"],
            "hostname": src["hostname"],
            "task_id": row["task_id"],
            "drill_id": row["id"],
            "status": row["status"],
            "task_status": task["status"] if task else None,
            "requested_at": row["created_at"],
            "finished_at": row["finished_at"],
            "override": loads(task["drill_override"], None) if task else None,
            "report": loads(row["report"], None),
        }


def with_snapshot_choice(report: Dict[str, Any], choice: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The drill report with the operator's explicit snapshot choice (who, when, cost) as a field
    and an info item."""
    if not choice:
        return report
    report = dict(report)
    report["snapshot_choice"] = dict(choice)
    item = {
        "check": "snapshot_choice",
        "severity": "info",
        "finding": f"snapshot backend {choice.get('backend')} chosen explicitly by {choice.get('by')} at "
                   f"{choice.get('at')} (not point in time for the whole pass: {choice.get('cost')})",
        "fix": "",
        "data": dict(choice),
    }
    report["items"] = list(report.get("items") or []) + [item]
    summary = dict(report.get("summary") or {})
    if "info" in summary:
        summary["info"] = int(summary["info"]) + 1
    report["summary"] = summary
    return report


def drill_report(
    status: str, message: Optional[str], result: Mapping[str, Any], *, agent_version: str = "unknown"
) -> Dict[str, Any]:
    """The stored report of a finished ``drill`` command, checked field by field (the agent's
    report is input like any other). ``passed`` is recomputed here: no critical item.
    ``unsupported`` (an older agent) passes with a warning saying the drill did not run; a failed
    or rejected drill is one critical item saying it could not run."""
    items: List[Dict[str, Any]] = []
    raw = result.get("drill") if status == "succeeded" else None
    doc: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    if status == "succeeded":
        for item in (doc.get("items") or [])[:MAX_DRILL_ITEMS] if isinstance(doc.get("items"), list) else []:
            if not isinstance(item, Mapping):
                continue
            severity = item.get("severity") if item.get("severity") in DRILL_SEVERITIES else "warning"
            data = item.get("data") if isinstance(item.get("data"), Mapping) else {}
            items.append(
                {
                    "check": clip(item.get("check"), 64) or "unknown",
                    "severity": severity,
                    "finding": clip(item.get("finding"), 2000),
                    "fix": clip(item.get("fix"), 2000),
                    "data": data if len(dumps(data)) <= 4096 else {},
                }
            )
        if not items:
            items.append(
                {
                    "check": "drill",
                    "severity": "critical",
                    "finding": "the agent sent a drill report without items",
                    "fix": "re-run the drill; if it happens again, upgrade go2cloud_client",
                    "data": {},
                }
            )
    elif status == "unsupported":
        items.append(
            {
                "check": "drill_not_run",
                "severity": "warning",
                "finding": f"the agent (go2cloud_client {agent_version}) does not support the drill: "
                "no check ran",
                "fix": "upgrade go2cloud_client on the source and run 'go2cloud_client check' there",
                "data": {},
            }
        )
    else:
        items.append(
            {
                "check": "drill_failed",
                "severity": "critical",
                "finding": f"the drill could not run on the source ({status}): {message or 'no message'}",
                "fix": "re-run it (go2cloud_server migration drill --source S); if it fails again read "
                "the agent log, or start anyway with --override",
                "data": {},
            }
        )
    summary = {sev: sum(1 for i in items if i["severity"] == sev) for sev in DRILL_SEVERITIES}
    return {
        "version": 1,
        "mode": clip(doc.get("mode"), 16) or None,
        "passed": summary["critical"] == 0,
        "summary": summary,
        "ran": status == "succeeded",
        "agent_version": clip(doc.get("agent_version"), 64) or agent_version,
        "hostname": clip(doc.get("hostname"), 255),
        "started_at": clip(doc.get("started_at"), 40) or None,
        "finished_at": clip(doc.get("finished_at"), 40) or None,
        "items": items,
    }
