"""Workgroups: create, list, show, delete; a workgroup's migration status."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

from go2cloud_server import rules
from go2cloud_server.errors import Conflict, InvalidInput, NotFound
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import workgroups as repo_workgroups
from go2cloud_server.repositories.db import Conn
from go2cloud_server.service.base import Concern, rand_id
from go2cloud_server.store import dumps, loads

log = logging.getLogger(__name__)


class Workgroups(Concern):
    """Workgroups of sources (a name, a description, tags)."""

    def get(self, conn: Optional[Conn], ref: Any) -> Dict[str, Any]:
        if not isinstance(ref, str) or not ref:
            raise InvalidInput("workgroup: is required")
        row = repo_workgroups.find(conn if conn is not None else self.store, ref)
        if row is None:
            raise NotFound(f"no workgroup {ref!r}: see 'go2cloud_server workgroup list'")
        return row

    def view(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        n = repo_sources.count_active(self.store, row["id"])
        return {
            "id": row["id"],
            "name": row["name"],
            "description": row["description"],
            "tags": loads(row["tags"], {}),
            "created_at": row["created_at"],
            "source_count": n,
            "migration_status": self.status(row["id"]),
        }

    def create_workgroup(self, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body)
        name = rules.workgroup_name(body.get("name"))
        description = rules.text(body.get("description"), "description")
        tags = rules.tags(body.get("tags"))
        wg_id = rand_id("wg-", 12)
        with self.store.transaction() as conn:
            if repo_workgroups.count(conn) >= rules.MAX_WORKGROUPS:
                raise Conflict(
                    f"workgroup limit reached ({rules.MAX_WORKGROUPS}): delete an unused workgroup first"
                )
            if repo_workgroups.name_taken(conn, name):
                raise Conflict(f"a workgroup named {name!r} already exists: pick another name")
            repo_workgroups.insert(conn, wg_id, name, description, dumps(tags), self.now_iso())
        log.info("workgroup %s (%s) created", wg_id, name)
        return self.view(self.get(None, wg_id))

    def list_workgroups(self) -> Dict[str, Any]:
        rows = repo_workgroups.list_all(self.store)
        return {"workgroups": [self.view(r) for r in rows]}

    def show_workgroup(self, ref: str) -> Dict[str, Any]:
        wg = self.get(None, ref)
        view = self.view(wg)
        view["sources"] = self.svc.sources.list_sources(wg["id"])["sources"]
        view["migration"] = self.svc.tasks.workgroup_migration(wg["id"])
        return view

    def delete_workgroup(self, ref: str) -> Dict[str, Any]:
        with self.store.transaction() as conn:
            wg = self.get(conn, ref)
            n = repo_sources.count_in_workgroup(conn, wg["id"])
            if n:
                raise Conflict(
                    f"workgroup {wg['name']!r} still has {n} source(s): disassociate them first "
                    "('go2cloud_server source disassociate S')"
                )
            repo_workgroups.delete(conn, wg["id"])
        log.info("workgroup %s (%s) deleted", wg["id"], wg["name"])
        return {}

    def status(self, wg_id: str) -> str:
        statuses: List[str] = []
        for source_id in repo_sources.ids_in_workgroup(self.store, wg_id):
            task = self.svc.sources.latest_task(None, source_id)
            if task is not None and task["status"] != "cancelled":
                statuses.append(task["status"])
        return workgroup_status(statuses)


def workgroup_status(task_statuses: List[str]) -> str:
    """Workgroup migration status from the statuses of its sources' current (non-cancelled) tasks."""
    if not task_statuses:
        return "not_started"
    if "failed" in task_statuses:
        return "failed"
    if all(s == "completed" for s in task_statuses):
        return "completed"
    open_ = [s for s in task_statuses if s != "completed"]
    if open_ and all(s == "paused" for s in open_):
        return "paused"
    return "in_progress"
