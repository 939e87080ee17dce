"""Business logic of the control plane: workgroups, activation codes, sources, migration tasks,
commands, sync cycles and artifacts.

The HTTP layer (``httpapi``) and the scheduler call into :class:`Service`; it validates with
``rules``, keeps state in ``store`` and drives the target through two injected objects: the rsync
daemon (modules per task) and a factory of per-task trees (one directory per sync cycle, see
``go2cloud_server.artifacts``). Every multi-step change runs in one ``BEGIN IMMEDIATE``
transaction; filesystem work that may take long (committing a cycle) runs outside of it.

Times stored and returned are UTC; ``clock`` (``go2cloud_server.clock.Clock``) is injected so tests
can move time (offline detection, code expiry).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import string
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterable, List, Mapping, Optional, Protocol, Tuple

from go2cloud_server import heartbeat as heartbeat_report
from go2cloud_server import rules
from go2cloud_server.auth import AgentAuth, decode_public_key
from go2cloud_server.autoretry import AUTO_RETRY_EVENT, TRANSIENT_CODES, AutoRetry
from go2cloud_server.clock import Clock, SystemClock, iso, parse_iso
from go2cloud_server.errors import (
    AuthFailed,
    CodeRejected,
    Conflict,
    ImportRejected,
    InvalidInput,
    NotFound,
    NothingStarted,
    ServerError,
    SessionBusy,
    SessionConflict,
    SessionRequired,
    SourceInUse,
    SourceReplaced,
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
from go2cloud_server.repositories import artifacts as repo_artifacts
from go2cloud_server.repositories import codes as repo_codes
from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import cycle_writers as repo_cycle_writers
from go2cloud_server.repositories import drills as repo_drills
from go2cloud_server.repositories import events as repo_events
from go2cloud_server.repositories import sources as repo_sources
from go2cloud_server.repositories import tasks as repo_tasks
from go2cloud_server.repositories import workgroups as repo_workgroups
from go2cloud_server.rsyncd import SessionSpec
from go2cloud_server.space import SpaceGuard, describe, human, is_disk_full
from go2cloud_server.store import Store, dumps, loads
from go2cloud_server.throttle import ImportThrottle, KeyDerivation
from go2cloud_server.verifier import REPORT_FAILED, REPORT_PENDING, REPORT_VERIFIED, GenerationVerifier

log = logging.getLogger(__name__)

OFFLINE_AFTER_INTERVALS = 3
#: ``target_full``: a cycle stopped because the target's storage is full; it resumes by itself
#: when there is room again (the scheduler), or on ``migration sync``
ACTIVE_TASK_STATUSES = ("syncing", "pending", "paused", "failed", "target_full")
#: statuses of a task before its first sync: the drill runs, passed (start queued) or found a
#: critical item (nothing started until it is fixed and re-run, or overridden)
DRILL_STATUSES = ("drilling", "drill_passed", "drill_abnormal")
#: interrupted drills (the agent restarted while one ran) queued again per task before the task
#: stops at ``drill_abnormal`` like any drill that could not run
DRILL_REQUEUES = 2
#: a source with a task in one of these has a migration (no second task; cancel works)
OPEN_TASK_STATUSES = ACTIVE_TASK_STATUSES + DRILL_STATUSES
DRILL_SEVERITIES = ("critical", "warning", "info")
MAX_DRILL_ITEMS = 200
FINAL_COMMAND_STATUSES = ("succeeded", "failed", "unsupported", "rejected", "superseded")
ACK_STATUSES = ("accepted", "succeeded", "failed", "unsupported", "rejected")
CYCLE_COMMANDS = ("start", "sync", "finalize")
TARGET_FULL = "target_full"
#: free space a target_full task waits for before it resumes by itself: what the agent said the
#: cycle has left, within these bounds (an estimate: compression and holes make it smaller)
RESUME_AT_LEAST = 16 * 1024 * 1024
RESUME_AT_MOST = 1024 * 1024 * 1024
#: an rsync session that failed (exit 11/23) with less free than this (or 5 % of the
#: filesystem) on the target is taken for a full target (rsync removes its partial file)
NEARLY_FULL = 64 * 1024 * 1024
ACTIONS = ("modify", "pause", "resume", "sync", "complete", "cancel", "drill")
#: filesystems whose mount points are migrated by default (file mode)
LOCAL_FSTYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "jfs", "reiserfs", "f2fs", "zfs"})
MAX_EVENTS_PER_SOURCE = 1000
#: refused agent processes remembered by the fence (refusal start, clone already reported) at most
FENCE_MEMORY = 10000
_ALNUM_LOWER = string.ascii_lowercase + string.digits
_ALNUM = string.ascii_letters + string.digits
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
#: a source id as the server makes them (anything else an importer names is shown escaped)
_SOURCE_ID_RE = re.compile(r"s-[a-z0-9]{1,64}")


#: the task options a ``modify`` forwards to the agent (they apply without restarting the transfer)
_AGENT_OPTIONS = ("bandwidth_mbps", "bandwidth_schedule", "compression", "checksum")

class RsyncTarget(Protocol):
    """What the service needs from ``go2cloud_server.rsyncd.RsyncSessions``."""

    def close_task(self, task_id: str) -> None: ...


class BlockStore(Protocol):
    """What the service needs from ``go2cloud_server.blockstore.BlockTaskStore`` (one per block task,
    rooted at ``<data-dir>/tasks/<task_id>/block``)."""

    def declare(self, disks: Mapping[str, Optional[int]]) -> None: ...

    def commit_cycle(self, cycle: int) -> List[Dict[str, Any]]: ...

    def verify_generation_steps(
        self, disk: str, cycle: int
    ) -> Generator[None, None, Optional[Dict[str, Any]]]: ...

    def retain(self, keep: int) -> List[int]: ...

    def discard_cycle(self, cycle: int) -> None: ...

    def destroy(self) -> None: ...


def default_block_store_factory(root: Path) -> BlockStore:
    from go2cloud_server.blockstore import BlockTaskStore

    return BlockTaskStore(root)  # type: ignore[no-any-return]


class Tree(Protocol):
    """What the service needs from ``go2cloud_server.artifacts.TaskTree``."""

    def prepare_cycle(self, n: int) -> Path: ...

    def commit_cycle(self, n: int) -> Any: ...

    def discard_cycle(self, n: int) -> None: ...

    def retain(self, keep: int, committed: List[int]) -> List[int]: ...

    def destroy(self) -> None: ...


def rand_id(prefix: str, n: int = 16) -> str:
    return prefix + "".join(secrets.choice(_ALNUM_LOWER) for _ in range(n))


def hash_code(code: str, salt: bytes) -> bytes:
    return hashlib.scrypt(code.encode("utf-8"), salt=salt, maxmem=64 * 1024 * 1024, **_SCRYPT)


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _ps_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def install_commands(
    url: str, fingerprint: str, token_id: str, token_code: str, spki_pin: str = ""
) -> Dict[str, str]:
    """The ready-to-paste one-liners shown for an activation code (one place to change them).

    Linux: curl fetches ``install.sh`` with the server's public key pinned (``--pinnedpubkey``;
    ``--insecure`` only skips the CA check of the self-signed certificate, the pin still applies)
    and pipes it to ``sudo bash``; when curl fails (wrong pin, server unreachable) it prints
    ``exit <curl's code>`` instead, so the pipeline fails with curl's exit code and nothing runs
    (a bare pipe would give bash an empty script and exit 0, which fleet automation would count
    as an install). Windows: PowerShell fetches ``install.ps1`` with a certificate
    validation callback that accepts only the certificate whose SHA-256 is the fingerprint.

    The token code is in no process's arguments at any moment (arguments are readable by every
    local user). On Linux the assignment in front of ``sudo`` is done by the operator's shell: it
    puts the code in sudo's environment, not its arguments (and not in the shell's own environment
    afterwards, as ``export`` would), and ``sudo --preserve-env=`` hands it to ``bash`` and
    install.sh, which give it to go2cloud_client's import and unset it. Options can still be
    appended to the line. In PowerShell ``$env:`` is in-process, and install.ps1 removes it after
    the import.
    """
    hex_digest = fingerprint.split(":", 1)[-1]
    linux = (
        f"{{ curl -fsS --insecure --pinnedpubkey {_sh_quote(spki_pin)} {url}/download/install.sh"
        ' || echo "exit $?"; }'
        f" | GO2CLOUD_TOKEN_CODE={_sh_quote(token_code)} sudo --preserve-env=GO2CLOUD_TOKEN_CODE bash -s --"
        f" --server {url} --server-fingerprint {fingerprint} --token-id {token_id}"
    )
    powershell = (
        f"$env:GO2CLOUD_TOKEN_CODE={_ps_quote(token_code)}; "
        "[Net.ServicePointManager]::SecurityProtocol=[Net.SecurityProtocolType]::Tls12; "
        "[Net.ServicePointManager]::ServerCertificateValidationCallback={param($s,$c) "
        "(-join ([Security.Cryptography.SHA256]::Create().ComputeHash($c.GetRawCertData()) | "
        f"ForEach-Object {{ $_.ToString('x2') }})) -eq {_ps_quote(hex_digest)}}}; "
        "& ([scriptblock]::Create((New-Object Net.WebClient).DownloadString("
        f"{_ps_quote(url + '/download/install.ps1')}))) -Server {_ps_quote(url)} "
        f"-ServerFingerprint {_ps_quote(fingerprint)} -TokenId {_ps_quote(token_id)}"
    )
    return {"linux": linux, "powershell": powershell}


def cycle_spec(number: int, last_committed: Optional[int]) -> Dict[str, Any]:
    return {
        "number": number,
        "dest": f"{number:06d}",
        "link_dest": f"{last_committed:06d}" if last_committed else None,
    }


def default_paths(inventory: Mapping[str, Any]) -> List[str]:
    """Local mount points of the source's inventory (file mode), else ``["/"]``."""
    out: List[str] = []
    mounts = inventory.get("mounts") if isinstance(inventory, Mapping) else None
    for m in mounts if isinstance(mounts, list) else []:
        if not isinstance(m, Mapping) or str(m.get("fstype", "")).lower() not in LOCAL_FSTYPES:
            continue
        mp = m.get("mountpoint")
        try:
            mp = rules.source_path(mp)
        except InvalidInput:
            continue
        if mp not in out:
            out.append(mp)
    return sorted(out) or ["/"]


