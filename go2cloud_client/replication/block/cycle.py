"""One block-level sync cycle on the source: snapshots around the block engine.

For every disk of the task, before the cycle: pick the snapshot backend (``auto`` = the first of
the point-in-time backends :data:`~go2cloud_client.commands.AUTO_SNAPSHOT_ORDER` whose ``probe()``
says usable; with none, the cycle fails with :class:`SnapshotFailedError` naming the explicit
alternatives: ``auto`` never falls back to ``fsfreeze`` or ``live`` by itself; an explicit
``live`` in a *final* cycle on a mounted filesystem uses ``fsfreeze`` instead: freeze, read, thaw;
for an image file the frozen volume is the loop device it is mounted from), record the backend's
work directory (``state/snapshots/<task>/<disk>.<backend>``, kept between cycles: backends keep
their snapshot records and change-tracking bases there) in ``state/snapshots.json``
(:class:`SnapshotWorkdirs`) *before* creating the snapshot, create it, and hand the block engine
the snapshot's path and, for incremental cycles, the extents the backend says changed since the
previous cycle's change token. After the cycle, whatever happened (success, pause, cancel, abort,
error), every snapshot is released. An agent restart calls ``backend.recover(workdir)`` for every
listed work directory (a killed agent may have left a snapshot or a frozen filesystem);
``--abort`` and the end of the task call ``backend.purge(workdir)`` (also drops change-tracking
bases) and forget them. The change tokens of a successful cycle are returned to the task runner,
which persists them with the task (``state/task.json``) in the same write that records the cycle
as done.

The block engine (:mod:`go2cloud_client.replication.block.engine`) and the snapshot driver
(``snapshot_driver``) know nothing of each other; this module is the only place that joins them.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from go2cloud_client import platform
from go2cloud_client.commands import (
    AUTO_SNAPSHOT_ORDER,
    BlockTargetSpec,
    CycleSpec,
    DiskSpec,
    Options,
    alternatives_text,
)
from go2cloud_client.errors import ConfigError, ReplicationError, SnapshotFailedError
from go2cloud_client.home import Home
from go2cloud_client.replication.base import Replicator, TransferCancelled
from go2cloud_client.replication.block.engine import (
    BlockCycle,
    BlockOptions,
    BlockReplicator,
    BlockTarget,
    Disk,
)

LOG = logging.getLogger(__name__)

#: ``{disk name: {"backend": name, "token": opaque}}`` as kept in ``state/task.json``
Tokens = Dict[str, Dict[str, Any]]
ChangedExtents = Callable[[str], Optional[List[Tuple[int, int]]]]


class BlockEngine(Replicator["BlockCycle"], Protocol):
    """The block replicator a cycle drives: the replicator contract, plus new options (bandwidth,
    compression, checksum) applied to the running pass from any thread."""

    def set_options(self, options: BlockOptions) -> None:
        ...


class BlockReplicatorFactory(Protocol):
    """Builds the block engine of one cycle attempt over the disks' snapshots."""

    def __call__(self, *, target: BlockTargetSpec, disks: Sequence[Tuple[str, str]], options: Options,
                 state_dir: Path, on_progress: Callable[[Any], None],
                 changed_extents: ChangedExtents) -> BlockEngine:
        ...


def load_registry() -> Any:
    """``snapshot_driver.registry`` (imported late: the agent runs without it in file mode)."""
    try:
        from snapshot_driver import registry
    except ImportError as exc:
        raise SnapshotFailedError(
            "the snapshot driver (snapshot_driver) is not installed with this agent: block-level "
            "migration is not available"
        ) from exc
    return registry


def _snapshot_error(exc: BaseException, what: str) -> Exception:
    """A snapshot_driver error as an agent error: retryable ones are retried by the task runner."""
    code = getattr(exc, "code", None)
    text = f"{what}: {exc}" + (f" ({code})" if code else "")
    if getattr(exc, "retryable", False):
        return ReplicationError(text)
    return SnapshotFailedError(text)


# -- the list of live snapshot handles -----------------------------------------------------------


