"""A target strategy per replication mode: what a task's mode changes on the server, in one place.

:class:`TaskTarget` is the contract; :class:`FileTarget` (rsync into a tree of one directory per
cycle, ``go2cloud_server.artifacts``) and :class:`BlockTarget` (disk images in a block store,
``go2cloud_server.blockstore``) implement it. ``Targets.of(task)`` chooses the strategy once per
task from its ``mode`` (``Targets.for_mode`` for a start request); nothing else in the service
looks at the mode.

The contract, for a task row ``task``:

- ``check_start(body)`` refuses start options of the other mode; ``snapshot(body)`` is the
  snapshot backend the task records (None when the mode has none);
- ``new_task(params, inventory)``: the columns a new task gets from its mode (``paths``,
  ``disks``, ``block_token``, ``rsync_password``);
- ``scope(task)``: what the ``start`` and ``drill`` commands carry besides the task id and mode;
  ``agent_fields(task)``: what the agent's task document adds; ``describe(task)``: the target
  document the agent writes to (its credentials included);
- ``prepare_cycle(task_id, n)`` before the agent writes cycle ``n`` (idempotent; also after a
  restart, ``restore_cycle``); ``commit_cycle(task, n)`` makes it permanent and returns the artifact
  rows to record; ``retain(task, keep, just_committed)`` removes older committed cycles beyond
  ``keep`` and returns their numbers; ``release(task)`` ends the task's data sessions and discards
  its unfinished cycle (committed cycles stay). Release never raises;
- ``accepts_rsync`` / ``accepts_block``: which data path may write into the task.
"""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Generator, List, Mapping, Optional, Protocol

from go2cloud_server import rules
from go2cloud_server.errors import InvalidInput
from go2cloud_server.repositories import artifacts as repo_artifacts
from go2cloud_server.store import loads

if TYPE_CHECKING:
    from go2cloud_server.service.targets import Targets

log = logging.getLogger(__name__)

#: filesystems whose mount points are migrated by default (file mode)
LOCAL_FSTYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "jfs", "reiserfs", "f2fs", "zfs"})


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

    def generation_report(self, disk: str, cycle: int) -> Optional[Dict[str, Any]]: ...

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