class Service:
    def __init__(
        self,
        store: Store,
        data_dir: Path,
        *,
        rsyncd: RsyncTarget,
        tree_factory: Callable[[Path], Tree],
        block_store_factory: Callable[[Path], BlockStore] = default_block_store_factory,
        public_host: str = "127.0.0.1",
        public_url: str = "",
        fingerprint: str = "",
        spki_pin: str = "",
        heartbeat_interval: float = 10,
        auto_retry: Optional[AutoRetry] = None,
        clock: Optional[Clock] = None,
        agent_auth: Optional[AgentAuth] = None,
        import_throttle: Optional[ImportThrottle] = None,
        target_dir: Optional[Path] = None,
        space: Optional[SpaceGuard] = None,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        #: where the task trees and block images live (``serve --target-dir``; default the data dir)
        self.target_dir = Path(target_dir) if target_dir is not None else self.data_dir
        #: keeps the database writable when images fill a filesystem they share (``space``)
        self.space = space
        #: free bytes on the target when each target_full task stopped (its resume needs more)
        self._full_free: Dict[str, int] = {}
        self.rsyncd = rsyncd
        self.tree_factory = tree_factory
        self.block_store_factory = block_store_factory
        self._block_stores: Dict[str, BlockStore] = {}
        self._block_lock = threading.Lock()
        #: one lock per task while its acknowledgement is applied (weak: gone when unused, so the
        #: table does not grow with every task the server ever ran)
        self._apply_locks: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.public_host = public_host
        self.public_url = public_url
        self.fingerprint = fingerprint
        self.spki_pin = spki_pin
        self.heartbeat_interval = heartbeat_interval
        #: how long an import replacing a source watches its live lease for a renewal (a running agent)
        self.replace_watch_s = 1.5 * heartbeat_interval
        #: failed cycles of a transient cause queued again by the scheduler (``autoretry``)
        self.auto_retry = auto_retry or AutoRetry()
        #: wall clock and monotonic clock (``go2cloud_server.clock``; tests pass a fake)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.commands_cv = threading.Condition()
        self._closed = False
        #: verifies block generations (sha256, fsck) after their cycle was acknowledged
        self.verifier = GenerationVerifier(self._verify_generation)
        #: nonces of the agents' challenges (a re-import proves the old source's key with one)
        self.agent_auth = agent_auth or AgentAuth()
        #: failed imports per token id and client address (429 over the limits)
        self.import_throttle = import_throttle or ImportThrottle()
        #: scrypt of activation codes on a bounded pool (503 when full)
        self.key_derivation = KeyDerivation(hash_code)
        #: fencing: when each refused agent process was first refused (source, instance), the
        #: refusals already reported as a clone, and the (task, cycle, epoch) writers recorded
        self._fence_lock = threading.Lock()
        self._contenders: Dict[Tuple[str, str], float] = {}
        self._flagged: set = set()
        self._writers_seen: set = set()

    # helpers ----------------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock.now()

    def now_iso(self) -> str:
        return iso(self.clock.now())

    def tree_root(self, task_id: str) -> Path:
        return self.target_dir / "tasks" / task_id / "tree"

    def tree(self, task_id: str) -> Tree:
        return self.tree_factory(self.tree_root(task_id))

    def block_root(self, task_id: str) -> Path:
        return self.target_dir / "tasks" / task_id / "block"

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
                bs = self.block_store_factory(self.block_root(task_id))
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
        except sqlite3.Error:
            log.warning("block receiver: cannot look up task %s", task_id, exc_info=True)
            return None
        expected = (task or {}).get("block_token") or ""
        ok = hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8"))
        if task is None or not ok or not expected:
            return None
        if task["mode"] != "block" or task["status"] not in ACTIVE_TASK_STATUSES:
            return None
        self.check_room(task_id)
        return self.block_store(task_id)

    def target(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        if task["mode"] == "block":
            return {
                "kind": "block",
                "url": f"{self.public_url}/block/v1/tasks/{task['id']}",
                "token": task["block_token"],
                "fingerprint": self.fingerprint,
            }
        return {
            "kind": "rsync",
            "url": f"{self.public_url}/rsync/v1/tasks/{task['id']}",
            "fingerprint": self.fingerprint,
            "module": task["id"],
            "user": task["id"],
            "password": task["rsync_password"],
        }

    def rsync_session_spec(self, task_id: str, password: str, cycle: Any, path: Any,
                           epoch: Optional[str] = None) -> SessionSpec:
        """What an agent's rsync connection may write (``httpapi``, before the upgrade): the
        task's credentials (constant-time), a file task that is syncing, the cycle it is writing,
        one of its paths and the source's current session ``epoch`` (``X-Go2cloud-Epoch``; 409
        ``stale_epoch`` otherwise, see :meth:`check_epoch`). Nothing is started or written here."""
        task = None
        if isinstance(task_id, str) and isinstance(password, str) and password:
            task = repo_tasks.get(self.store, task_id)
        expected = ((task or {}).get("rsync_password") or "").encode("utf-8")
        ok = hmac.compare_digest(str(password).encode("utf-8"), expected)
        if task is None or not expected or not ok or task["mode"] == "block":
            raise AuthFailed("the rsync credentials are not those of an active file task")
        if task["status"] != "syncing" or not task["current_cycle"]:
            raise Conflict(f"task {task_id} is {task['status']}: it is not writing a cycle now")
        self.check_room(task_id)
        if not isinstance(cycle, int) or cycle != int(task["current_cycle"]):
            raise Conflict(f"task {task_id} is writing cycle {task['current_cycle']}, not {cycle}")
        paths = [str(p) for p in loads(task["paths"], [])]
        if path not in paths:
            raise InvalidInput(f"path {str(path)[:200]!r} is not one of the task's paths")
        self.check_epoch(task_id, epoch, cycle=cycle)  # 409 stale_epoch: nothing started
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

    def start(self) -> int:
        """Start the background work: the generation verifier, with every block artifact whose
        verification is still pending (the server stopped or crashed before it finished) or
        failed queued again (an image that cannot be read keeps its final ``failed`` report on disk,
        which is returned at once; an unexpected error gets another try). Returns how many were
        queued. Without ``start`` the verifier starts on its first generation."""
        self.apply_unfinished()
        self.verifier.start()
        rows = repo_artifacts.unverified_generations(self.store)
        again = (REPORT_PENDING, REPORT_FAILED)
        pending = [r for r in rows if (loads(r["report"], None) or {}).get("state") in again]
        for r in pending:
            self.verifier.submit(r["task_id"], int(r["cycle"]), r["disk"])
        if pending:
            log.info("%d block generation(s) not verified yet: queued again", len(pending))
        return len(pending)

    def close(self) -> None:
        with self.commands_cv:
            self._closed = True
            self.commands_cv.notify_all()
        self.verifier.stop()
        self.key_derivation.close()

    def _notify(self) -> None:
        with self.commands_cv:
            self.commands_cv.notify_all()

    def server_time(self) -> Dict[str, Any]:
        """``GET /api/v1/time`` (no authentication): the clock agents compare theirs with."""
        now = self.now()
        return {"server_time": iso(now), "server_time_epoch": now}

    # workgroups -------------------------------------------------------------------------------
    def _workgroup(self, conn: Optional[sqlite3.Connection], ref: Any) -> Dict[str, Any]:
        if not isinstance(ref, str) or not ref:
            raise InvalidInput("workgroup: is required")
        row = repo_workgroups.find(conn if conn is not None else self.store, ref)
        if row is None:
            raise NotFound(f"no workgroup {ref!r}: see 'go2cloud_server workgroup list'")
        return row

    def _wg_view(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        n = repo_sources.count_active(self.store, row["id"])
        return {
            "id": row["id"],
            "name": row["name"],
            "description": row["description"],
            "tags": loads(row["tags"], {}),
            "created_at": row["created_at"],
            "source_count": n,
            "migration_status": self._wg_status(row["id"]),
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
        return self._wg_view(self._workgroup(None, wg_id))

    def list_workgroups(self) -> Dict[str, Any]:
        rows = repo_workgroups.list_all(self.store)
        return {"workgroups": [self._wg_view(r) for r in rows]}

    def show_workgroup(self, ref: str) -> Dict[str, Any]:
        wg = self._workgroup(None, ref)
        view = self._wg_view(wg)
        view["sources"] = self.list_sources(wg["id"])["sources"]
        view["migration"] = self.workgroup_migration(wg["id"])
        return view

    def delete_workgroup(self, ref: str) -> Dict[str, Any]:
        with self.store.transaction() as conn:
            wg = self._workgroup(conn, ref)
            n = repo_sources.count_in_workgroup(conn, wg["id"])
            if n:
                raise Conflict(
                    f"workgroup {wg['name']!r} still has {n} source(s): disassociate them first "
                    "('go2cloud_server source disassociate S')"
                )
            repo_workgroups.delete(conn, wg["id"])
        log.info("workgroup %s (%s) deleted", wg["id"], wg["name"])
        return {}

    # activation codes -------------------------------------------------------------------------
    def _refuse_unusable_code(self, code: Mapping[str, Any]) -> None:
        """Refuse an import with a known code that cannot be used now (revoked, expired, no uses
        left, its workgroup deleted or full), before its code is checked: no key derivation for
        an import that would be refused anyway. The answer names the state of the code, never its
        workgroup (the caller has not proven the code yet); docs/security.md says what a token id
        alone tells. The transaction that consumes a use checks all of it again."""
        self._refuse_code_state(code)
        wg = repo_workgroups.brief(self.store, code["workgroup_id"])
        if wg is None:
            raise CodeRejected("unknown activation code (its workgroup was deleted)", code="code_unknown")
        if repo_sources.count_active(self.store, wg["id"]) >= rules.MAX_SOURCES_PER_WORKGROUP:
            raise ImportRejected(
                f"the workgroup of this activation code already has {rules.MAX_SOURCES_PER_WORKGROUP} "
                "sources: ask the operator to use another workgroup"
            )

    def _refuse_code_state(self, code: Mapping[str, Any]) -> None:
        """Refuse a code that is revoked, expired or has no uses left, saying which."""
        state = self._code_state(code)
        if state == "revoked":
            raise CodeRejected("this activation code was revoked: ask the operator for a new one",
                               code="code_revoked")
        if state == "expired":
            raise CodeRejected(
                f"this activation code expired at {code['expires_at']}: ask the operator for a new one",
                code="code_expired",
            )
        if state == "exhausted":
            raise CodeRejected(
                f"this activation code has no uses left (it allowed {code['uses']}): ask the operator "
                "for a new one",
                code="code_exhausted",
            )

    def _code_state(self, row: Mapping[str, Any]) -> str:
        if row["revoked_at"]:
            return "revoked"
        if row["expires_epoch"] <= self.now():
            return "expired"
        if row["uses_left"] <= 0:
            return "exhausted"
        return "active"

    def _code_view(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        wg = repo_workgroups.brief(self.store, row["workgroup_id"])
        return {
            "token_id": row["token_id"],
            "workgroup": wg,
            "uses": row["uses"],
            "uses_left": row["uses_left"],
            "created_at": row["created_at"],
            "expires_at": row["expires_at"],
            "revoked_at": row["revoked_at"],
            "state": self._code_state(row),
        }

    def create_code(self, wg_ref: str, body: Any) -> Dict[str, Any]:
        body = rules.require_object(body if body is not None else {})
        uses = rules.integer(body.get("uses"), "uses", rules.CODE_USES, rules.CODE_USES_DEFAULT)
        days = rules.integer(body.get("days"), "days", rules.CODE_DAYS, rules.CODE_DAYS_DEFAULT)
        token_id = rand_id("at-", 16)
        token_code = "".join(secrets.choice(_ALNUM) for _ in range(28))
        salt = os.urandom(16)
        digest = hash_code(token_code, salt)
        now = self.now()
        expires = now + days * 86400
        with self.store.transaction() as conn:
            wg = self._workgroup(conn, wg_ref)
            repo_codes.insert(conn, token_id, wg["id"], salt, digest, uses, iso(now), iso(expires), expires)
        log.info(
            "activation code %s created for workgroup %s (uses %d, days %d)", token_id, wg["id"], uses, days
        )
        row = repo_codes.get(self.store, token_id)
        assert row is not None
        view = self._code_view(row)
        view["token_code"] = token_code
        view["commands"] = install_commands(
            self.public_url, self.fingerprint, token_id, token_code, self.spki_pin
        )
        return view

    def list_codes(self, wg_ref: Optional[str] = None) -> Dict[str, Any]:
        wg_id = self._workgroup(None, wg_ref)["id"] if wg_ref else None
        rows = repo_codes.list_all(self.store, wg_id)
        return {"codes": [self._code_view(r) for r in rows]}

    def revoke_code(self, token_id: str) -> Dict[str, Any]:
        with self.store.transaction() as conn:
            row = repo_codes.get(conn, token_id)
            if row is None:
                raise NotFound(f"no activation code {token_id!r}: see 'go2cloud_server code list'")
            if not row["revoked_at"]:
                repo_codes.revoke(conn, token_id, self.now_iso())
        log.info("activation code %s revoked", token_id)
        row = repo_codes.get(self.store, token_id)
        assert row is not None
        return self._code_view(row)

    # sources: import --------------------------------------------------------------------------
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
        self.import_throttle.check(token_id, client)
        row = repo_codes.get(self.store, token_id)
        if row is not None:
            # cheap checks first: a code that cannot be used now is refused without the
            # derivation (a fleet retrying against a full workgroup once cost 41 CPU-s of scrypt)
            self._refuse_unusable_code(row)
        if not self.key_derivation.check(
            token_code, row["salt"] if row else None, row["code_hash"] if row else None
        ):
            self.import_throttle.failed(token_id, client)
            raise CodeRejected(
                "unknown activation code (check the token id and token code)", code="code_unknown"
            )
        # ... and the proof of the previous source's key (its public key never changes) ...
        proof_refusal: Optional[str] = None
        if previous:
            old_key = repo_sources.get(self.store, previous)
            if old_key is not None:
                proof_refusal = self.agent_auth.check_replacement(
                    previous, old_key["public_key"], public_key, body.get("previous_source_proof")
                )
        # ... and whether an agent still runs the previous source (outside the transaction: it
        # watches the lease for up to 1.5 heartbeat intervals) ...
        unrenewed = self._watch_lease(previous) if previous else None
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
            self._refuse_code_state(code)
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
                self._event(
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
                self._event(conn, source_id, "warning", "replace_refused", message)
        if replaced_id:
            self.agent_auth.revoke_source(replaced_id)
        if replaced:
            self._release_target(replaced)
        if replaced_id:
            self._notify()
        log.info(
            "source %s (%s) imported into workgroup %s with code %s", source_id, hostname, wg["id"], token_id
        )
        return {
            "source_id": source_id,
            "workgroup": {"id": wg["id"], "name": wg["name"]},
            "heartbeat_interval": self.heartbeat_interval,
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
        return self._live_session(old, unrenewed)

    def _watch_lease(self, source_id: str) -> Optional[float]:
        """An import replacing ``source_id``: is its agent still running? A live lease is watched
        for up to :attr:`replace_watch_s` (1.5 heartbeat intervals): a running agent renews it
        with a heartbeat within one interval. Returns the lease's expiry when it was live and not
        renewed meanwhile (its agent stopped, e.g. ``--abort`` just before this import: the
        replacement may go ahead), else None."""
        row = repo_sources.get(self.store, source_id)
        if row is None:
            return None
        first = self._lease_of(row)
        if not first.live(self.now()):
            return None
        deadline = time.monotonic() + self.replace_watch_s
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            row = repo_sources.get(self.store, source_id)
            cur = self._lease_of(row or {})
            if cur.instance != first.instance or cur.expires != first.expires:
                return None  # renewed or taken over: an agent runs it
            if not cur.live(self.now()):
                return None
        return first.expires

    def _live_session(self, old: Mapping[str, Any], unrenewed: Optional[float] = None) -> Optional[str]:
        """Why ``old`` cannot be replaced now because an agent still runs it (None: no live
        lease, or ``unrenewed``: a live lease seen not renewed for 1.5 heartbeat intervals, see
        :meth:`_watch_lease`). Replacing it would cancel the task a running agent works on and
        revoke its key under it: the agent must be stopped first, or its lease left to expire."""
        lease = self._lease_of(old)
        now = self.now()
        if not lease.live(now) or (unrenewed is not None and lease.expires == unrenewed):
            return None
        left = max(1, int(lease.expires - now + 0.999))
        return (f"its agent is running: it holds the session of source {old['id']} (epoch {lease.epoch}, "
                f"renewed by its heartbeats; the lease expires at {iso(lease.expires)}, in {left}s if it "
                "stops). Stop that agent (on its machine: go2cloud_client --abort, or stop its service), "
                "or wait for its lease to expire, then replace the source again")

    def _event(self, conn: sqlite3.Connection, source_id: str, level: str, code: str, message: str) -> None:
        """An event of the control plane itself in the source's list (``source show``)."""
        repo_events.add(conn, source_id, self.now_iso(), level, code, message[:2000])

    def replace_source(self, ref: str, body: Any) -> Dict[str, Any]:
        """Operator: mark source ``ref`` replaced by the source ``body["by"]`` (its task cancelled,
        its target released), as a re-import with a proof of the old key would. Both must be
        active; a source in a workgroup is replaced only by one of the same workgroup."""
        body = rules.require_object(body)
        by = body.get("by")
        if not isinstance(by, str) or not by:
            raise InvalidInput("by: the id of the source that replaces it is required")
        with self.store.transaction() as conn:
            old = self._source(conn, ref)
            new = self._source(conn, by)
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
            live = self._live_session(old)
            if live:
                raise SourceInUse(f"source {old['id']} not replaced: {live}")
            task = self._replace_source(conn, old, new["id"])
            self._event(conn, new["id"], "info", "source_replaced", f"replaced source {old['id']} (operator)")
        self.agent_auth.revoke_source(old["id"])
        if task:
            self._release_target(task)
        self._notify()
        return self._source_view(self._source(None, old["id"]))

    def _replace_source(
        self, conn: sqlite3.Connection, old: Mapping[str, Any], new_id: str
    ) -> Optional[Dict[str, Any]]:
        repo_sources.mark_replaced(conn, old["id"], new_id)
        task = self._active_task(conn, old["id"])
        log.info("source %s replaced by %s", old["id"], new_id)
        if task is None:
            return None
        self._set_task(
            conn,
            task["id"],
            status="cancelled",
            error_code="source_replaced",
            error_message=f"source replaced by {new_id}",
            finished_at=self.now_iso(),
        )
        repo_commands.supersede_queued(conn, task["id"], self.now_iso())
        return task

    def _release_target(self, task: Mapping[str, Any]) -> None:
        """Remove the task's rsync module and its unfinished cycle (committed images are kept).
        Block tasks: discard the running cycle of the block store (committed generations stay);
        the receiver refuses the task's token from now on (it is no longer active)."""
        if task.get("mode") == "block":
            if task.get("current_cycle"):
                try:
                    self.block_store(task["id"]).discard_cycle(int(task["current_cycle"]))
                except Exception:  # noqa: BLE001
                    log.warning(
                        "could not discard cycle %s of %s", task["current_cycle"], task["id"], exc_info=True
                    )
            with self._block_lock:
                self._block_stores.pop(task["id"], None)
            return
        try:
            self.rsyncd.close_task(task["id"])
        except Exception:  # noqa: BLE001 - keep going: the session may be gone already
            log.warning("could not end the rsync session of %s", task["id"], exc_info=True)
        if task.get("current_cycle"):
            try:
                self.tree(task["id"]).discard_cycle(int(task["current_cycle"]))
            except Exception:  # noqa: BLE001
                log.warning(
                    "could not discard cycle %s of %s", task["current_cycle"], task["id"], exc_info=True
                )

    # sources: operator view --------------------------------------------------------------------
    def _source(self, conn: Optional[sqlite3.Connection], ref: Any) -> Dict[str, Any]:
        if not isinstance(ref, str) or not ref:
            raise InvalidInput("source: is required")
        row = repo_sources.get(conn if conn is not None else self.store, ref)
        if row is None:
            raise NotFound(f"no source {ref!r}: see 'go2cloud_server source list'")
        return row

    def _latest_task(self, conn: Optional[sqlite3.Connection], source_id: str) -> Optional[Dict[str, Any]]:
        return repo_tasks.latest_of_source(conn if conn is not None else self.store, source_id)

    def _active_task(self, conn: Optional[sqlite3.Connection], source_id: str) -> Optional[Dict[str, Any]]:
        return repo_tasks.latest_of_source_in(conn if conn is not None else self.store, source_id,
                                              OPEN_TASK_STATUSES)

    def is_offline(self, src: Mapping[str, Any], now: Optional[float] = None) -> bool:
        now = self.now() if now is None else now
        last = src["last_seen_epoch"] or src["imported_epoch"]
        return now - last > OFFLINE_AFTER_INTERVALS * self.heartbeat_interval

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

    def _source_view(self, src: Mapping[str, Any]) -> Dict[str, Any]:
        task = self._latest_task(None, src["id"])
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
        wg_id = self._workgroup(None, wg_ref)["id"] if wg_ref else None
        rows = repo_sources.list_all(self.store, wg_id)
        return {"sources": [self._source_view(r) for r in rows]}

    def show_source(self, ref: str) -> Dict[str, Any]:
        src = self._source(None, ref)
        view = self._source_view(src)
        hb = loads(src["heartbeat"], None) or {}
        task = self._latest_task(None, src["id"])
        view["inventory"] = loads(src["inventory"], {})
        view["task"] = self._task_view(task) if task else None
        view["agent"] = {k: hb.get(k) for k in ("state", "phase", "cycle", "task_id", "last_error", "load",
                                                  "loops", "retry")}
        view["progress"] = hb.get("progress")
        lease = self._lease_of(src)
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
            src = self._source(conn, ref)
            wg = self._workgroup(conn, body.get("workgroup"))
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
        return self._source_view(self._source(None, ref))

    def disassociate(self, ref: str) -> Dict[str, Any]:
        with self.store.transaction() as conn:
            src = self._source(conn, ref)
            task = self._active_task(conn, src["id"])
            if task is not None:
                raise Conflict(
                    f"source {src['id']} has an active migration task {task['id']} ({task['status']}): "
                    "complete or cancel it first"
                )
            repo_sources.set_workgroup(conn, src["id"], None)
        return self._source_view(self._source(None, ref))

    # agent API -----------------------------------------------------------------------------------
    def agent_source(self, source_id: str) -> Dict[str, Any]:
        """The source an agent request is for; 404 source_unknown / 410 source_replaced."""
        row = repo_sources.get(self.store, source_id)
        if row is None:
            raise SourceUnknown(f"source {source_id} does not exist: import again")
        if row["state"] != "active":
            raise SourceReplaced(f"source {source_id} was replaced or deleted: import again")
        return row

    # fencing: one live agent session per source (go2cloud_server.lease) -------------------------
    @property
    def lease_ttl(self) -> float:
        return LEASE_INTERVALS * self.heartbeat_interval

    @staticmethod
    def _lease_of(row: Mapping[str, Any]) -> Lease:
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
    def _save_lease(conn: sqlite3.Connection, source_id: str, lease: Lease) -> None:
        doc = {"epoch": lease.epoch, "session_id": lease.session_id, "instance": lease.instance,
               "fingerprint": lease.fingerprint, "expires": lease.expires, "granted_at": lease.granted_at}
        repo_sources.save_lease(conn, source_id, dumps(doc), lease.epoch)

    def _flag_clone(self, conn: sqlite3.Connection, source_id: str, code: str, message: str) -> None:
        """The operator's clone warning on the source (``source show``) and a warning event."""
        log.warning("source %s: %s", source_id, message)
        repo_sources.set_clone_warning(
            conn, source_id, dumps({"time": self.now_iso(), "code": code, "message": message[:2000]}))
        self._event(conn, source_id, "warning", code, message)

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
            cur = self._lease_of(src)
            decision = open_lease(cur, session_id=session_id, instance=instance, fingerprint=fingerprint,
                                  now=now, ttl=self.lease_ttl)
            host = str((loads(src["inventory"], {}) or {}).get("hostname") or "")[:64]
            if decision.granted:
                lease = decision.lease
                self._save_lease(conn, source_id, lease)
                with self._fence_lock:
                    self._contenders.pop(key, None)
                if decision.outcome == GRANT_TAKEN_OVER:
                    self._event(conn, source_id, "info", "session_taken_over",
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
                    final = now - first >= conflict_after(self.heartbeat_interval)
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
        cur = self._lease_of(row)
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
                renewed = renew(self._lease_of(row or {}), instance, now=self.now(), ttl=self.lease_ttl)
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
            "heartbeat_interval": self.heartbeat_interval,
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
        deadline = monotonic() + max(0.0, wait)
        with self.commands_cv:
            while True:
                cmds = self._pending_commands(source_id)
                remaining = deadline - monotonic()
                if cmds or remaining <= 0 or self._closed:
                    return {"commands": cmds}
                self.commands_cv.wait(remaining)

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
                self._apply_final(cmd)
            return {}
        if status == "accepted":
            if cmd["type"] == "start":
                self._start_taken(cmd)
            return {}
        log.info(
            "command %s (%s) of %s acknowledged %s%s",
            command_id,
            cmd["type"],
            source_id,
            status,
            f" ({error_code})" if error_code else "",
        )
        self._apply_final({**cmd, "status": status, "error_code": error_code, "message": message,
                           "result": dumps(result or {})})
        return {}

    def _apply_final(self, cmd: Mapping[str, Any]) -> None:
        """Apply a command's final acknowledgement (stored with ``applied = 0``), then mark it
        applied. Idempotent: the cycle commit and retention are, and one lock per task keeps a
        retried acknowledgement from applying it twice at the same time."""
        with self._block_lock:
            key = str(cmd["task_id"] or cmd["id"])
            lock = self._apply_locks.get(key)
            if lock is None:
                lock = self._apply_locks[key] = threading.Lock()
        with lock:
            applied = repo_commands.is_applied(self.store, cmd["id"])
            if applied is None or applied:
                return
            self._on_command_final(cmd, cmd["status"], cmd["error_code"], cmd["message"],
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
                self._apply_final(cmd)
            except Exception as exc:  # noqa: BLE001 - one task's bad state never stops the server
                what = f"the {cmd['type']} acknowledgement cannot be applied"
                self.fail_at_start(cmd["task_id"], what, exc)
        return len(rows)

    def _start_taken(self, cmd: Mapping[str, Any]) -> None:
        """The agent accepted the ``start`` queued after a passed drill: the task is syncing now."""
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, cmd["task_id"])
            if task is not None and task["status"] == "drill_passed":
                self._set_task(conn, cmd["task_id"], status="syncing")

    def _on_command_final(
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
            self._on_drill_final(cmd, status, error_code, message, result)
            return
        cycle = params.get("cycle") if ctype in CYCLE_COMMANDS else None
        number = int(cycle["number"]) if isinstance(cycle, dict) and cycle.get("number") else None
        if status != "succeeded":
            if ctype in CYCLE_COMMANDS and error_code == TARGET_FULL:
                if not self._superseded_cycle(cmd):
                    self.mark_target_full(task_id, f"the agent reported: {message or 'target full'}")
                return
            if ctype in CYCLE_COMMANDS:
                with self.store.transaction() as conn:
                    task = repo_tasks.get(conn, task_id)
                    open_ = ("syncing", "pending", "paused", "drill_passed", TARGET_FULL)
                    if task and task["status"] in open_:
                        self._set_task(
                            conn,
                            task_id,
                            status="failed",
                            finalizing=0,
                            error_code=error_code or "replication_failed",
                            error_message=message or f"{ctype} command {status}",
                        )
            else:
                with self.store.transaction() as conn:
                    self._set_task(
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
                rows = self._commit_cycle(task, number)
            except Exception as exc:  # noqa: BLE001 - reported to the operator as the task's error
                if is_disk_full(exc) or getattr(exc, "code", None) == TARGET_FULL:
                    self.mark_target_full(task_id, f"committing cycle {number}: {exc}")
                    return
                log.warning("committing cycle %d of %s failed: %s", number, task_id, exc)
                log.debug("commit failure", exc_info=True)
                with self.store.transaction() as conn:
                    self._set_task(
                        conn,
                        task_id,
                        status="failed",
                        finalizing=0,
                        error_code="target_commit_failed",
                        error_message=f"the target could not record cycle {number}: {exc}",
                    )
                return
            removed = self._retain(task, int(task["keep_images"]), just_committed=number)
        mixed = self.mixed_writers(task_id, number) if number is not None else None
        if mixed:  # fenced: never verified (the verifier refuses it too, after a restart)
            log.warning("task %s: %s", task_id, mixed)
            rows = [self._refused_row(row, mixed) for row in rows]
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
            self._set_task(conn, task_id, **changes)
        for row in rows:  # block generations: verified in the background, after this answer
            if row["disk"] and row["sha256"] is None and number is not None and not mixed:
                self.verifier.submit(task_id, number, row["disk"])
        if finished:
            self._release_target(dict(task, current_cycle=None))
            log.info("task %s completed", task_id)

    def _commit_cycle(self, task: Mapping[str, Any], number: int) -> List[Dict[str, Any]]:
        """Commit cycle ``number`` on the target; the artifact rows to record (one per disk for a
        block task, one for a file task)."""
        if task["mode"] != "block":
            self.rsyncd.close_task(task["id"])  # nothing writes into a cycle once it is committed
            art = self.tree(task["id"]).commit_cycle(number)
            return [
                {
                    "disk": "",
                    "path": str(art.path),
                    "bytes": int(art.bytes),
                    "files": int(art.files),
                    "created_at": str(art.created_at),
                    "sha256": None,
                    "report": None,
                }
            ]
        # the images only (a reflink is instant): their sha256 and check are the verifier's job,
        # the agent's acknowledgement must not wait for them
        return [self._generation_row(rec) for rec in self.block_store(task["id"]).commit_cycle(number)]

    def _generation_row(self, rec: Mapping[str, Any]) -> Dict[str, Any]:
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
    def _refused_row(row: Dict[str, Any], reason: str) -> Dict[str, Any]:
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
        mixed = self.mixed_writers(task_id, cycle)
        if mixed:  # written by two sessions: never verified, whatever its checks would say
            with self.store.transaction() as conn:
                row = repo_artifacts.generation(conn, task_id, cycle, disk)
                if row is not None:
                    repo_artifacts.refuse_verification(conn, task_id, cycle, disk,
                                                       self._refused_row(row, mixed)["report"])
            return
        with self._block_lock:  # not cached again for a task that ended meanwhile
            bs = self._block_stores.get(task_id) or self.block_store_factory(self.block_root(task_id))
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
        row = self._generation_row(rec)
        with self.store.transaction() as conn:
            repo_artifacts.set_verified(conn, task_id, cycle, disk, row["bytes"], row["sha256"],
                                        row["report"])

    def _retain(self, task: Mapping[str, Any], keep: int, just_committed: Optional[int] = None) -> List[int]:
        if task["mode"] == "block":
            return list(self.block_store(task["id"]).retain(keep))
        # file images: what is committed comes from the database (the tree is the source's to write)
        committed = repo_artifacts.committed_cycles(self.store, task["id"])
        if just_committed is not None:
            committed.add(just_committed)
        return list(self.tree(task["id"]).retain(keep, sorted(committed)))

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
            "target": self.target(task),
            "status": task["status"],
            "cycle": cycle,
        }
        if task["mode"] == "block":
            doc["disks"] = loads(task["disks"], [])
            doc["snapshot"] = task["snapshot"]
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

    # tasks ---------------------------------------------------------------------------------------
    def _set_task(self, conn: sqlite3.Connection, task_id: str, **changes: Any) -> None:
        changes["updated_at"] = self.now_iso()
        if "status" in changes:  # the status history: [{"status", "at"}], a change appended once
            row = repo_tasks.status_and_history(conn, task_id)
            if row is not None and row["status"] != changes["status"]:
                history = loads(row["history"], [])
                history.append({"status": changes["status"], "at": changes["updated_at"]})
                changes["history"] = dumps(history[-100:])
        repo_tasks.update(conn, task_id, changes)

    def _queue(
        self,
        conn: sqlite3.Connection,
        source_id: str,
        task_id: Optional[str],
        ctype: str,
        params: Mapping[str, Any],
    ) -> str:
        cid = rand_id("c-", 16)
        repo_commands.insert(conn, cid, source_id, task_id, ctype, dumps(params), self.now_iso())
        return cid

    def _artifacts(self, task_id: str) -> List[Dict[str, Any]]:
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

    def _task_view(self, task: Mapping[str, Any]) -> Dict[str, Any]:
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
            "artifacts": self._artifacts(task["id"]),
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
        if mode == "file":
            if body.get("disks") is not None:
                raise InvalidInput("disks: only for mode block (file mode migrates paths; use mode block)")
            if body.get("snapshot") is not None:
                raise InvalidInput("snapshot: only for mode block")
        else:
            if body.get("paths") is not None:
                raise InvalidInput("paths: only for mode file (mode block migrates disks: give disks)")
            if body.get("disks") is None:
                raise InvalidInput("disks: required for mode block (absolute paths of devices or images)")
        return {
            "mode": mode,
            "disks": rules.disks(body.get("disks")),
            "snapshot": rules.snapshot(body.get("snapshot")) if mode == "block" else None,
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
            wg = self._workgroup(None, workgroup)
            source_ids = repo_sources.ids_in_workgroup(self.store, wg["id"])
        else:
            source_ids = [self._source(None, source)["id"]]
        out: Dict[str, List[Dict[str, Any]]] = {"started": [], "skipped": [], "not_migratable": []}
        for sid in source_ids:
            kind, entry = self._start_one(sid, params)
            out[kind].append(entry)
        if source is not None and not out["started"]:
            entry = (out["skipped"] + out["not_migratable"])[0]
            raise NothingStarted(f"cannot start a migration of {entry['source_id']}: {entry['reason']}")
        if out["started"]:
            self._notify()
        return out

    def _start_one(self, source_id: str, params: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        task_id = rand_id("t-", 16)
        password = secrets.token_urlsafe(24)
        tree = self.tree(task_id)
        with self.store.transaction() as conn:
            src = self._source(conn, source_id)
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
            if self.is_offline(src):
                return "not_migratable", {
                    "source_id": source_id,
                    "reason": f"offline (last heartbeat {src['last_seen_at'] or 'never'})",
                }
            active = self._active_task(conn, source_id)
            if active is not None:
                return "skipped", {
                    "source_id": source_id,
                    "reason": f"already has migration task {active['id']} ({active['status']})",
                }
            wg = repo_workgroups.brief(conn, src["workgroup_id"])
            # block mode is never refused for the whole source: the backend is decided per disk
            # when the task starts, and the drill checks it (see the snapshot check)
            block = params["mode"] == "block"
            paths = [] if block else (params["paths"] or default_paths(loads(src["inventory"], {})))
            disks = rules.disk_names(params["disks"]) if block else []
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
                "block_token": secrets.token_urlsafe(32) if block else None,
                "bandwidth_mbps": params["bandwidth_mbps"],
                "compression": params["compression"],
                "checksum": int(params["checksum"]),
                "sync_every_s": params["sync_every_s"],
                "keep_images": params["keep_images"],
                "status": status,
                "rsync_password": "" if block else password,
                "created_at": now,
                "updated_at": now,
                "history": dumps([{"status": status, "at": now, **snapshot_choice(params, now)}]),
                "bandwidth_schedule": params["bandwidth_schedule"],
            })
            task = repo_tasks.get(conn, task_id)
            assert task is not None
            if not block:
                tree.prepare_cycle(1)
            if params["drill"]:
                cid = self._queue_drill(conn, task)
            else:
                cid = self._queue_start(conn, task)
        log.info(
            "task %s started for source %s (%s %s)",
            task_id,
            source_id,
            "disks" if disks else "paths",
            ", ".join([d["path"] for d in disks] or paths),
        )
        return "started", {"source_id": source_id, "task_id": task_id, "command_id": cid}

    @staticmethod
    def _scope_params(task: Mapping[str, Any]) -> Dict[str, Any]:
        """What a task migrates, as the ``start`` and ``drill`` commands carry it."""
        params: Dict[str, Any] = {"task_id": task["id"], "mode": task["mode"]}
        if task["mode"] == "block":
            params.update(disks=loads(task["disks"], []), snapshot=task["snapshot"])
        else:
            params["paths"] = loads(task["paths"], [])
        return params

    def _start_params_of(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        """The ``start`` command's parameters, from the task row (its first cycle)."""
        cmd_params = self._scope_params(task)
        cmd_params.update(
            {
                "bandwidth_mbps": task["bandwidth_mbps"],
                "bandwidth_schedule": task["bandwidth_schedule"],
                "compression": task["compression"],
                "checksum": bool(task["checksum"]),
                "target": self.target(task),
                "cycle": cycle_spec(int(task["current_cycle"] or 1), task["last_committed"]),
            }
        )
        return cmd_params

    def _queue_start(self, conn: sqlite3.Connection, task: Mapping[str, Any]) -> str:
        return self._queue(conn, task["source_id"], task["id"], "start", self._start_params_of(task))

    # the drill -------------------------------------------------------------------------------------
    def _drill_params(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        """The ``drill`` command's parameters: what will be migrated and where the target is (its
        address only: a drill needs no password or token)."""
        params = self._scope_params(task)
        target = self.target(task)
        params["target"] = {k: v for k, v in target.items() if k not in ("password", "token", "user")}
        return params

    def _queue_drill(self, conn: sqlite3.Connection, task: Mapping[str, Any]) -> str:
        cid = self._queue(conn, task["source_id"], task["id"], "drill", self._drill_params(task))
        repo_drills.insert(conn, cid, task["source_id"], task["id"], self.now_iso())
        self._set_task(conn, task["id"], status="drilling", drill_command=cid)
        return cid

    def _on_drill_final(
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
                self._set_task(conn, task["id"], status="drill_passed", error_code=None, error_message=None)
                self._queue_start(conn, task)
            else:
                first = next(i for i in report["items"] if i["severity"] == "critical")
                self._set_task(
                    conn,
                    task["id"],
                    status="drill_abnormal",
                    error_code="drill_abnormal",
                    error_message=f"drill: {report['summary']['critical']} critical item(s), "
                    f"first: {first['finding']}"[:2000],
                )
        log.info("drill %s of task %s: %s", cmd["id"], cmd["task_id"], "passed" if passed else "abnormal")
        if passed:
            self._notify()

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
            again = self._queue_drill(conn, task)
        log.warning(
            "drill %s of task %s was interrupted by the agent's restart: running it again (%s)",
            cmd["id"], cmd["task_id"], again,
        )
        self._notify()
        return True

    def _do_drill(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        """Re-run the drill (``drill_abnormal``), or with ``override`` start the task despite its
        critical items (``drill_abnormal``, or ``drilling`` when the report never comes)."""
        if params.get("override"):
            self._need(
                task, ("drill_abnormal", "drilling"), "override its drill (only before the first sync)"
            )
            repo_commands.supersede_if_queued(conn, task["drill_command"], self.now_iso())
            override = {
                "by": params.get("by") or "operator",
                "at": self.now_iso(),
                "drill": task["drill_command"],
            }
            self._set_task(
                conn,
                task["id"],
                status="drill_passed",
                drill_override=dumps(override),
                error_code=None,
                error_message=None,
            )
            log.warning("task %s: drill overridden by %s", task["id"], override["by"])
            return self._queue_start(conn, task)
        if task["status"] == "drilling":
            raise Conflict(f"the drill of task {task['id']} is running: wait for its report")
        self._need(task, ("drill_abnormal",), "re-run its drill (the drill runs before the first sync)")
        return self._queue_drill(conn, task)

    def source_drill(self, ref: str) -> Dict[str, Any]:
        """The latest drill of a source: status, report, and the task's override."""
        src = self._source(None, ref)
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

    # migration actions ---------------------------------------------------------------------------
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
            wg = self._workgroup(None, workgroup)
            source_ids = repo_sources.ids_in_workgroup(self.store, wg["id"])
        else:
            source_ids = [self._source(None, source)["id"]]
        out: Dict[str, List[Dict[str, Any]]] = {"affected": [], "skipped": []}
        for sid in source_ids:
            task = self._active_task(None, sid)
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
            cid = getattr(self, f"_do_{action}")(conn, task, params, after)
        for fn in after:
            fn()
        if cid:
            self._notify()
            log.info("task %s: %s (command %s)", task_id, action, cid)
        return cid

    @staticmethod
    def _need(task: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
        if task["status"] not in allowed:
            raise Conflict(f"task {task['id']} is {task['status']}: cannot {what}")

    def _do_modify(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self._need(task, OPEN_TASK_STATUSES, "modify it")
        changes = dict(params)
        if "checksum" in changes:
            changes["checksum"] = int(changes["checksum"])
        self._set_task(conn, task["id"], **changes)
        agent_fields = {k: params[k] for k in _AGENT_OPTIONS if k in params}
        if "keep_images" in params:
            keep, tid = int(params["keep_images"]), task["id"]
            after.append(lambda: self._apply_retention(tid, keep))
        if not agent_fields or task["status"] in ("drilling", "drill_abnormal"):
            return None  # before the start: the start command is built from the task then
        return self._queue(
            conn, task["source_id"], task["id"], "modify", {"task_id": task["id"], **agent_fields}
        )

    def _apply_retention(self, task_id: str, keep: int) -> None:
        task = repo_tasks.get(self.store, task_id)
        if task is None:
            return
        removed = self._retain(task, keep)
        if removed:
            with self.store.transaction() as conn:
                for n in removed:
                    repo_artifacts.delete_cycle(conn, task_id, n)

    def _do_pause(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self._need(task, ("syncing", "pending"), "pause it")
        if task["finalizing"] and not task["current_cycle"]:
            raise Conflict(f"task {task['id']} is completing: cannot pause it")
        self._set_task(conn, task["id"], status="paused", paused_from=task["status"])
        return self._queue(conn, task["source_id"], task["id"], "pause", {"task_id": task["id"]})

    def _do_resume(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self._need(task, ("paused",), "resume it (only a paused task can be resumed)")
        status = "syncing" if task["current_cycle"] else "pending"
        self._set_task(conn, task["id"], status=status, paused_from=None)
        return self._queue(conn, task["source_id"], task["id"], "resume", {"task_id": task["id"]})

    def _next_cycle(self, conn: sqlite3.Connection, task: Mapping[str, Any]) -> Dict[str, Any]:
        number = task["current_cycle"] or (task["last_committed"] or 0) + 1
        if task["mode"] != "block":
            self.tree(task["id"]).prepare_cycle(number)
        self._set_task(conn, task["id"], current_cycle=number)
        return cycle_spec(number, task["last_committed"])

    def _do_sync(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        if task["status"] == "syncing":
            raise Conflict(f"task {task['id']} is already syncing: wait for the cycle to finish")
        self._need(task, ("pending", "failed", TARGET_FULL), "sync it")
        if task["status"] == TARGET_FULL and task["finalizing"]:
            # the final sync stopped on a full target: it runs again (the agent's finalize)
            cycle = self._next_cycle(conn, task)
            self._set_task(conn, task["id"], status="syncing", error_code=None, error_message=None)
            return self._queue(
                conn, task["source_id"], task["id"], "finalize", {"task_id": task["id"], "cycle": cycle}
            )
        if task["finalizing"]:
            raise Conflict(f"task {task['id']} is completing: no more syncs")
        cycle = self._next_cycle(conn, task)
        self._set_task(conn, task["id"], status="syncing", error_code=None, error_message=None)
        return self._queue(
            conn, task["source_id"], task["id"], "sync", {"task_id": task["id"], "cycle": cycle}
        )

    def _do_complete(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        if task["status"] == "syncing":
            raise Conflict(f"task {task['id']} is syncing: wait until it is pending, then complete")
        self._need(task, ("pending",), "complete it (it must be pending)")
        if task["finalizing"]:
            raise Conflict(f"task {task['id']} is already completing")
        cycle = None
        if params.get("final_sync"):
            cycle = self._next_cycle(conn, task)
            self._set_task(conn, task["id"], status="syncing", finalizing=1)
        else:
            self._set_task(conn, task["id"], finalizing=1)
        return self._queue(
            conn, task["source_id"], task["id"], "finalize", {"task_id": task["id"], "cycle": cycle}
        )

    def _do_cancel(
        self,
        conn: sqlite3.Connection,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        after: List[Callable[[], None]],
    ) -> Optional[str]:
        self._need(task, OPEN_TASK_STATUSES, "cancel it")
        repo_drills.cancel_running(conn, task["id"], self.now_iso())
        self._set_task(
            conn, task["id"], status="cancelled", finalizing=0, current_cycle=None, finished_at=self.now_iso()
        )
        repo_commands.supersede_queued(conn, task["id"], self.now_iso())
        snapshot = dict(task)
        after.append(lambda: self._release_target(snapshot))
        return self._queue(conn, task["source_id"], task["id"], "abort", {"task_id": task["id"]})

    # migration views -----------------------------------------------------------------------------
    def _wg_status(self, wg_id: str) -> str:
        statuses: List[str] = []
        for source_id in repo_sources.ids_in_workgroup(self.store, wg_id):
            task = self._latest_task(None, source_id)
            if task is not None and task["status"] != "cancelled":
                statuses.append(task["status"])
        return workgroup_status(statuses)

    def workgroup_migration(self, ref: str) -> Dict[str, Any]:
        wg = self._workgroup(None, ref)
        tasks: List[Dict[str, Any]] = []
        counts: Dict[str, int] = {}
        for src in repo_sources.list_all(self.store, wg["id"]):
            task = self._latest_task(None, src["id"])
            status = self.source_status(src, task)
            counts[status] = counts.get(status, 0) + 1
            if task is not None:
                view = self._task_view(task)
                view["source_status"] = status
                view["hostname"] = src["hostname"]
                tasks.append(view)
        return {
            "workgroup": {"id": wg["id"], "name": wg["name"]},
            "status": self._wg_status(wg["id"]),
            "source_status_counts": counts,
            "tasks": tasks,
        }

    def source_migration(self, ref: str) -> Dict[str, Any]:
        src = self._source(None, ref)
        rows = repo_tasks.all_of_source(self.store, src["id"])
        return {
            "source_id": src["id"],
            "hostname": src["hostname"],
            "source_status": self.source_status(src, rows[0] if rows else None),
            "status": rows[0]["status"] if rows else "not_started",
            "tasks": [self._task_view(t) for t in rows],
        }

    def task_artifacts(self, task_id: str) -> Dict[str, Any]:
        if not repo_tasks.exists(self.store, task_id):
            raise NotFound(f"no task {task_id!r}: see 'go2cloud_server migration show'")
        return {"task_id": task_id, "artifacts": self._artifacts(task_id)}

    # server start / scheduler ----------------------------------------------------------------------
    # a full target ------------------------------------------------------------------------------
    def check_room(self, task_id: str) -> None:
        """Refuse a data write (a block request, a new rsync session) with ``507 target_full``
        while the database's reserve is released and the filesystem has no room to take it back
        (``space.SpaceGuard``): the images must not eat the room the database is living on."""
        from go2cloud_server.blockstore import TargetFull

        why = self.space.refusal() if self.space is not None else None
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
        if self.space is not None and self.space.reserve_bytes:
            reserve = (f"; data writes resume once {human(self.space.reserve_bytes)} (the database's "
                       "reserve) plus a margin are free")
        return _clip(f"the target's storage is full: {describe(self.tree_root(task['id']))}{need}{reserve} "
                     f"({detail}). Nothing committed is lost: free space on the target (or move it with "
                     "'serve --target-dir' to a larger filesystem); the cycle resumes by itself, or run "
                     "'go2cloud_server migration sync'", 2000)

    def mark_target_full(self, task_id: str, detail: str) -> None:
        """The task's cycle stopped because the target is full: ``target_full`` with the reason
        (shown by ``migration show``, and an event on the source), its cycle kept for the resume
        (``resume_when_room``). The database's reserve is released first, so this write and every
        request after it succeed. Idempotent (the event once per episode)."""
        if self.space is not None:
            self.space.release(f"task {task_id}: {detail}")
        task = repo_tasks.get(self.store, task_id)
        if task is None or task["status"] in ("cancelled", "completed", "failed"):
            return
        reason = self._space_reason(task, detail)
        with self.store.transaction() as conn:
            task = repo_tasks.get(conn, task_id)
            if task is None or task["status"] not in ("syncing", "pending", "drill_passed", TARGET_FULL):
                return
            first = task["status"] != TARGET_FULL
            self._set_task(conn, task_id, status=TARGET_FULL, error_code=TARGET_FULL, error_message=reason)
        free = self._free_now(task_id)
        if free is not None:
            self._full_free[task_id] = free
            if first:
                self._event(conn, task["source_id"], "error", TARGET_FULL, f"task {task_id}: {reason}")
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

    def _superseded_cycle(self, cmd: Mapping[str, Any]) -> bool:
        """Whether a newer cycle command of the same task was queued after ``cmd`` (a late
        acknowledgement of a cycle the scheduler already resumed must not stop the new one)."""
        return repo_commands.newer_cycle_command(self.store, cmd["task_id"], cmd["id"])

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
        if not rows or (self.space is not None and self.space.refusal() is not None):
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
                self.task_action(task["id"], "sync")
            except ServerError as exc:
                log.info("task %s: not resumed after the full target: %s", task["id"], exc)
                continue
            where = describe(self.tree_root(task["id"]))
            with self.store.transaction() as conn:
                self._event(conn, task["source_id"], "info", "target_space_returned",
                            f"task {task['id']}: the target has room again ({where}): the cycle resumes")
            log.info("task %s: the target has room again (%s free): cycle queued again", task["id"],
                     human(free))
            resumed.append(task["id"])
        return resumed

    def _auto_retries_today(self, task: Mapping[str, Any]) -> int:
        return repo_events.count_since(self.store, task["source_id"], AUTO_RETRY_EVENT,
                                       iso(self.clock.now() - 86400), f"task {task['id']}:")

    def _auto_retry_view(self, task: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """``migration show``: the automatic retries of a task whose cycle failed for a transient
        cause (None for any other task)."""
        if task["status"] != "failed" or task["error_code"] not in TRANSIENT_CODES:
            return None
        done = self._auto_retries_today(task)
        due = self.auto_retry.due_at(parse_iso(task["updated_at"]), done)
        return {"retries_last_24h": done, "max_per_24h": self.auto_retry.per_day,
                "next_at": iso(due) if due is not None else None}

    def retry_transient_failures(self) -> List[str]:
        """The scheduler's check: each task whose cycle failed for a transient cause (network,
        control plane or target away: ``autoretry.TRANSIENT_CODES``) gets a ``sync`` queued once
        its backoff ran out, at most ``per_day`` times in 24 hours; each one is an event, and the
        last allowed one says that the next failure needs ``migration sync``."""
        queued: List[str] = []
        if self.auto_retry.per_day <= 0:
            return queued
        rows = repo_tasks.failed_with(self.store, TRANSIENT_CODES)
        now = self.clock.now()
        for task in rows:
            done = self._auto_retries_today(task)
            due = self.auto_retry.due_at(parse_iso(task["updated_at"]), done)
            if due is None or now < due:
                continue
            try:
                self.task_action(task["id"], "sync")
            except ServerError as exc:
                log.info("task %s: not retried automatically: %s", task["id"], exc)
                continue
            n = done + 1
            last = " (the last one today: if it fails again, run migration sync once the cause is fixed)" \
                if n >= self.auto_retry.per_day else ""
            with self.store.transaction() as conn:
                self._event(conn, task["source_id"], "warning", AUTO_RETRY_EVENT,
                            f"task {task['id']}: its cycle failed ({task['error_code']}: "
                            f"{(task['error_message'] or '')[:300]}); sync queued again automatically, "
                            f"retry {n} of {self.auto_retry.per_day} in 24 h{last}")
            log.warning("task %s: cycle failed with %s; sync queued again automatically (retry %d of %d "
                        "in 24 h)", task["id"], task["error_code"], n, self.auto_retry.per_day)
            queued.append(task["id"])
        return queued

    def restore_targets(self) -> int:
        """After a restart: the directory of every file task's running cycle exists again. One
        task whose state on disk is unusable fails with the reason; the others and the server
        go on (a source can write into its tree, so nothing found there may stop the server)."""
        rows = repo_tasks.with_status(self.store, OPEN_TASK_STATUSES)
        for task in rows:
            if task["mode"] == "block" or not task["current_cycle"]:
                continue  # the block receiver resolves active tasks from the database
            try:
                self.tree(task["id"]).prepare_cycle(int(task["current_cycle"]))
            except Exception as exc:  # noqa: BLE001 - that task's error, never the server's
                self.fail_at_start(task["id"], f"its cycle {task['current_cycle']} cannot be prepared", exc)
        return len(rows)

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
                self._set_task(
                    conn, task_id, status="failed", finalizing=0, error_code="target_state_invalid",
                    error_message=_clip(f"at server start, {what}: {exc}; run 'go2cloud_server migration "
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


def _clip(value: Any, n: int) -> str:
    return value[:n] if isinstance(value, str) else ""


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
                    "check": _clip(item.get("check"), 64) or "unknown",
                    "severity": severity,
                    "finding": _clip(item.get("finding"), 2000),
                    "fix": _clip(item.get("fix"), 2000),
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
        "mode": _clip(doc.get("mode"), 16) or None,
        "passed": summary["critical"] == 0,
        "summary": summary,
        "ran": status == "succeeded",
        "agent_version": _clip(doc.get("agent_version"), 64) or agent_version,
        "hostname": _clip(doc.get("hostname"), 255),
        "started_at": _clip(doc.get("started_at"), 40) or None,
        "finished_at": _clip(doc.get("finished_at"), 40) or None,
        "items": items,
    }


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