class SnapshotWorkdirs:
    """``state/snapshots.json``: the backends' work directories (``{backend, workdir, disk,
    volume, task_id}``). An entry is added before the first ``create()`` in a work directory and
    removed when the work directory is purged (task aborted or finished)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.path = home.state_dir / "snapshots.json"
        self._lock = threading.Lock()

    def entries(self) -> List[Dict[str, Any]]:
        try:
            doc = self.home.read_state(self.path) or {}
        except ConfigError:
            LOG.warning("%s is unreadable; snapshots it listed cannot be recovered", self.path)
            return []
        return [e for e in doc.get("snapshots") or [] if isinstance(e, dict) and e.get("workdir")]

    def add(self, entry: Mapping[str, Any]) -> None:
        with self._lock:
            items = [e for e in self.entries() if e["workdir"] != entry["workdir"]]
            items.append(dict(entry))
            self.home.write_state(self.path, {"snapshots": items})

    def remove(self, workdir: str) -> None:
        with self._lock:
            items = self.entries()
            kept = [e for e in items if e["workdir"] != workdir]
            if len(kept) != len(items):
                if kept:
                    self.home.write_state(self.path, {"snapshots": kept})
                else:
                    self.home.remove(self.path)


def recover_snapshots(home: Home, registry: Optional[Any] = None, *, purge: bool = False,
                      task_id: Optional[str] = None) -> List[str]:
    """Release what the snapshots listed in ``state/snapshots.json`` (of ``task_id``, or all) left
    on the host, with each backend's ``recover(workdir)`` (agent start: a killed agent may have
    left a snapshot or a frozen filesystem), or ``purge(workdir)`` with ``purge`` (``--abort``,
    task finished: change-tracking bases go too, and the work directory is forgotten). Returns
    what was released, for humans. Never raises: a failure is logged, reported and the entry
    stays listed for the next attempt."""
    workdirs = SnapshotWorkdirs(home)
    entries = [e for e in workdirs.entries() if task_id is None or e.get("task_id") == task_id]
    done: List[str] = []
    for entry in entries:
        workdir = Path(entry["workdir"])
        label = f"{entry.get('backend')} snapshot of disk {entry.get('disk')} ({entry.get('volume')})"
        try:
            reg = registry if registry is not None else load_registry()
            backend = reg.get(entry.get("backend"))
            released = (backend.purge(workdir) if purge else backend.recover(workdir)) if workdir.exists() \
                else []
        except Exception as exc:  # noqa: BLE001 - report and keep the entry for the next attempt
            LOG.warning("could not release the %s: %s", label, exc)
            done.append(f"could not release the {label}: {exc}")
            continue
        for item in released or []:
            done.append(f"released the {label}: {item}")
            LOG.info("released the %s: %s", label, item)
        if purge:
            shutil.rmtree(workdir, ignore_errors=True)
            workdirs.remove(str(workdir))
    return done


# -- progress ----------------------------------------------------------------------------------


def _as_dict(obj: Any) -> Dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


_DISK_KEYS = ("bytes_total", "bytes_done", "bytes_sent", "bytes_zero", "rate_bps", "eta_s", "state",
              "compression")


@dataclass
class BlockProgress:
    """The heartbeat form of the block engine's progress: totals plus one entry per disk (name,
    source path, bytes total / done / sent, zero bytes skipped, rate, ETA, state)."""

    raw: Any
    paths: Mapping[str, str]

    def to_dict(self) -> Dict[str, Any]:
        doc = _as_dict(self.raw)
        # the engine reports one PathProgress per disk whose ``path`` is the disk name
        disks_in = doc.get("disks") or doc.get("paths") or []
        disks = []
        for d in disks_in:
            d = _as_dict(d)
            name = d.get("name") or d.get("disk") or d.get("path")
            entry: Dict[str, Any] = {"name": name, "path": self.paths.get(str(name), d.get("path"))}
            for key in _DISK_KEYS:
                entry[key] = d.get(key)
            disks.append(entry)

        def total(key: str) -> Any:
            if doc.get(key) is not None:
                return doc[key]
            values = [d[key] for d in disks if d.get(key) is not None]
            return sum(values) if values else (0 if key != "eta_s" else None)

        out = {k: total(k) for k in ("bytes_total", "bytes_done", "bytes_sent", "bytes_zero", "rate_bps")}
        out["eta_s"] = doc.get("eta_s")
        out["disks"] = disks
        out["paths"] = []
        return out


# -- one cycle ---------------------------------------------------------------------------------


@dataclass
class _Held:
    disk: DiskSpec
    backend: str
    workdir: Path
    snapshot: Any


class BlockCycleRunner:
    """Runs block cycles for the task runner: snapshots, the engine, release."""

    def __init__(
        self,
        home: Home,
        *,
        replicator_factory: BlockReplicatorFactory,
        registry: Optional[Any] = None,
        mounted: Callable[[str], Optional[Tuple[str, str]]] = platform.mounted_device,
    ) -> None:
        self.home = home
        self._factory = replicator_factory
        self._registry = registry
        self._mounted = mounted
        self.workdirs = SnapshotWorkdirs(home)

    @property
    def registry(self) -> Any:
        if self._registry is None:
            self._registry = load_registry()
        return self._registry

    def state_dir(self, task_id: str) -> Path:
        """Where the block engine keeps the task's manifest and done-map (survives restarts)."""
        return self.home.state_dir / "block" / task_id

    def forget(self, task_id: str) -> List[str]:
        """The task is gone (completed, aborted): purge its snapshot work directories (bases
        included) and drop the engine's state. Returns what was released."""
        done = recover_snapshots(self.home, self._registry, purge=True, task_id=task_id)
        shutil.rmtree(self.home.state_dir / "snapshots" / task_id, ignore_errors=True)
        shutil.rmtree(self.state_dir(task_id), ignore_errors=True)
        return done

    def choose_backend(self, requested: str, disk: DiskSpec, kind: str) -> Tuple[str, str]:
        """(backend name, volume to snapshot) for ``disk`` in a cycle of ``kind``."""
        name = requested
        if requested == "auto":
            name = ""
            names = set(self.registry.names())
            why: List[str] = []
            for candidate in AUTO_SNAPSHOT_ORDER:
                if candidate not in names:
                    continue
                try:
                    probe = self.registry.get(candidate).probe(disk.path)
                except Exception as exc:  # noqa: BLE001 - a broken probe means "not usable"
                    LOG.info("snapshot backend %s: probe of %s failed: %s", candidate, disk.path, exc)
                    why.append(f"{candidate}: probe failed: {exc}")
                    continue
                if getattr(probe, "usable", False):
                    name = candidate
                    break
                why.append(str(getattr(probe, "reason", "")) or f"{candidate}: not usable")
                LOG.debug("snapshot backend %s not usable for %s: %s", candidate, disk.path,
                          getattr(probe, "reason", ""))
            if not name:
                raise SnapshotFailedError(
                    f"--snapshot auto: no point-in-time snapshot backend is usable for {disk.path} "
                    f"({'; '.join(why) or 'none known'}). Nothing was read. Choose explicitly: "
                    f"{alternatives_text()}; or make one of {', '.join(AUTO_SNAPSHOT_ORDER)} usable "
                    "and sync again")
            LOG.info("snapshot backend for %s: %s (auto, point in time)", disk.path, name)
        if name == "live" and kind == "final":
            mounted = self._mounted(disk.path)
            if mounted:
                device, mountpoint = mounted
                LOG.info("final sync of %s (mounted on %s from %s) with backend live: freezing the "
                         "filesystem for the pass (fsfreeze)", disk.path, mountpoint, device)
                return "fsfreeze", device
        return name, disk.path

    def _create(self, task_id: str, disk: DiskSpec, backend: str, volume: str) -> _Held:
        workdir = self.home.state_dir / "snapshots" / task_id / f"{disk.name}.{backend}"
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.workdirs.add({"backend": backend, "workdir": str(workdir), "disk": disk.name,
                         "volume": volume, "task_id": task_id})
        try:
            snap = self.registry.get(backend).create(volume, workdir)
        except Exception as exc:
            try:
                self.registry.get(backend).recover(workdir)
            except Exception:  # noqa: BLE001 - stays listed; the next start recovers it
                LOG.warning("cleaning up after the failed %s snapshot of %s failed", backend, volume,
                            exc_info=True)
            raise _snapshot_error(exc, f"snapshot of {disk.path} with backend {backend} failed") from exc
        LOG.info("snapshot of %s taken with backend %s (reads from %s)", disk.path, backend, snap.path())
        return _Held(disk, backend, workdir, snap)

    def _release(self, held: List[_Held]) -> None:
        errors = []
        for h in reversed(held):
            try:
                h.snapshot.release()
            except Exception as exc:  # noqa: BLE001 - release the others, then report
                LOG.error("releasing the %s snapshot of %s failed: %s", h.backend, h.disk.path, exc)
                errors.append((h, exc))
                continue
            LOG.info("snapshot of %s (%s) released", h.disk.path, h.backend)
        if errors:
            failed, first_exc = errors[0]
            raise _snapshot_error(first_exc, f"releasing the {failed.backend} snapshot of {failed.disk.path} "
                                             "failed (it stays listed; --abort or a restart tries again)")

    def run(
        self,
        *,
        task_id: str,
        cycle: CycleSpec,
        kind: str,
        disks: Sequence[DiskSpec],
        snapshot: str,
        tokens: Mapping[str, Mapping[str, Any]],
        target: BlockTargetSpec,
        options: Options,
        cancel: threading.Event,
        on_progress: Callable[[Any], None],
        on_replicator: Callable[[Optional[BlockEngine]], None] = lambda r: None,
        reverify: bool = False,
    ) -> Tuple[Dict[str, Any], Tokens]:
        """Run one cycle; returns (the cycle's result for the acknowledgement, the new change
        tokens). Raises TransferCancelled (this module's or the engine's) when ``cancel`` is set,
        the engine's ReplicationError, or SnapshotFailedError.

        ``reverify``: another agent session wrote to the target since this agent's base (a
        takeover, fencing): the change tracking and the journal of an interrupted pass are
        ignored, every chunk is read and hashed, and the target's image is verified against all
        of them (what differs is sent again), so the image equals the disk again."""
        incremental = kind != "full" or cycle.link_dest is not None
        if reverify:
            options = dataclasses.replace(options, checksum=True)
        held: List[_Held] = []
        ok = False
        try:
            for disk in disks:
                if cancel.is_set():
                    break
                backend, volume = self.choose_backend(snapshot, disk, kind)
                held.append(self._create(task_id, disk, backend, volume))
            by_name = {h.disk.name: h for h in held}

            def changed_extents(name: str) -> Optional[List[Tuple[int, int]]]:
                h = by_name.get(name)
                prev = tokens.get(name) or {}
                if (reverify or not incremental or h is None or not prev.get("token")
                        or prev.get("backend") != h.backend):
                    return None
                try:
                    extents = h.snapshot.changed_since(prev["token"])
                except Exception as exc:  # noqa: BLE001 - unknown changes: the engine hash-scans
                    LOG.warning("changed extents of %s unknown (%s); scanning by hash", h.disk.path, exc)
                    return None
                if extents is None:
                    return None
                return [(int(getattr(e, "offset", e[0] if isinstance(e, tuple) else 0)),
                         int(getattr(e, "length", e[1] if isinstance(e, tuple) else 0))) for e in extents]

            paths = {d.name: d.path for d in disks}
            replicator = self._factory(
                target=target,
                disks=[(h.disk.name, str(h.snapshot.path())) for h in held],
                options=options,
                state_dir=self.state_dir(task_id),
                on_progress=lambda p: on_progress(BlockProgress(p, paths)),
                changed_extents=changed_extents,
            )
            on_replicator(replicator)
            if cancel.is_set():
                raise TransferCancelled()
            result = replicator.run_cycle(_block_cycle(cycle.number, incremental, reverify), cancel)
            for h in held:  # still point in time (no fsfreeze watchdog, no COW overflow)?
                try:
                    h.snapshot.check()
                except Exception as exc:  # noqa: BLE001 - the cycle is not acknowledged; rerun it
                    raise ReplicationError(
                        f"the snapshot of {h.disk.path} ({h.backend}) stopped being point in time "
                        f"during the pass: {exc}; the cycle runs again") from exc
            new_tokens: Tokens = {}
            for h in held:
                try:
                    tok = h.snapshot.token()
                except Exception:  # noqa: BLE001 - no tracking next time: a hash scan
                    tok = None
                if tok:
                    new_tokens[h.disk.name] = {"backend": h.backend, "token": tok}
            doc = _as_dict(result)
            doc["cycle"] = cycle.number
            doc["snapshots"] = {h.disk.name: h.backend for h in held}
            if reverify:
                doc["reverified"] = True
            ok = True
            return doc, new_tokens
        finally:
            on_replicator(None)
            try:
                self._release(held)
            except Exception:
                if ok:
                    raise
                LOG.warning("snapshot release after an interrupted cycle failed", exc_info=True)