class TaskTarget(ABC):
    """The target of one mode (see the module's contract)."""

    mode: str = ""
    accepts_rsync = False
    accepts_block = False

    def __init__(self, targets: Targets) -> None:
        self.targets = targets

    @abstractmethod
    def check_start(self, body: Mapping[str, Any]) -> None: ...

    def snapshot(self, body: Mapping[str, Any]) -> Optional[str]:
        return None

    @abstractmethod
    def new_task(self, params: Mapping[str, Any], inventory: Mapping[str, Any]) -> Dict[str, Any]: ...

    @abstractmethod
    def scope(self, task: Mapping[str, Any]) -> Dict[str, Any]: ...

    def agent_fields(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        return {}

    @abstractmethod
    def describe(self, task: Mapping[str, Any]) -> Dict[str, Any]: ...

    @abstractmethod
    def prepare_cycle(self, task_id: str, n: int) -> None: ...

    def restore_cycle(self, task_id: str, n: int) -> None:
        """After a restart, before the agent writes again into running cycle ``n``."""
        self.prepare_cycle(task_id, n)

    @abstractmethod
    def commit_cycle(self, task: Mapping[str, Any], n: int) -> List[Dict[str, Any]]: ...

    @abstractmethod
    def retain(self, task: Mapping[str, Any], keep: int,
               just_committed: Optional[int] = None) -> List[int]: ...

    @abstractmethod
    def release(self, task: Mapping[str, Any]) -> None: ...


class FileTarget(TaskTarget):
    """File mode: the agent's rsync writes into ``<target>/tasks/<id>/tree/<cycle>`` (a tree per
    task, hard links to the previous cycle) through the rsync daemon's session of the task."""

    mode = "file"
    accepts_rsync = True

    def check_start(self, body: Mapping[str, Any]) -> None:
        if body.get("disks") is not None:
            raise InvalidInput("disks: only for mode block (file mode migrates paths; use mode block)")
        if body.get("snapshot") is not None:
            raise InvalidInput("snapshot: only for mode block")

    def new_task(self, params: Mapping[str, Any], inventory: Mapping[str, Any]) -> Dict[str, Any]:
        return {"paths": params["paths"] or default_paths(inventory), "disks": [], "block_token": None,
                "rsync_password": secrets.token_urlsafe(24)}

    def scope(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        return {"paths": loads(task["paths"], [])}

    def describe(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        svc = self.targets.svc
        return {
            "kind": "rsync",
            "url": f"{svc.public_url}/rsync/v1/tasks/{task['id']}",
            "fingerprint": svc.fingerprint,
            "module": task["id"],
            "user": task["id"],
            "password": task["rsync_password"],
        }

    def prepare_cycle(self, task_id: str, n: int) -> None:
        self.targets.tree(task_id).prepare_cycle(n)

    def commit_cycle(self, task: Mapping[str, Any], n: int) -> List[Dict[str, Any]]:
        self.targets.svc.rsyncd.close_task(task["id"])  # nothing writes into a cycle once it is committed
        art = self.targets.tree(task["id"]).commit_cycle(n)
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

    def retain(self, task: Mapping[str, Any], keep: int, just_committed: Optional[int] = None) -> List[int]:
        # what is committed comes from the database (the tree is the source's to write)
        committed = repo_artifacts.committed_cycles(self.targets.store, task["id"])
        if just_committed is not None:
            committed.add(just_committed)
        return list(self.targets.tree(task["id"]).retain(keep, sorted(committed)))

    def release(self, task: Mapping[str, Any]) -> None:
        """Remove the task's rsync module and its unfinished cycle (committed images are kept)."""
        try:
            self.targets.svc.rsyncd.close_task(task["id"])
        except Exception:  # noqa: BLE001 - keep going: the session may be gone already
            log.warning("could not end the rsync session of %s", task["id"], exc_info=True)
        if task.get("current_cycle"):
            try:
                self.targets.tree(task["id"]).discard_cycle(int(task["current_cycle"]))
            except Exception:  # noqa: BLE001
                log.warning(
                    "could not discard cycle %s of %s", task["current_cycle"], task["id"], exc_info=True
                )


class BlockTarget(TaskTarget):
    """Block mode: the agent sends the changed blocks of each disk to the block receiver, into the
    task's block store (``<target>/tasks/<id>/block``); a commit makes a generation per disk,
    verified later in the background (``Targets.verifier``)."""

    mode = "block"
    accepts_block = True

    def check_start(self, body: Mapping[str, Any]) -> None:
        if body.get("paths") is not None:
            raise InvalidInput("paths: only for mode file (mode block migrates disks: give disks)")
        if body.get("disks") is None:
            raise InvalidInput("disks: required for mode block (absolute paths of devices or images)")

    def snapshot(self, body: Mapping[str, Any]) -> Optional[str]:
        return rules.snapshot(body.get("snapshot"))

    def new_task(self, params: Mapping[str, Any], inventory: Mapping[str, Any]) -> Dict[str, Any]:
        # block mode is never refused for the whole source: the backend is decided per disk
        # when the task starts, and the drill checks it (see the snapshot check)
        return {"paths": [], "disks": rules.disk_names(params["disks"]),
                "block_token": secrets.token_urlsafe(32), "rsync_password": ""}

    def scope(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        return {"disks": loads(task["disks"], []), "snapshot": task["snapshot"]}

    def agent_fields(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        return self.scope(task)

    def describe(self, task: Mapping[str, Any]) -> Dict[str, Any]:
        svc = self.targets.svc
        return {
            "kind": "block",
            "url": f"{svc.public_url}/block/v1/tasks/{task['id']}",
            "token": task["block_token"],
            "fingerprint": svc.fingerprint,
        }

    def prepare_cycle(self, task_id: str, n: int) -> None:
        """Nothing: the block store starts a cycle at its first write."""

    def restore_cycle(self, task_id: str, n: int) -> None:
        """Nothing: the block receiver resolves active tasks from the database."""

    def commit_cycle(self, task: Mapping[str, Any], n: int) -> List[Dict[str, Any]]:
        # the generations only (a reflink, or a delta of what changed): their sha256 and check are
        # the verifier's job, the agent's acknowledgement must not wait for them
        store = self.targets.block_store(task["id"])
        return [self.targets.generation_row(rec) for rec in store.commit_cycle(n)]

    def retain(self, task: Mapping[str, Any], keep: int, just_committed: Optional[int] = None) -> List[int]:
        store = self.targets.block_store(task["id"])
        removed = list(store.retain(keep))
        if removed:  # the oldest kept generation may be a full image now (a fold): its row follows
            self.targets.refresh_generation_paths(task["id"], store)
        return removed

    def release(self, task: Mapping[str, Any]) -> None:
        """Discard the running cycle of the block store (committed generations stay); the receiver
        refuses the task's token from now on (it is no longer active)."""
        if task.get("current_cycle"):
            try:
                self.targets.block_store(task["id"]).discard_cycle(int(task["current_cycle"]))
            except Exception:  # noqa: BLE001
                log.warning(
                    "could not discard cycle %s of %s", task["current_cycle"], task["id"], exc_info=True
                )
        self.targets.forget_block_store(task["id"])
