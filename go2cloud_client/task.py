"""The task runner: one task at a time (mode ``file`` or ``block``), its sync cycles on a worker
thread.

State machine (``status`` in ``state/task.json``)::

    start/sync/finalize(cycle) -> running --success--> waiting   (finalize: completed, forgotten)
                                          --failure--> failed    (next ``sync`` tries again)
    running --pause--> paused --resume--> running (the interrupted cycle again)
    running --modify--> running (rsync restarted with the new options; same cycle)
    any --abort--> forgotten (the command that started the cycle is acknowledged failed)

The command that started a cycle is acknowledged when the cycle ends (``succeeded`` with the
cycle's result, or ``failed`` with an error code); other commands are answered at once. The task
file never holds the target password: when a cycle (re)starts without the ``start`` command at
hand the target is fetched again with ``fetch_task`` (``GET /tasks/{id}``). After an agent
restart a cycle that was running (not paused) is resumed automatically.

Mode ``block`` runs each cycle through :class:`~go2cloud_client.replication.block.cycle.BlockCycleRunner`
(snapshots of the disks around the block engine); the task file also keeps the disks, the
snapshot backend and each disk's change-tracking token of the last successful cycle, and
``modify`` changes the options of the running engine (``set_options``) without restarting it.

Bandwidth windows (``bandwidth_schedule``, :mod:`go2cloud_client.bwschedule`): the limit a
transfer gets is the schedule's limit now, in the source's local time. A timer thread (started
with the first task that has a schedule, ending when no task has one) wakes at each window edge
(and every 5 minutes) and applies a changed limit: the block engine's token bucket at once
(``set_options``), rsync by restarting the run with the new ``--bwlimit`` (same cycle; rsync
keeps what it already transferred, ``--partial``).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple, TypedDict, cast

from go2cloud_client import bwschedule
from go2cloud_client.backoff import Backoff, RetryBudget
from go2cloud_client.commands import (
    AnyTarget,
    BlockTargetSpec,
    Command,
    CycleSpec,
    DiskSpec,
    Options,
    TargetSpec,
    parse_task,
)
from go2cloud_client.console import human_bytes
from go2cloud_client.errors import (
    Go2CloudError,
    HomeFullError,
    ReplicationError,
    ServerError,
    ServerUnreachableError,
)
from go2cloud_client.home import Home
from go2cloud_client.replication.base import Replicator, TransferCancelled
from go2cloud_client.replication.rsync import Cycle

if TYPE_CHECKING:
    from go2cloud_client.replication.block.cycle import BlockCycleRunner, BlockEngine

LOG = logging.getLogger(__name__)

RUNNING, WAITING, PAUSED, FAILED, COMPLETED = "running", "waiting", "paused", "failed", "completed"
_PHASES = {"full": "full_sync", "incremental": "incremental_sync", "final": "final_sync"}
_KIND_LABEL = {"full": "Full sync", "incremental": "Incremental sync", "final": "Final sync"}
#: waits between attempts of a cycle: 2 s doubling to 60 s, jittered (docs/reliability.md, 5)
TRANSFER_BACKOFF = Backoff(initial=2.0, factor=2.0, cap=60.0, jitter=0.5)


class _TaskKeys(TypedDict):
    task_id: str
    #: the paths of a file task (a block task keeps them empty; its disks are in ``disks``)
    paths: List[str]
    #: :class:`~go2cloud_client.commands.Options` as a dict (``modify`` changes it)
    options: Dict[str, Any]
    #: running | waiting | paused | failed (the module text has the state machine)
    status: str


class TaskState(_TaskKeys, total=False):
    """``state/task.json``: the task the agent runs, exactly as written to disk (a plain dict at
    run time, so the file's bytes do not change; never the target password). ``version`` is the
    state file version :meth:`Home.read_state` checked; a task file of an older agent may lack
    the keys added since (``mode``, the block keys, ``base_epoch``): read them with ``get``."""

    version: int
    mode: Optional[str]  # file | block
    #: :class:`~go2cloud_client.commands.CycleSpec` as a dict while a cycle runs, is paused or
    #: will resume; None between cycles
    cycle: Optional[Dict[str, Any]]
    cycle_kind: Optional[str]  # full | incremental | final
    #: the command whose cycle this is (acknowledged when the cycle ends)
    cycle_command: Optional[str]
    last_cycle: Optional[int]
    last_result: Dict[str, Any]
    last_error: Optional[Dict[str, Any]]  # {"code", "message"}
    # block mode
    disks: List[Dict[str, str]]  # DiskSpec.to_dict()
    snapshot: Optional[str]  # the snapshot backend asked for (auto or a name)
    #: each disk's change-tracking token of the last successful cycle
    change_tokens: Dict[str, Dict[str, Any]]
    #: the agent session epoch the last committed cycle was written under (fencing)
    base_epoch: int


def _cycle_number(task: TaskState) -> Optional[int]:
    """The number of the task's cycle (running, paused or to resume); None between cycles."""
    cycle = task.get("cycle")
    return cycle["number"] if cycle else None


def _moved_bytes(progress: Any) -> int:
    """Bytes a progress report says were transferred (file: bytes_done; block: bytes_sent)."""
    if progress is None:
        return 0
    doc = progress.to_dict() if hasattr(progress, "to_dict") else progress
    if not isinstance(doc, dict):
        return 0
    value = doc.get("bytes_sent") or doc.get("bytes_done") or 0
    return int(value) if isinstance(value, (int, float)) else 0


@dataclass(frozen=True)
class Outcome:
    """The final answer to a command handled at once."""

    status: str  # succeeded | failed
    error_code: Optional[str] = None
    message: Optional[str] = None
    result: Optional[Dict[str, Any]] = None


def _ok(message: Optional[str] = None, **result: Any) -> Outcome:
    return Outcome("succeeded", None, message, result or {})


def _fail(code: str, message: str) -> Outcome:
    return Outcome("failed", code, message, {})


#: (cid, status, error_code, message, result) -> None; must not block for long.
AckFn = Callable[[str, str, Optional[str], Optional[str], Optional[Dict[str, Any]]], None]
#: (level, code, message) -> None
NotifyFn = Callable[[str, str, str], None]


class FileReplicatorFactory(Protocol):
    """Builds the file replicator of one cycle attempt (production:
    :func:`go2cloud_client.agent.default_replicator_factory`)."""

    def __call__(self, *, target: TargetSpec, paths: List[str], options: Options,
                 on_progress: Callable[[Any], None],
                 on_child: Callable[[Optional[int]], None]) -> Replicator[Cycle]:
        ...


class TaskRunner:
    def __init__(
        self,
        home: Home,
        *,
        replicator_factory: FileReplicatorFactory,
        fetch_task: Callable[[str], Dict[str, Any]],
        ack: AckFn,
        notify: NotifyFn = lambda level, code, message: None,
        on_progress: Callable[[Any], None] = lambda progress: None,
        on_child: Callable[[Optional[int]], None] = lambda pid: None,
        retry_budget_s: float = 1800.0,
        control_plane_budget_s: float = 3600.0,
        backoff: Backoff = TRANSFER_BACKOFF,
        control_plane_down: Callable[[], bool] = lambda: False,
        isdir: Callable[[str], bool] = os.path.isdir,
        join_timeout: float = 60.0,
        block_cycles: Optional[BlockCycleRunner] = None,
        epoch: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.time,
        zone: Optional[bwschedule.LocalZone] = None,
        proxy: Optional[Any] = None,
    ) -> None:
        self.home = home
        #: wall clock and time zone of the bandwidth windows (tests inject both)
        self._clock = clock
        self._zone = zone or bwschedule.LocalZone()
        #: the bandwidth window timer (see the module docstring) and the limit the transfer got
        self._windows: Optional[threading.Thread] = None
        self._windows_wake = threading.Event()
        self._windows_stop = threading.Event()
        self._in_force: Optional[int] = None
        #: the agent's proxy setting (:class:`go2cloud_client.proxy.ProxySettings`) for block data
        self._proxy = proxy
        #: the agent's session epoch now (fencing): stamped on the target of every cycle attempt
        self._epoch = epoch
        self._factory = replicator_factory
        self._fetch_task = fetch_task
        self._ack = ack
        self._notify = notify
        self._on_progress_cb = on_progress
        self._on_child = on_child
        self.retry_budget_s = retry_budget_s
        self.control_plane_budget_s = control_plane_budget_s
        self.backoff = backoff
        self._control_plane_down = control_plane_down
        #: the current cycle's retry (shown in heartbeats and status), None when not retrying
        self._retry: Optional[Dict[str, Any]] = None
        #: progress reported by the current attempt (an attempt that moved data resets the budget)
        self._moved = False
        self._attempt_first: Optional[int] = None
        #: a state file that could not be written (full home); written again by :meth:`persist`
        self._dirty = False
        self._isdir = isdir
        self._join_timeout = join_timeout
        self._lock = threading.RLock()
        self._task: Optional[TaskState] = None
        self._target: Optional[AnyTarget] = None
        self._block_cycles = block_cycles
        self._replicator: Optional[BlockEngine] = None  # the running block engine (modify calls set_options)
        self._worker: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        self._gen = 0
        self._progress: Any = None
        self._last_state = "idle"
        self._old: Optional[threading.Thread] = None

    @property
    def block_cycles(self) -> BlockCycleRunner:
        if self._block_cycles is None:
            from go2cloud_client.replication.block.cycle import BlockCycleRunner, default_block_factory

            self._block_cycles = BlockCycleRunner(self.home,
                                                  replicator_factory=default_block_factory(self._proxy))
        return self._block_cycles

    # -- persistence ------------------------------------------------------------------------

    def load(self, *, resume: bool = True) -> None:
        """Load ``state/task.json``; with ``resume`` restart a cycle that was running."""
        doc = cast(Optional[TaskState], self.home.read_state(self.home.task_file))
        with self._lock:
            self._task = doc
            if doc and doc.get("status") == RUNNING and doc.get("cycle") and resume:
                LOG.info("resuming task %s cycle %s after an agent restart",
                         doc["task_id"], _cycle_number(doc))
                label = _KIND_LABEL.get(doc.get("cycle_kind") or "", "Sync")
                self._notify("info", "cycle_resumed",
                             f"{label} of task {doc['task_id']} "
                             f"resumed after an agent restart (cycle {_cycle_number(doc)})")
                self._start_worker()

    def _save(self) -> None:
        if self._task is None:
            self.home.remove(self.home.task_file)
        else:
            self.home.write_state(self.home.task_file, self._task)
        self._dirty = False

    def _save_or_later(self) -> None:
        """Write the task file; if the home is full keep the change in memory (the cycle's result
        is acknowledged from the command journal meanwhile) and let :meth:`persist` write it later."""
        try:
            self._save()
        except HomeFullError as exc:
            self._dirty = True
            LOG.warning("%s (the task state is kept in memory until then)", exc)

    def persist(self) -> None:
        """Write the task file if an earlier write failed (called periodically by the agent)."""
        with self._lock:
            if self._dirty:
                self._save()

    # -- queries ----------------------------------------------------------------------------

    @property
    def task(self) -> Optional[TaskState]:
        with self._lock:
            return self._task.copy() if self._task else None

    def cycle_command(self) -> Optional[str]:
        """The command id whose cycle is running, paused or will resume (kept 'accepted')."""
        with self._lock:
            return self._task.get("cycle_command") if self._task and self._task.get("cycle") else None

    def is_running(self) -> bool:
        with self._lock:
            return self._worker is not None and self._worker.is_alive()

    def snapshot(self) -> Dict[str, Any]:
        """The task part of a heartbeat / status: state, task_id, phase, cycle, progress, last_error."""
        with self._lock:
            task = self._task
            if task is None:
                return {"state": self._last_state, "task_id": None, "phase": None, "cycle": None,
                        "progress": None, "last_error": None, "retry": None}
            status = task["status"]
            state = {RUNNING: "running", WAITING: "running", PAUSED: "paused",
                     FAILED: "failed"}.get(status, status)
            cycle = task.get("cycle")
            phase = _PHASES.get(task.get("cycle_kind") or "") if cycle else "waiting"
            progress = None
            if status == RUNNING and self._progress is not None:
                progress = self._progress.to_dict() if hasattr(self._progress, "to_dict") else self._progress
            last_error = task.get("last_error")
            retry = dict(self._retry) if self._retry and status == RUNNING else None
            if retry:
                last_error = {"code": retry["code"], "message": retry["message"], "retrying": True}
            return {
                "state": state, "task_id": task["task_id"], "phase": phase,
                "cycle": cycle["number"] if cycle else task.get("last_cycle"),
                "progress": progress, "last_error": last_error, "retry": retry,
                "bandwidth": self._bandwidth_view(Options(**task["options"])),
            }

    # -- bandwidth windows ------------------------------------------------------------------

    def _evaluator(self, options: Options) -> Optional[bwschedule.Evaluator]:
        if not options.bandwidth_schedule:
            return None
        try:
            schedule = bwschedule.parse(options.bandwidth_schedule)
        except bwschedule.ScheduleError:  # validated on receipt; a hand-edited task file
            LOG.warning("ignoring the task's bandwidth schedule %r", options.bandwidth_schedule,
                        exc_info=True)
            return None
        return bwschedule.Evaluator(schedule, options.bandwidth_mbps, zone=self._zone, clock=self._clock)

    def effective_options(self, options: Options) -> Options:
        """``options`` with the bandwidth limit of the window in force now."""
        ev = self._evaluator(options)
        if ev is None:
            return options
        return dataclasses.replace(options, bandwidth_mbps=ev.limit_now())

    def _bandwidth_view(self, options: Options) -> Dict[str, Any]:
        """What the heartbeat says about bandwidth: the limit now and the schedule's next change."""
        ev = self._evaluator(options)
        view: Dict[str, Any] = {"limit_mbps": options.bandwidth_mbps, "schedule": options.bandwidth_schedule}
        if ev is not None:
            view["limit_mbps"] = ev.limit_now()
            view["zone"] = self._zone.name()
            nxt = ev.next_change()
            if nxt is not None:
                view["next_change_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(nxt[0]))
                view["next_limit_mbps"] = nxt[1]
        return view

    def _ensure_windows_timer(self) -> None:
        """Start the window timer if the task has a schedule and none runs (caller holds the lock)."""
        self._windows_wake.set()
        if self._task is None or not self._task["options"].get("bandwidth_schedule"):
            return
        if self._windows is not None and self._windows.is_alive():
            return
        self._windows_stop.clear()
        self._windows = threading.Thread(target=self._windows_loop, name="bandwidth-windows", daemon=True)
        self._windows.start()

    def _windows_loop(self) -> None:
        LOG.info("bandwidth window timer started")
        while not self._windows_stop.is_set():
            self._windows_wake.clear()
            with self._lock:
                ev = self._evaluator(Options(**self._task["options"])) if self._task else None
                if ev is None:
                    self._windows = None
                    break
            try:
                self.apply_window()
            except Exception:  # noqa: BLE001 - the timer must outlive one failed application
                LOG.warning("could not apply the bandwidth window", exc_info=True)
            self._windows_wake.wait(ev.seconds_to_next_check())
        LOG.info("bandwidth window timer stopped")

    def apply_window(self) -> Optional[int]:
        """Give the running transfer the limit in force now if it has another one; returns the new
        limit when it changed something (block: the token bucket; file: rsync restarted)."""
        with self._lock:
            task = self._task
            if task is None or self._in_force is None or task.get("status") != RUNNING:
                return None
            now = self.effective_options(Options(**task["options"]))
            if now.bandwidth_mbps == self._in_force:
                return None
            was, self._in_force = self._in_force, now.bandwidth_mbps
            restart = False
            if task.get("mode") == "block":
                if self._replicator is not None:
                    self._set_block_options(self._replicator, now)
            else:
                restart = self._worker is not None
                if restart:
                    self._cancel_worker()
        if restart:
            self._restart_worker()
        def shown(mbps: int) -> str:
            return f"{mbps} Mbit/s" if mbps else "unlimited"

        self._notify("info", "bandwidth_window",
                     f"Bandwidth window: the limit is now {shown(now.bandwidth_mbps)}"
                     f" (was {shown(was)}; schedule {now.bandwidth_schedule}, "
                     f"local time {self._zone.name()})"
                     + ("; rsync restarted with the new limit" if restart else ""))
        return now.bandwidth_mbps

    def _restart_worker(self) -> None:
        """After :meth:`_cancel_worker`: wait for the old transfer, start the same cycle again."""
        self._join_old()
        with self._lock:
            if self._task is not None and self._task["status"] == RUNNING and self._worker is None:
                self._start_worker()

    # -- commands ---------------------------------------------------------------------------

    def handle(self, cmd: Command) -> Optional[Outcome]:
        """Apply a validated command. Returns the final outcome, or None when the command started
        a cycle (its final acknowledgement comes through ``ack`` when the cycle ends)."""
        handler = getattr(self, f"_cmd_{cmd.type}", None)
        if handler is None:
            return _fail("unsupported", f"command type {cmd.type!r} is not supported")
        return handler(cmd)

    def _mismatch(self, cmd: Command) -> Optional[Outcome]:
        if self._task is None:
            return _fail("task_unknown", f"this source has no task {cmd.task_id} (no task is active)")
        if self._task["task_id"] != cmd.task_id:
            return _fail("task_unknown", f"this source has no task {cmd.task_id} (active task: "
                                         f"{self._task['task_id']})")
        return None

    def _cmd_start(self, cmd: Command) -> Optional[Outcome]:
        assert cmd.cycle is not None and cmd.options is not None and cmd.target is not None
        assert cmd.task_id is not None
        with self._lock:
            if self._task is not None and self._task["task_id"] != cmd.task_id:
                return _fail("task_busy", f"task {self._task['task_id']} is still active on this source; "
                                          "cancel it before starting another")
        self._stop_worker()
        with self._lock:
            previous = self._task.get("cycle_command") if self._task else None
            task: TaskState = {
                "task_id": cmd.task_id, "mode": cmd.mode, "paths": list(cmd.paths),
                "options": cmd.options.to_dict(), "status": RUNNING, "cycle": cmd.cycle.to_dict(),
                "cycle_kind": "full", "cycle_command": cmd.id, "last_cycle": None, "last_error": None,
            }
            if cmd.mode == "block":
                task.update({"disks": [d.to_dict() for d in cmd.disks], "snapshot": cmd.snapshot,
                             "change_tokens": {}})
            self._task = task
            self._target = cmd.target
            self._save()
            self._start_worker()
        if previous and previous != cmd.id:
            self._ack(previous, "failed", "superseded", f"superseded by command {cmd.id}", {})
        return None

    def _begin_cycle(self, cmd: Command, kind: str) -> Optional[Outcome]:
        assert cmd.cycle is not None
        with self._lock:
            bad = self._mismatch(cmd)
            if bad:
                return bad
            assert self._task is not None
            status = self._task["status"]
            if status == RUNNING:
                return _fail("task_busy", f"cycle {_cycle_number(self._task)} of task "
                                          f"{cmd.task_id} is still running")
            if status == PAUSED:
                return _fail("task_paused", f"task {cmd.task_id} is paused; resume it first")
            if kind == "incremental" and self._task.get("last_cycle") is None:
                kind = "full"  # no cycle has completed yet: this sync is the full sync again
            self._task.update({"status": RUNNING, "cycle": cmd.cycle.to_dict(), "cycle_kind": kind,
                               "cycle_command": cmd.id})
            self._target = None  # fetched again (never stored)
            self._save()
            self._start_worker()
        return None

    def _cmd_sync(self, cmd: Command) -> Optional[Outcome]:
        return self._begin_cycle(cmd, "incremental")

    def _cmd_finalize(self, cmd: Command) -> Optional[Outcome]:
        if cmd.cycle is not None:
            return self._begin_cycle(cmd, "final")
        with self._lock:
            bad = self._mismatch(cmd)
            if bad:
                return bad
            assert self._task is not None
            if self._task["status"] == RUNNING:
                return _fail("task_busy", f"cycle {_cycle_number(self._task)} of task "
                                          f"{cmd.task_id} is still running")
            last = self._task.get("last_cycle")
            block = self._task.get("mode") == "block"
            task_id = self._task["task_id"]  # == cmd.task_id (checked above)
            self._forget(COMPLETED)
        if block:
            self.block_cycles.forget(task_id)
        self._notify("info", "task_completed", f"Task {cmd.task_id} completed (no final sync)")
        return _ok("task completed", last_cycle=last)

    def _cmd_pause(self, cmd: Command) -> Optional[Outcome]:
        with self._lock:
            bad = self._mismatch(cmd)
            if bad:
                return bad
            assert self._task is not None
            if self._task["status"] == PAUSED:
                return _ok("already paused")
            self._task["status"] = PAUSED
            self._save()
            self._cancel_worker()
        self._join_old()
        self._notify("info", "task_paused", f"Task {cmd.task_id} paused")
        return _ok("paused")

    def _cmd_resume(self, cmd: Command) -> Optional[Outcome]:
        with self._lock:
            bad = self._mismatch(cmd)
            if bad:
                return bad
            assert self._task is not None
            if self._task["status"] != PAUSED:
                return _ok(f"task is not paused (it is {self._task['status']})")
            if self._task.get("cycle"):
                self._task["status"] = RUNNING
                self._target = None
                self._save()
                self._start_worker()
                msg = f"resumed cycle {_cycle_number(self._task)}"
            else:
                self._task["status"] = FAILED if self._task.get("last_error") else WAITING
                self._save()
                msg = "resumed (no cycle was interrupted)"
        self._notify("info", "task_resumed", f"Task {cmd.task_id} {msg}")
        return _ok(msg)

    def _cmd_modify(self, cmd: Command) -> Optional[Outcome]:
        with self._lock:
            bad = self._mismatch(cmd)
            if bad:
                return bad
            assert self._task is not None
            options = dict(self._task["options"])
            options.update(cmd.changes)
            self._task["options"] = options
            self._save()
            if self._task.get("mode") == "block":
                if self._replicator is not None:
                    self._set_block_options(self._replicator, self.effective_options(Options(**options)))
                restart = False  # a block cycle that has no engine yet reads the options when it starts
            else:
                restart = self._task["status"] == RUNNING and self._worker is not None
            if restart:
                self._cancel_worker()
            if self._task.get("mode") == "block" and self._replicator is not None:
                self._in_force = self.effective_options(Options(**options)).bandwidth_mbps
            self._ensure_windows_timer()
        if restart:
            self._restart_worker()
        what = ", ".join(f"{k}={v}" for k, v in cmd.changes.items()) or "nothing"
        self._notify("info", "task_modified", f"Task {cmd.task_id} modified: {what}"
                     + (" (transfer restarted with the new options)" if restart else ""))
        return _ok("options applied", options=options)

    def _cmd_abort(self, cmd: Command) -> Optional[Outcome]:
        with self._lock:
            if self._task is None or self._task["task_id"] != cmd.task_id:
                return _ok(f"task {cmd.task_id} is not active here; nothing to abort")
            pending = self._task.get("cycle_command") if self._task.get("cycle") else None
            block = self._task.get("mode") == "block"
            task_id = self._task["task_id"]  # == cmd.task_id (checked above)
            self._cancel_worker()
            self._forget("idle")
        self._join_old()  # a block cycle releases its snapshots on the way out
        if block:
            self.block_cycles.forget(task_id)
        if pending:
            self._ack(pending, "failed", "task_aborted", "the task was aborted", {})
        self._notify("info", "task_aborted", f"Task {cmd.task_id} aborted; the agent forgot it")
        return _ok("aborted")

    def _forget(self, state: str) -> None:
        self._task = None
        self._target = None
        self._progress = None
        self._last_state = state
        self._save()

    # -- worker -----------------------------------------------------------------------------

    def _start_worker(self) -> None:
        """Start the cycle of the current task on a new worker (caller holds the lock)."""
        assert self._task is not None and self._task.get("cycle")
        self._gen += 1
        self._cancel = threading.Event()
        self._progress = None
        task = self._task
        options = self.effective_options(Options(**task["options"]))
        self._in_force = options.bandwidth_mbps
        cycle = task.get("cycle")
        assert cycle is not None
        args = (self._gen, self._cancel, task["task_id"], CycleSpec(**cycle), task.get("cycle_kind"),
                task.get("cycle_command"), tuple(task["paths"]), options)
        work = self._work_block if task.get("mode") == "block" else self._work
        self._worker = threading.Thread(target=work, args=args, name=f"cycle-{cycle['number']}",
                                        daemon=True)
        self._worker.start()
        self._ensure_windows_timer()

    def _cancel_worker(self) -> None:
        """Cancel the running worker (caller holds the lock); :meth:`_join_old` waits for it."""
        self._gen += 1
        self._cancel.set()
        self._old = self._worker
        self._worker = None
        self._replicator = None

    def _join_old(self) -> None:
        old = self._old
        if old is not None and old is not threading.current_thread():
            old.join(self._join_timeout)
            if old.is_alive():
                LOG.warning("the cancelled transfer did not stop within %ss", self._join_timeout)
        self._old = None

    def _stop_worker(self) -> None:
        with self._lock:
            self._cancel_worker()
        self._join_old()

    def shutdown(self) -> None:
        """Agent stopping: stop the transfer, keep the task as it is (a restart resumes it)."""
        self._windows_stop.set()
        self._windows_wake.set()
        self._stop_worker()

    def _current(self, gen: int, cancel: threading.Event) -> bool:
        return gen == self._gen and not cancel.is_set()

    def _progress_cb(self, gen: int) -> Callable[[Any], None]:
        def on_progress(progress: Any) -> None:
            with self._lock:
                if gen != self._gen:
                    return
                moved = _moved_bytes(progress)
                if self._attempt_first is None:
                    self._attempt_first = moved
                elif moved > self._attempt_first:
                    self._moved = True
                self._progress = progress
            self._on_progress_cb(progress)
        return on_progress

    def _resolve(self, task_id: str, paths: Tuple[str, ...], options: Options,
                 cancel: threading.Event) -> Tuple[Any, Tuple[str, ...], Options]:
        with self._lock:
            target = self._target
        if target is not None:
            return self._fenced(target), paths, options
        doc = self._fetch_task(task_id)
        status = doc.get("status")
        if status in ("cancelled", "completed"):
            raise _TaskGone(f"the control plane says task {task_id} is {status}")
        _paths, _options, target = parse_task(doc, self._isdir)
        with self._lock:
            if not cancel.is_set():
                self._target = target
        return self._fenced(target), paths, options

    def _fenced(self, target: Any) -> Any:
        """``target`` with the agent's current session epoch (every write carries it)."""
        epoch = int(self._epoch() or 0)
        return dataclasses.replace(target, epoch=epoch) if epoch else target

    def _work(self, gen: int, cancel: threading.Event, task_id: str, cycle: CycleSpec, kind: str, cid: str,
              paths: Tuple[str, ...], options: Options) -> None:
        label = _KIND_LABEL.get(kind, "Sync")
        plural = "path" if len(paths) == 1 else "paths"
        self._notify("info", "cycle_started",
                     f"{label} started: {len(paths)} {plural} ({', '.join(paths)}), cycle {cycle.number}")
        started = time.monotonic()

        def attempt() -> Any:
            target, resolved_paths, resolved_options = self._resolve(task_id, paths, options, cancel)
            replicator = self._factory(target=target, paths=list(resolved_paths), options=resolved_options,
                                       on_progress=self._progress_cb(gen), on_child=self._on_child)
            incremental = kind != "full" or cycle.link_dest is not None
            spec = Cycle(cycle.number, cycle.dest, cycle.link_dest, incremental)
            return replicator.run_cycle(spec, cancel)

        result = self._with_retries(gen, cancel, cid, task_id, cycle, label, attempt, "transfer stopped")
        if result is _STOPPED:
            return
        result_doc = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        if not self._finish_succeeded(gen, cancel, cid, kind, cycle, result_doc):
            return
        elapsed = time.monotonic() - started
        self._notify("info", "cycle_succeeded",
                     f"{label} finished: cycle {cycle.number}, "
                     f"{human_bytes(result_doc.get('bytes_total', 0))} in {result_doc.get('files', 0)} "
                     f"files, {human_bytes(result_doc.get('bytes_sent', 0))} sent, {elapsed:.0f}s")
        if kind == "final":
            self._notify("info", "task_completed", f"Task {task_id} completed")

    def _finish_succeeded(self, gen: int, cancel: threading.Event, cid: str, kind: str, cycle: CycleSpec,
                          result_doc: Dict[str, Any], *,
                          change_tokens: Optional[Dict[str, Dict[str, Any]]] = None,
                          base_epoch: int = 0) -> bool:
        """Record a successful cycle (ack, task file); False when the cycle was superseded."""
        with self._lock:
            if not self._current(gen, cancel) or self._task is None:
                return False
            self._ack(cid, "succeeded", None, None, result_doc)
            task = self._task
            task.update({"last_cycle": cycle.number, "last_result": result_doc, "last_error": None,
                         "cycle": None, "cycle_kind": None, "cycle_command": None})
            if change_tokens is not None:
                task["change_tokens"] = change_tokens
            if base_epoch:
                task["base_epoch"] = base_epoch
            self._worker = None
            self._retry = None
            if kind == "final":
                self._task = None
                self._target = None
                self._progress = None
                self._last_state = COMPLETED
            else:
                task["status"] = WAITING
            self._save_or_later()
        return True

    # -- block cycles -----------------------------------------------------------------------

    @staticmethod
    def _set_block_options(replicator: BlockEngine, options: Options) -> None:
        from go2cloud_client.replication.block.cycle import block_options

        try:
            replicator.set_options(block_options(options))
        except Exception:  # noqa: BLE001 - the options apply from the next cycle at the latest
            LOG.warning("could not apply the new options to the running transfer", exc_info=True)

    def _on_replicator(self, gen: int, used: Options) -> Callable[[Optional[BlockEngine]], None]:
        def on_replicator(replicator: Optional[BlockEngine]) -> None:
            with self._lock:
                if gen != self._gen:
                    return
                self._replicator = replicator
                if replicator is not None and self._task is not None:
                    now = self.effective_options(Options(**self._task["options"]))
                    self._in_force = now.bandwidth_mbps
                    if now != used:  # modified (or a window edge) while the snapshots were taken
                        self._set_block_options(replicator, now)
        return on_replicator

    def _work_block(self, gen: int, cancel: threading.Event, task_id: str, cycle: CycleSpec, kind: str,
                    cid: str, paths: Tuple[str, ...], options: Options) -> None:
        label = _KIND_LABEL.get(kind, "Sync")
        with self._lock:
            task: Dict[str, Any] = dict(self._task) if self._task else {}
        disks = tuple(DiskSpec(d["name"], d["path"]) for d in task.get("disks") or [])
        snapshot = str(task.get("snapshot") or "auto")
        tokens = dict(task.get("change_tokens") or {})
        names = ", ".join(d.path for d in disks)
        self._notify("info", "cycle_started",
                     f"{label} started: {len(disks)} disk(s) ({names}), snapshot {snapshot}, "
                     f"cycle {cycle.number}")
        started = time.monotonic()
        used_epoch = [0]

        def attempt() -> Any:
            target, _, _ = self._resolve(task_id, (), options, cancel)
            if not isinstance(target, BlockTargetSpec):
                raise ReplicationError(f"the control plane gave task {task_id} a target that is not "
                                       "a block receiver")
            with self._lock:
                current = self.effective_options(Options(**self._task["options"])) if self._task else options
            # fencing: the target's image is this session's only if the last committed cycle was
            # written under this epoch; after a takeover (another epoch) the next pass re-reads and
            # verifies everything, so what another session wrote cannot survive into this image
            epoch = int(getattr(target, "epoch", 0) or 0)
            reverify = bool(epoch and task.get("last_cycle") and task.get("base_epoch") != epoch)
            if reverify:
                self._notify("warning", "verification_pass",
                             f"Cycle {cycle.number} is a verification pass: the last committed cycle was "
                             f"written under agent session epoch {task.get('base_epoch') or 'unknown'}, this "
                             f"agent holds epoch {epoch} (another session wrote to the target); every chunk "
                             "is read and the target's image is verified against the disk")
            used_epoch[0] = epoch
            return self.block_cycles.run(
                task_id=task_id, cycle=cycle, kind=kind, disks=disks, snapshot=snapshot, tokens=tokens,
                target=target, options=current, cancel=cancel, on_progress=self._progress_cb(gen),
                on_replicator=self._on_replicator(gen, current), reverify=reverify)

        outcome = self._with_retries(gen, cancel, cid, task_id, cycle, label, attempt,
                                     "transfer stopped (snapshots released)",
                                     on_gone=lambda: self.block_cycles.forget(task_id))
        if outcome is _STOPPED:
            return
        result_doc, new_tokens = outcome
        if not self._finish_succeeded(gen, cancel, cid, kind, cycle, result_doc, change_tokens=new_tokens,
                                      base_epoch=used_epoch[0]):
            return
        if kind == "final":
            self.block_cycles.forget(task_id)
        elapsed = time.monotonic() - started
        self._notify("info", "cycle_succeeded",
                     f"{label} finished: cycle {cycle.number}, {len(disks)} disk(s), "
                     f"{human_bytes(result_doc.get('bytes_total', 0))} read, "
                     f"{human_bytes(result_doc.get('bytes_sent', 0))} sent, {elapsed:.0f}s")
        if kind == "final":
            self._notify("info", "task_completed", f"Task {task_id} completed")

    def _budget_for(self, exc: Go2CloudError) -> Optional[float]:
        """The retry budget of a failure, None when it fails the cycle at once. The control plane
        away or a full agent home wait the longer budget. A full target fails the cycle at once:
        the control plane shows the task ``target_full`` and queues the cycle again itself when
        space returns (go2cloud_server/space.py), so the agent does not keep knocking."""
        if exc.code == "target_full":
            return None
        if exc.code == "agent_home_full":
            return self.control_plane_budget_s
        if not exc.retryable:
            return None
        if isinstance(exc, (ServerUnreachableError, ServerError)) or self._control_plane_down():
            return max(self.retry_budget_s, self.control_plane_budget_s)
        return self.retry_budget_s

    def _with_retries(self, gen: int, cancel: threading.Event, cid: str, task_id: str, cycle: CycleSpec,
                      label: str, attempt: Callable[[], Any], stopped: str,
                      on_gone: Optional[Callable[[], object]] = None) -> Any:
        """Run one cycle's transfer (``attempt``), retrying transient failures (network, the
        control plane or the target away, a full home or target) with jittered backoff under a
        time budget (``retry_budget_s``; ``control_plane_budget_s`` while the control plane is
        away or a disk is full); an attempt that moved data starts budget and backoff again.
        Returns its result, or ``_STOPPED`` when the cycle ended otherwise: cancelled (pause,
        modify, abort, stop), the task gone, or failed (then acknowledged)."""
        budget = RetryBudget(self.retry_budget_s, self.backoff)
        while True:
            with self._lock:
                self._moved = False
                self._attempt_first = None
            try:
                result = attempt()
                with self._lock:
                    self._retry = None
                return result
            except TransferCancelled:
                LOG.info("cycle %s of task %s: %s", cycle.number, task_id, stopped)
                return _STOPPED
            except _TaskGone as exc:
                self._finish_failed(gen, cancel, cid, "task_cancelled", str(exc), forget=True)
                if on_gone is not None:
                    on_gone()
                return _STOPPED
            except Exception as exc:  # noqa: BLE001 - a bug must fail the cycle, not kill the thread silently
                if cancel.is_set():
                    return _STOPPED
                err = self._as_error(exc, task_id, cycle)
                limit = self._budget_for(err) if err is not None else None
                if err is None:
                    err = ReplicationError(f"internal error during the transfer: {type(exc).__name__}: {exc}")
                if limit is None:
                    self._finish_failed(gen, cancel, cid, err.code, str(err))
                    return _STOPPED
                with self._lock:
                    moved = self._moved
                if moved:
                    budget.progressed()
                delay = budget.failed(limit)
                if delay is None:
                    self._finish_failed(
                        gen, cancel, cid, err.code,
                        f"{err} (gave up after {budget.failing_for:.0f}s of retries, {budget.attempts} "
                        f"attempts; the retry budget is {limit:.0f}s: sync again once the cause is fixed)")
                    return _STOPPED
                with self._lock:
                    self._retry = {"code": err.code, "message": str(err)[:1000], "attempt": budget.attempts,
                                   "next_attempt_in_s": round(delay, 1),
                                   "failing_for_s": round(budget.failing_for, 1),
                                   "budget_s": limit}
                LOG.warning("cycle %s of task %s: %s; retrying in %.0fs (attempt %d, failing for %.0fs "
                            "of a %.0fs budget)", cycle.number, task_id, err, delay, budget.attempts,
                            budget.failing_for, limit)
                if budget.attempts == 1:  # one event per run of failures, not one per attempt
                    self._notify("warning", err.code,
                                 f"{label} cycle {cycle.number}: {err}; retrying automatically for up to "
                                 f"{limit / 60:.0f} min")
                if self._wait_retry(err, delay, cancel):
                    return _STOPPED

    def _wait_retry(self, err: Go2CloudError, delay: float, cancel: threading.Event) -> bool:
        """Wait ``delay`` before the next attempt (a full home: until it has room again, at most
        ``delay``). True when cancelled."""
        if err.code != "agent_home_full":
            return cancel.wait(delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self.home.has_room():
                LOG.info("the agent home %s has space again; resuming the cycle", self.home.root)
                return cancel.is_set()
            if cancel.wait(min(2.0, max(0.0, deadline - time.monotonic()))):
                return True
        return False

    def _as_error(self, exc: BaseException, task_id: str, cycle: CycleSpec) -> Optional[Go2CloudError]:
        """The agent error of a failed attempt; None for a bug (logged; fails the cycle)."""
        if isinstance(exc, Go2CloudError):
            return exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.home.full_error(Path(exc.filename or self.home.state_dir), exc)
        LOG.exception("cycle %s of task %s: unexpected error", cycle.number, task_id)
        return None

    def _finish_failed(self, gen: int, cancel: threading.Event, cid: str, code: str, message: str,
                       *, forget: bool = False) -> None:
        with self._lock:
            if not self._current(gen, cancel) or self._task is None:
                return
            self._ack(cid, "failed", code, message, {})
            self._worker = None
            self._retry = None
            if forget:
                self._task = None
                self._target = None
                self._progress = None
                self._last_state = "idle"
            else:
                self._task.update({"status": FAILED, "last_error": {"code": code, "message": message},
                                   "cycle": None, "cycle_kind": None, "cycle_command": None})
            self._save_or_later()
        LOG.error("cycle failed (%s): %s", code, message)
        self._notify("error", code, f"Sync failed: {message}")


class _TaskGone(Exception):
    pass


#: What _with_retries returns when the cycle ended without a result.
_STOPPED = object()
