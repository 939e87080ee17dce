"""Sources: the import (and the replacement of a previous source), the operator's views, association."""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Mapping, Optional

from go2cloud_server import rules
from go2cloud_server.auth import decode_public_key
from go2cloud_server.clock import iso
from go2cloud_server.errors import CodeRejected, Conflict, ImportRejected, InvalidInput, NotFound, SourceInUse
from go2cloud_server.repositories import codes as repo_codes
from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import events as repo_events
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories import workgroups as repo_workgroups
from go2cloud_server.repositories.db import Conn
from go2cloud_server.service.base import OPEN_TASK_STATUSES, Concern, rand_id
from go2cloud_server.store import dumps, loads

log = logging.getLogger(__name__)

OFFLINE_AFTER_INTERVALS = 3
#: a source id as the server makes them (anything else an importer names is shown escaped)
_SOURCE_ID_RE = re.compile(r"s-[a-z0-9]{1,64}")


class Sources(Concern):
    """Imported machines: import, replace, associate, and what the operator sees of them."""

    def import_source(self, body: Any, *, client: str = "") -> Dict[str, Any]:
        """``POST /api/v1/sources/import``. ``client`` is the request's address (throttling)."""
        body = rules.require_object(body)
        token_id = body.get("token_id")
        token_code = body.get("token_code")
        if (
            not isinstance(token_id, str)
            or not isinstance(token_code, str)
            or len(token_id) > 128
            or len(token_code) > 256
        ):
            raise InvalidInput("token_id and token_code: are required strings")
        public_key = rules.require_str(body, "public_key", 128)
        decode_public_key(public_key)
        inventory = rules.require_object(body.get("inventory"), "inventory")
        agent_version = str(body.get("agent_version") or "")[:64]
        previous = body.get("previous_source_id")
        if previous is not None and not isinstance(previous, str):
            raise InvalidInput("previous_source_id: must be a string or null")
        hostname = str(inventory.get("hostname") or "")[:255]
        machine_id = str(inventory.get("machine_id") or "")[:255]

        # Verify the code outside of the write transaction (scrypt is deliberately slow): refused
        # with 429 after too many failures, on the bounded derivation pool (503 when full); an
        # unknown token id costs the same derivation as a known one ...
        self.svc.import_throttle.check(token_id, client)
        row = repo_codes.get(self.store, token_id)
        if row is not None:
            # cheap checks first: a code that cannot be used now is refused without the
            # derivation (a fleet retrying against a full workgroup once cost 41 CPU-s of scrypt)
            self.svc.codes.refuse_unusable(row)
        if not self.svc.key_derivation.check(
            token_code, row["salt"] if row else None, row["code_hash"] if row else None
        ):
            self.svc.import_throttle.failed(token_id, client)
            raise CodeRejected(
                "unknown activation code (check the token id and token code)", code="code_unknown"
            )
        # ... and the proof of the previous source's key (its public key never changes) ...
        proof_refusal: Optional[str] = None
        if previous:
            old_key = repo_sources.get(self.store, previous)
            if old_key is not None:
                proof_refusal = self.svc.agent_auth.check_replacement(
                    previous, old_key["public_key"], public_key, body.get("previous_source_proof")
                )
        # ... and whether an agent still runs the previous source (outside the transaction: it
        # watches the lease for up to 1.5 heartbeat intervals) ...
        unrenewed = self.svc.sessions.watch_lease(previous) if previous else None
        source_id = rand_id("s-", 16)
        replaced: Optional[Dict[str, Any]] = None
        replaced_id: Optional[str] = None
        refusal: Optional[str] = None
        # ... then consume one use atomically.
        with self.store.transaction() as conn:
            code = repo_codes.get(conn, token_id)
            if code is None:
                raise CodeRejected(
                    "unknown activation code (check the token id and token code)", code="code_unknown"
                )
            self.svc.codes.refuse_state(code)
            wg = repo_workgroups.get(conn, code["workgroup_id"])
            if wg is None:
                raise CodeRejected("unknown activation code (its workgroup was deleted)", code="code_unknown")
            if repo_sources.count_active(conn, wg["id"]) >= rules.MAX_SOURCES_PER_WORKGROUP:
                raise ImportRejected(
                    f"workgroup {wg['name']!r} already has {rules.MAX_SOURCES_PER_WORKGROUP} "
                    "sources: ask the operator to use another workgroup"
                )
            repo_codes.use_one(conn, token_id)
            now = self.now()
            old: Optional[Dict[str, Any]] = None
            if previous:
                old = repo_sources.get(conn, previous)
                refusal = self._replacement_refusal(old, wg, machine_id, proof_refusal, unrenewed)
                if old is not None and refusal is None:
                    replaced = self._replace_source(conn, old, source_id)
                    replaced_id = old["id"]
            repo_sources.insert(conn, source_id, wg["id"], public_key, hostname, machine_id, agent_version,
                                dumps(inventory), token_id, iso(now), now)
            if replaced_id:
                self.event(
                    conn,
                    source_id,
                    "info",
                    "source_replaced",
                    f"replaced source {replaced_id} (the agent proved its key)",
                )
            elif previous and refusal:
                shown = previous if _SOURCE_ID_RE.fullmatch(previous) else ascii(previous[:64])
                message = f"previous source {shown} not replaced: {refusal}"
                log.warning("import of %s: %s", source_id, message)
                self.event(conn, source_id, "warning", "replace_refused", message)
        if replaced_id:
            self.svc.agent_auth.revoke_source(replaced_id)
        if replaced:
            self.svc.targets.release(replaced)
        if replaced_id:
            self.svc.commands.notify()
        log.info(
            "source %s (%s) imported into workgroup %s with code %s", source_id, hostname, wg["id"], token_id
        )
        return {
            "source_id": source_id,
            "workgroup": {"id": wg["id"], "name": wg["name"]},
            "heartbeat_interval": self.svc.heartbeat_interval,
            "server_time": iso(now),
            "server_time_epoch": now,
            "replaced_source_id": replaced_id,
        }

    def _replacement_refusal(
        self,
        old: Optional[Mapping[str, Any]],
        wg: Mapping[str, Any],
        machine_id: str,
        proof_refusal: Optional[str],
        unrenewed: Optional[float] = None,
    ) -> Optional[str]:
        """Why an import may not replace ``old`` (None: it may). The importer must prove the old
        source's key, hold a code of the old source's own workgroup and run on the same machine;
        a source in no workgroup is replaced only by an operator."""
        if old is None:
            return "no such source"
        if old["state"] != "active":
            return f"it is already {old['state']}"
        if not old["workgroup_id"]:
            return (
                "it is in no workgroup, so only an operator can replace it "
                f"(go2cloud_server source replace {old['id']} --by NEW)"
            )
        if old["workgroup_id"] != wg["id"]:
            return "it is in another workgroup than the activation code's"
        if proof_refusal:
            return proof_refusal
        if not machine_id or old["machine_id"] != machine_id:
            return "the machine id differs"
        return self.svc.sessions.live_session(old, unrenewed)

    def replace_source(self, ref: str, body: Any) -> Dict[str, Any]:
        """Operator: mark source ``ref`` replaced by the source ``body["by"]`` (its task cancelled,
        its target released), as a re-import with a proof of the old key would. Both must be
        active; a source in a workgroup is replaced only by one of the same workgroup."""
        body = rules.require_object(body)
        by = body.get("by")
        if not isinstance(by, str) or not by:
            raise InvalidInput("by: the id of the source that replaces it is required")
        with self.store.transaction() as conn:
            old = self.get(conn, ref)
            new = self.get(conn, by)
            if old["id"] == new["id"]:
                raise InvalidInput(f"by: a source cannot replace itself ({old['id']}); name the new source")
            if old["state"] != "active":
                raise Conflict(
                    f"source {old['id']} was already replaced by {old['replaced_by']}: nothing to do"
                )
            if new["state"] != "active":
                raise Conflict(
                    f"source {new['id']} was itself replaced by {new['replaced_by']}: "
                    "name that source with --by"
                )
            if old["workgroup_id"] and new["workgroup_id"] != old["workgroup_id"]:
                raise Conflict(
                    f"source {new['id']} is not in the workgroup of {old['id']}: associate it first "
                    f"(go2cloud_server source associate {new['id']} --workgroup {old['workgroup_id']})"
                )
            live = self.svc.sessions.live_session(old)
            if live:
                raise SourceInUse(f"source {old['id']} not replaced: {live}")
            task = self._replace_source(conn, old, new["id"])
            self.event(conn, new["id"], "info", "source_replaced", f"replaced source {old['id']} (operator)")
        self.svc.agent_auth.revoke_source(old["id"])
        if task:
            self.svc.targets.release(task)
        self.svc.commands.notify()
        return self.view(self.get(None, old["id"]))

    def _replace_source(
        self, conn: Conn, old: Mapping[str, Any], new_id: str
    ) -> Optional[Dict[str, Any]]:
        repo_sources.mark_replaced(conn, old["id"], new_id)
        task = self.active_task(conn, old["id"])
        log.info("source %s replaced by %s", old["id"], new_id)
        if task is None:
            return None
        self.svc.tasks.set_task(
            conn,
            task["id"],
            status="cancelled",
            error_code="source_replaced",
            error_message=f"source replaced by {new_id}",
            finished_at=self.now_iso(),
        )
        repo_commands.supersede_queued(conn, task["id"], self.now_iso())
        return task

    def get(self, conn: Optional[Conn], ref: Any) -> Dict[str, Any]:
        if not isinstance(ref, str) or not ref:
            raise InvalidInput("source: is required")
        row = repo_sources.get(conn if conn is not None else self.store, ref)
        if row is None:
            raise NotFound(f"no source {ref!r}: see 'go2cloud_server source list'")
        return row

    def latest_task(self, conn: Optional[Conn], source_id: str) -> Optional[Dict[str, Any]]:
        return repo_tasks.latest_of_source(conn if conn is not None else self.store, source_id)

    def active_task(self, conn: Optional[Conn], source_id: str) -> Optional[Dict[str, Any]]:
        return repo_tasks.latest_of_source_in(conn if conn is not None else self.store, source_id,
                                              OPEN_TASK_STATUSES)

    def is_offline(self, src: Mapping[str, Any], now: Optional[float] = None) -> bool:
        now = self.now() if now is None else now
        last = src["last_seen_epoch"] or src["imported_epoch"]
        return now - last > OFFLINE_AFTER_INTERVALS * self.svc.heartbeat_interval

    def source_status(
        self, src: Mapping[str, Any], task: Optional[Mapping[str, Any]], now: Optional[float] = None
    ) -> str:
        """Real-time status: replaced > offline > the task's status > online."""
        if src["state"] != "active":
            return "replaced"
        if self.is_offline(src, now):
            return "offline"
        if task is not None:
            return str(task["status"])
        return "online"

    def view(self, src: Mapping[str, Any]) -> Dict[str, Any]:
        task = self.latest_task(None, src["id"])
        wg = repo_workgroups.brief(self.store, src["workgroup_id"]) if src["workgroup_id"] else None
        inv = loads(src["inventory"], {})
        os_info = inv.get("os") if isinstance(inv.get("os"), dict) else {}
        return {
            "id": src["id"],
            "hostname": src["hostname"],
            "workgroup": wg,
            "status": self.source_status(src, task),
            "os": os_info.get("pretty_name") or os_info.get("id") or "",
            "agent_version": src["agent_version"],
            "imported_at": src["imported_at"],
            "last_seen_at": src["last_seen_at"],
            "task_id": task["id"] if task else None,
            "replaced_by": src["replaced_by"],
        }

    def list_sources(self, wg_ref: Optional[str] = None) -> Dict[str, Any]:
        wg_id = self.svc.workgroups.get(None, wg_ref)["id"] if wg_ref else None
        rows = repo_sources.list_all(self.store, wg_id)
        return {"sources": [self.view(r) for r in rows]}

    def show_source(self, ref: str) -> Dict[str, Any]:
        src = self.get(None, ref)
        view = self.view(src)
        hb = loads(src["heartbeat"], None) or {}
        task = self.latest_task(None, src["id"])
        view["inventory"] = loads(src["inventory"], {})
        view["task"] = self.svc.tasks.view(task) if task else None
        view["agent"] = {k: hb.get(k) for k in ("state", "phase", "cycle", "task_id", "last_error", "load",
                                                  "loops", "retry")}
        view["progress"] = hb.get("progress")
        lease = self.svc.sessions.lease_of(src)
        view["session"] = (
            {"epoch": lease.epoch, "since": iso(lease.granted_at), "expires_at": iso(lease.expires),
             "live": lease.live(self.now()), "fingerprint": lease.fingerprint}
            if lease.epoch else None
        )
        view["clone_warning"] = loads(src["clone_warning"], None)
        view["events"] = repo_events.latest(self.store, src["id"], 20)
        return view

    def associate(self, ref: str, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body)
        with self.store.transaction() as conn:
            src = self.get(conn, ref)
            wg = self.svc.workgroups.get(conn, body.get("workgroup"))
            if src["state"] != "active":
                raise Conflict(f"source {src['id']} was replaced by {src['replaced_by']}: use that source")
            if src["workgroup_id"] == wg["id"]:
                pass
            elif src["workgroup_id"]:
                raise Conflict(f"source {src['id']} is already in another workgroup: disassociate it first")
            else:
                if repo_sources.count_active(conn, wg["id"]) >= rules.MAX_SOURCES_PER_WORKGROUP:
                    raise Conflict(
                        f"workgroup {wg['name']!r} already has {rules.MAX_SOURCES_PER_WORKGROUP} sources"
                    )
                repo_sources.set_workgroup(conn, src["id"], wg["id"])
        return self.view(self.get(None, ref))

    def disassociate(self, ref: str) -> Dict[str, Any]:
        with self.store.transaction() as conn:
            src = self.get(conn, ref)
            task = self.active_task(conn, src["id"])
            if task is not None:
                raise Conflict(
                    f"source {src['id']} has an active migration task {task['id']} ({task['status']}): "
                    "complete or cancel it first"
                )
            repo_sources.set_workgroup(conn, src["id"], None)
        return self.view(self.get(None, ref))
