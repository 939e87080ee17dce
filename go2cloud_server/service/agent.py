"""The agent API: the server's time, heartbeats, the command poll and acknowledgements, the task
document, events."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Tuple

from go2cloud_server import heartbeat as heartbeat_report
from go2cloud_server import rules
from go2cloud_server.clock import iso
from go2cloud_server.errors import InvalidInput, NotFound, SourceReplaced, SourceUnknown
from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import events as repo_events
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.service.base import Concern
from go2cloud_server.service.commands import FINAL_COMMAND_STATUSES
from go2cloud_server.service.tasks import cycle_spec
from go2cloud_server.store import dumps, loads

log = logging.getLogger(__name__)

ACK_STATUSES = ("accepted", "succeeded", "failed", "unsupported", "rejected")
MAX_EVENTS_PER_SOURCE = 1000


class AgentApi(Concern):
    """What an agent calls (after ``httpapi`` checked its token and the session fence)."""

    def server_time(self) -> Dict[str, Any]:
        """``GET /api/v1/time`` (no authentication): the clock agents compare theirs with."""
        now = self.now()
        return {"server_time": iso(now), "server_time_epoch": now}

    def agent_source(self, source_id: str) -> Dict[str, Any]:
        """The source an agent request is for; 404 source_unknown / 410 source_replaced."""
        row = repo_sources.get(self.store, source_id)
        if row is None:
            raise SourceUnknown(f"source {source_id} does not exist: import again")
        if row["state"] != "active":
            raise SourceReplaced(f"source {source_id} was replaced or deleted: import again")
        return row

    def heartbeat(self, source_id: str, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body)
        keep = {
            k: body.get(k)
            for k in ("agent_version", "state", "task_id", "phase", "cycle", "progress", "last_error", "load")
        }
        keep["loops"] = heartbeat_report.loops(body.get("loops"))
        keep["retry"] = heartbeat_report.retry(body.get("retry"))
        keep["bandwidth"] = heartbeat_report.bandwidth(body.get("bandwidth"))
        now = self.now()
        with self.store.transaction() as conn:
            version = str(body["agent_version"])[:64] if isinstance(body.get("agent_version"), str) else None
            repo_sources.record_heartbeat(conn, source_id, now, iso(now), dumps(keep), version)
            waiting = repo_commands.any_pending(conn, source_id)
        return {
            "server_time": iso(now),
            "server_time_epoch": now,
            "commands_waiting": waiting,
            "heartbeat_interval": self.svc.heartbeat_interval,
        }

    def _pending_commands(self, source_id: str) -> List[Dict[str, Any]]:
        rows = repo_commands.pending(self.store, source_id)
        return [
            {
                "id": r["id"],
                "type": r["type"],
                "params": loads(r["params"], {}),
                "created_at": r["created_at"],
            }
            for r in rows
        ]

    def poll_commands(
        self, source_id: str, wait: float, monotonic: Callable[[], float] = time.monotonic
    ) -> Dict[str, Any]:
        """The agent's long poll: its pending commands, waiting up to ``wait`` seconds for one."""
        return {"commands": self.svc.commands.wait_for(lambda: self._pending_commands(source_id), wait,
                                                       monotonic)}

    def ack_command(self, source_id: str, command_id: str, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body)
        status = body.get("status")
        if status not in ACK_STATUSES:
            raise InvalidInput(f"status: must be one of {', '.join(ACK_STATUSES)}")
        error_code = body.get("error_code")
        message = body.get("message")
        result = body.get("result")
        if error_code is not None and not isinstance(error_code, str):
            raise InvalidInput("error_code: must be a string or null")
        if message is not None and not isinstance(message, str):
            raise InvalidInput("message: must be a string or null")
        if result is not None and not isinstance(result, dict):
            raise InvalidInput("result: must be an object or null")
        error_code = (error_code or None) and error_code[:64]
        message = (message or None) and message[:2000]
        with self.store.transaction() as conn:
            cmd = repo_commands.get_of_source(conn, command_id, source_id)
            if cmd is None:
                raise NotFound(f"no command {command_id} for source {source_id}")
            already_final = cmd["status"] in FINAL_COMMAND_STATUSES
            if not already_final:
                repo_commands.acknowledge(conn, command_id, status, error_code, message, dumps(result or {}),
                                          self.now_iso(), applied=status == "accepted")
        if already_final:  # a repeated acknowledgement; applied now if a stop interrupted that
            if not cmd["applied"]:
                self.svc.commands.apply_final(cmd)
            return {}
        if status == "accepted":
            if cmd["type"] == "start":
                self.svc.commands.start_taken(cmd)
            return {}
        log.info(
            "command %s (%s) of %s acknowledged %s%s",
            command_id,
            cmd["type"],
            source_id,
            status,
            f" ({error_code})" if error_code else "",
        )
        self.svc.commands.apply_final({**cmd, "status": status, "error_code": error_code, "message": message,
                           "result": dumps(result or {})})
        return {}

    def agent_task(self, source_id: str, task_id: str) -> Dict[str, Any]:
        task = repo_tasks.of_source(self.store, task_id, source_id)
        if task is None:
            raise NotFound(f"no task {task_id} for source {source_id}")
        cycle = cycle_spec(task["current_cycle"], task["last_committed"]) if task["current_cycle"] else None
        doc = {
            "task_id": task["id"],
            "mode": task["mode"],
            "paths": loads(task["paths"], []),
            "bandwidth_mbps": task["bandwidth_mbps"],
            "bandwidth_schedule": task["bandwidth_schedule"],
            "compression": task["compression"],
            "checksum": bool(task["checksum"]),
            "target": self.svc.targets.target(task),
            "status": task["status"],
            "cycle": cycle,
        }
        doc.update(self.svc.targets.of(task).agent_fields(task))
        return doc

    def post_events(self, source_id: str, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body)
        events = body.get("events")
        if not isinstance(events, list) or len(events) > 100:
            raise InvalidInput("events: must be a list of at most 100 events")
        rows: List[Tuple[Any, ...]] = []
        for ev in events:
            if not isinstance(ev, dict):
                raise InvalidInput("events: each event must be an object")
            level = ev.get("level") if ev.get("level") in ("info", "warning", "error") else "info"
            rows.append(
                (
                    source_id,
                    str(ev.get("time") or self.now_iso())[:40],
                    level,
                    str(ev.get("code") or "")[:64],
                    str(ev.get("message") or "")[:2000],
                )
            )
        with self.store.transaction() as conn:
            repo_events.add_many(conn, rows)
            repo_events.keep_latest(conn, source_id, MAX_EVENTS_PER_SOURCE)
        return {}