def _block_cycle(number: int, incremental: bool, reverify: bool = False) -> BlockCycle:
    return BlockCycle(number=number, incremental=incremental, reverify=reverify)


def default_block_factory(proxy: Optional[Any] = None) -> BlockReplicatorFactory:
    """The production factory: the block engine (:class:`BlockReplicator`); ``proxy``
    (:class:`go2cloud_client.proxy.ProxySettings`) decides how the target is reached."""

    def factory(*, target: BlockTargetSpec, disks: Sequence[Tuple[str, str]], options: Options,
                state_dir: Path, on_progress: Callable[[Any], None],
                changed_extents: ChangedExtents) -> BlockEngine:
        return BlockReplicator(
            target=BlockTarget(url=target.url, token=target.token, fingerprint=target.fingerprint,
                               epoch=target.epoch,
                               proxy=proxy.for_url(target.url) if proxy is not None else None),
            disks=[Disk(name=name, path=path) for name, path in disks],
            options=block_options(options),
            state_dir=state_dir,
            on_progress=on_progress,
            changed_extents=changed_extents,
        )

    return factory


def block_options(options: Options) -> BlockOptions:
    return BlockOptions(bandwidth_mbps=options.bandwidth_mbps, compression=options.compression,
                        checksum=options.checksum)
