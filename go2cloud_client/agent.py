"""The foreground agent: heartbeat, command loop, task runner, acknowledgements and events.

Loops (each supervised by :class:`~go2cloud_client.periodic.LoopSupervisor`: a failure is
logged, the loop restarted with backoff, and reported in the heartbeat under ``loops``):
``heartbeat`` (every interval the server asks for, jittered, on the monotonic clock; also writes
``state/status.json``), ``commands`` (long poll, dispatch), ``acks`` (sends what the command journal has
not confirmed), ``events`` (flushes the event buffer); plus the task runner's cycle worker. The
main thread waits for a stop (SIGTERM, SIGINT, or a fatal error such as the source having been
deleted on the control plane).

Control-plane outages never stop the agent: calls are retried with capped, jittered backoff;
:class:`~go2cloud_client.outage.OutageLog` logs one line when the control plane becomes
unreachable, a summary every 5 minutes while it stays away, and one line when it is back.

A full agent home (ENOSPC writing the command journal, the task or status file) is reported in the
heartbeat's ``last_error`` (``agent_home_full``, naming the home and the space needed); a
command that could not be recorded is not run (it is delivered again), a final status that could
not be written is acknowledged from memory, and everything is written when space returns.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import psutil

from go2cloud_client import __version__, platform
from go2cloud_client.api import ControlPlane, RetryingControlPlane
from go2cloud_client.backoff import jittered
from go2cloud_client.clock import utc_now
from go2cloud_client.command_journal import FINAL_STATUSES, CommandJournal
from go2cloud_client.commands import KNOWN_TYPES, SUPPORTED_TYPES, Command, parse_command
from go2cloud_client.config import Config
from go2cloud_client.console import WAITING_LINE, Console
from go2cloud_client.errors import (
    CommandRejectedError,
    Go2CloudError,
    HomeFullError,
    IdentityRejectedError,
    SessionConflictError,
)
from go2cloud_client.events import EventBuffer
from go2cloud_client.home import Home
from go2cloud_client.identity import Identity
from go2cloud_client.outage import OutageLog
from go2cloud_client.periodic import LoopSupervisor
from go2cloud_client.proxy import ProxySettings, settings_of
from go2cloud_client.replication.block.cycle import recover_snapshots
from go2cloud_client.session import open_session
from go2cloud_client.task import Outcome, TaskRunner

LOG = logging.getLogger(__name__)

#: errors that stop the agent: the source is gone, or another live agent holds its session
FATAL_ERRORS = (IdentityRejectedError, SessionConflictError)

SKEW_WARN_S = 60.0
#: Pause between polls when a poll returned only commands already in progress (the server
#: returns ``accepted`` commands again until they are final).
REDELIVERY_PAUSE_S = 2.0


def default_replicator_factory(home: Home, rsync_path: str, io_timeout_s: int = 120,
                               proxy: Optional[ProxySettings] = None) -> Callable[..., Any]:
    from go2cloud_client.replication.excludes import ensure_home_excludes
    from go2cloud_client.replication.rsync import FileReplicator, RsyncTarget, TransferOptions

    def factory(*, target: Any, paths: List[str], options: Any, on_progress: Callable[[Any], None],
                on_child: Callable[[Optional[int]], None]) -> FileReplicator:
        return FileReplicator(
            target=RsyncTarget(target.url, target.fingerprint, target.module, target.user, target.password,
                               getattr(target, "epoch", 0), (proxy or ProxySettings()).for_url(target.url)),
            paths=paths,
            options=TransferOptions(options.bandwidth_mbps, options.compression, options.checksum),
            excludes_file=ensure_home_excludes(home.root),
            work_dir=home.work_dir,
            rsync_path=rsync_path,
            on_progress=on_progress,
            on_child=on_child,
            io_timeout_s=io_timeout_s,
        )

    return factory


def kill_children(home: Home) -> List[int]:
    """Stop rsync process groups recorded in ``state/children.json`` that are still alive (only
    if the group leader still is an rsync, so a reused pid is never hit). Returns the groups."""
    pgids = [p for p in home.children().get("pgids", []) if isinstance(p, int) and p > 1]
    killed = []
    for pgid in pgids:
        try:
            proc = psutil.Process(pgid)
            if "rsync" not in (proc.name() + " ".join(proc.cmdline()[:1])):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        platform.kill_process_group(pgid)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and platform.pid_alive(pgid):
            time.sleep(0.1)
        if platform.pid_alive(pgid):
            platform.kill_process_group(pgid, force=True)
        killed.append(pgid)
    if pgids:
        home.set_child(None)
    return killed


def host_load() -> Dict[str, Any]:
    try:
        load1 = psutil.getloadavg()[0]
    except (AttributeError, OSError):
        load1 = None
    return {"load1": load1, "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent}


class Agent:
    def __init__(
        self,
        home: Home,
        config: Config,
        source: Dict[str, Any],
        identity: Identity,
        *,
        console: Optional[Console] = None,
        control_plane: Optional[ControlPlane] = None,
        replicator_factory: Optional[Callable[..., Any]] = None,
        rsync_path: str = "rsync",
    ) -> None:
        self.home = home
        self.config = config
        self.source = source
        self.console = console or Console()
        self.stop_event = threading.Event()
        self.proxy = settings_of(config.proxy, config.no_proxy, source)
        self.cp = control_plane or ControlPlane(
            config.server or source["server"],
            fingerprint=config.server_fingerprint or source.get("server_fingerprint"),
            source_id=source["source_id"], identity=identity,
            connect_timeout=config.connect_timeout_s, read_timeout=config.read_timeout_s,
            proxy=self.proxy,
        )
        self.outage = OutageLog(say=self.console.line)
        retry = dict(stop_event=self.stop_event, on_retry=self._unreachable)
        self.api_poll = RetryingControlPlane(self.cp, attempts=None, **retry)  # type: ignore[arg-type]
        self.api_beat = RetryingControlPlane(self.cp, attempts=2, max_wait=5, **retry)  # type: ignore[arg-type]
        self.api_task = RetryingControlPlane(self.cp, attempts=5, **retry)  # type: ignore[arg-type]
        self.command_journal = CommandJournal(home)
        self.events = EventBuffer()
        self.runner = TaskRunner(
            home,
            replicator_factory=replicator_factory or default_replicator_factory(
                home, rsync_path, config.rsync_timeout_s, self.proxy),
            fetch_task=self.api_task.get_task,
            ack=self._finish_command,
            notify=self.notify,
            on_progress=self.console.progress,
            on_child=home.set_child,
            retry_budget_s=config.transfer_retry_budget_s,
            control_plane_budget_s=config.control_plane_budget_s,
            control_plane_down=lambda: not self.outage.connected,
            epoch=lambda: self.cp.epoch,
            proxy=self.proxy,
        )
        self._session_ready = threading.Event()
        self._session_lock = threading.Lock()
        self.rsync_path = rsync_path
        self.interval = float(source.get("heartbeat_interval") or 10)
        self.fatal: Optional[Go2CloudError] = None
        self.loops = LoopSupervisor(self.stop_event, on_failure=self._loop_failed)
        #: the agent home was found full (cleared when it has room again)
        self.home_full: Optional[HomeFullError] = None
        self._ack_lock = threading.Lock()
        self._ack_wakeup = threading.Event()
        # set when acknowledgements reach the control plane: ends a redelivery pause at once
        self._acks_delivered = threading.Event()
        self._skew_warned = False
        self._threads: List[threading.Thread] = []
        self.stopped_by: Optional[str] = None

    # -- connectivity -----------------------------------------------------------------------

    @property
    def _connected(self) -> bool:
        return self.outage.connected

    def _unreachable(self, exc: BaseException, attempt: int = 0) -> None:
        self.outage.failure(exc)

    def _reachable(self) -> None:
        was_connected = self.outage.connected
        self.outage.success()
        if not was_connected:
            self._ack_wakeup.set()

    # -- the agent home -----------------------------------------------------------------------

    def _loop_failed(self, name: str, exc: BaseException) -> None:
        if isinstance(exc, HomeFullError):
            self._note_home_full(exc)

    def _note_home_full(self, exc: HomeFullError) -> None:
        if self.home_full is None:
            LOG.error("%s", exc)
            self.events.add("error", exc.code, str(exc))
            self.console.line(str(exc))
        self.home_full = exc

    def _check_home(self) -> None:
        """Clear the full-home state once the home has room again (and write what waited)."""
        if self.home_full is None or not self.home.has_room():
            return
        try:
            self.command_journal.persist()
            self.runner.persist()
        except HomeFullError as exc:
            self.home_full = exc
            return
        free = self.home.free_bytes() or 0
        LOG.info("the agent home %s has space again (%d MiB free); resuming", self.home.root, free >> 20)
        self.notify("info", "agent_home_ok", f"The agent home {self.home.root} has space again; resuming")
        self.home_full = None
        self._ack_wakeup.set()

    def _failed_call(self, exc: Go2CloudError, what: str) -> None:
        if isinstance(exc, FATAL_ERRORS):
            self._fail(exc)
        elif exc.retryable:
            self._unreachable(exc)
        else:
            LOG.warning("%s refused by the control plane: %s", what, exc)

    def _fail(self, exc: Go2CloudError) -> None:
        if self.fatal is None:
            LOG.error("stopping: %s", exc)
            self.fatal = exc
        self.stop_event.set()

    def notify(self, level: str, code: str, message: str) -> None:
        """Something the operator and the control plane should know (console, log, events)."""
        LOG.log({"error": logging.ERROR, "warning": logging.WARNING}.get(level, logging.INFO), "%s", message)
        self.events.add(level, code, message)
        self.console.line(message)

    # -- commands ---------------------------------------------------------------------------

    def _finish_command(self, cid: str, status: str, error_code: Optional[str], message: Optional[str],
                        result: Optional[Dict[str, Any]]) -> None:
        """Final status of a command: recorded in the command journal now, sent by the acks thread (from
        memory if the home is full; written to the journal file when space returns)."""
        try:
            self.command_journal.finish(cid, status, error_code=error_code, message=message, result=result)
        except HomeFullError as exc:
            self._note_home_full(exc)
        self._ack_wakeup.set()

    def dispatch(self, raw: Dict[str, Any]) -> bool:
        """Handle one delivered command; True if it was new (not a redelivery)."""
        cid, ctype = raw["id"], raw.get("type")
        entry = self.command_journal.get(cid)
        if entry is not None:
            if entry["status"] in FINAL_STATUSES or not entry.get("ack_sent"):
                LOG.debug("command %s delivered again; answering %s from the command journal", cid,
                          entry["status"])
                self._send_ack(cid, entry)
            return False
        if not isinstance(ctype, str):  # acknowledged, so it is not delivered again and again
            LOG.warning("command %s rejected: its type is not a string (%.100r)", cid, ctype)
            self.command_journal.finish(cid, "rejected", ctype="", error_code=CommandRejectedError.code,
                               message="command type: must be a string")
            self._ack_wakeup.set()
            return True
        if ctype not in KNOWN_TYPES or ctype not in SUPPORTED_TYPES:
            LOG.warning("command %s: type %r is not supported by this agent", cid, ctype)
            self.command_journal.finish(cid, "unsupported", ctype=ctype, error_code="unsupported",
                               message=f"command type {ctype!r} is not supported by "
                                       f"go2cloud_client {__version__}")
            self._ack_wakeup.set()
            return True
        try:
            cmd = parse_command(raw)
        except CommandRejectedError as exc:
            LOG.warning("command %s (%s) rejected: %s", cid, ctype, exc)
            self.command_journal.finish(cid, "rejected", ctype=ctype, error_code=exc.code, message=str(exc))
            self._ack_wakeup.set()
            return True
        if not self.command_journal.accept(cid, ctype):  # persisted before acting: at most once
            return False
        LOG.info("command %s: %s %s", cid, ctype, cmd.task_id or "")
        if ctype == "drill":  # runs on its own thread; acknowledged when the report is ready
            threading.Thread(target=self.run_drill, args=(cmd,), name="drill", daemon=True).start()
            return True
        try:
            outcome = self.runner.handle(cmd)
        except Go2CloudError as exc:
            outcome = Outcome("failed", exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in one command must not stop the agent
            LOG.exception("command %s (%s) failed unexpectedly", cid, ctype)
            outcome = Outcome("failed", "internal_error", f"internal error: {type(exc).__name__}")
        if outcome is not None:
            self.command_journal.finish(cid, outcome.status, error_code=outcome.error_code,
                                        message=outcome.message, result=outcome.result)
        self._ack_wakeup.set()
        return True

    def run_drill(self, cmd: Command) -> None:
        """Run the drill of a ``drill`` command and acknowledge it with the report."""
        from go2cloud_client.drill.checks import Target
        from go2cloud_client.drill.model import summary_line
        from go2cloud_client.drill.runner import build_context, run_drill

        spec = cmd.drill
        assert spec is not None
        self.console.line(f"Drill of task {cmd.task_id} ({spec.mode} mode) started")
        try:
            ctx = build_context(mode=spec.mode, paths=spec.paths, disks=spec.disks, snapshot=spec.snapshot,
                                home=str(self.home.root), server_url=self.cp.server,
                                targets=[Target(*t) for t in spec.targets], rsync_path=self.rsync_path,
                                server_time=self.cp.server_time, proxy=self.proxy)
            report = run_drill(ctx).to_dict()
        except Exception as exc:  # noqa: BLE001 - reported to the control plane as a failed drill
            LOG.exception("the drill of task %s failed", cmd.task_id)
            self._finish_command(cmd.id, "failed", "drill_failed",
                                 f"the drill could not run: {type(exc).__name__}: {exc}", None)
            return
        line = summary_line(report)
        self.notify("info" if report["passed"] else "warning",
                    "drill_passed" if report["passed"] else "drill_abnormal", f"{line} (task {cmd.task_id})")
        for item in report["items"]:
            if item["severity"] in ("critical", "warning"):
                self.console.line(f"  {item['severity']}: {item['finding']}"
                                  + (f" -> fix: {item['fix']}" if item.get("fix") else ""))
        self._finish_command(cmd.id, "succeeded", None, None, {"drill": report})

    def _send_ack(self, cid: str, entry: Dict[str, Any]) -> bool:
        try:
            self.cp.ack(cid, entry["status"], error_code=entry.get("error_code"),
                        message=entry.get("message"), result=entry.get("result") or {})
        except Go2CloudError as exc:
            if exc.retryable or isinstance(exc, FATAL_ERRORS):
                self._failed_call(exc, f"acknowledgement of {cid}")
                return False
            LOG.warning("acknowledgement of %s (%s) refused: %s; not sending it again",
                        cid, entry["status"], exc)
        else:
            if not entry.get("ack_sent"):  # news for the control plane (a resend is not)
                self._acks_delivered.set()
        self.command_journal.mark_sent(cid, entry["status"])
        return True

    def flush_acks(self) -> None:
        with self._ack_lock:
            for cid, entry in self.command_journal.unsent():
                if self.stop_event.is_set() or not self._send_ack(cid, entry):
                    return

    # -- loops ------------------------------------------------------------------------------

    def ensure_session(self) -> bool:
        """Hold the source's session (fencing) before anything else talks to the control plane:
        opened at start, or as soon as the control plane can be reached. A conflict (another live
        agent with this identity) stops the agent with SessionConflictError."""
        if self._session_ready.is_set():
            return True
        with self._session_lock:
            if self._session_ready.is_set():
                return True
            try:
                epoch = open_session(
                    lambda sid, inst, fp: self.api_beat.call(self.cp.open_session, sid, inst, fp),
                    self.home, stop_event=self.stop_event, on_wait=self.console.line)
            except Go2CloudError as exc:
                self._failed_call(exc, "session")
                return False
            if not epoch:
                return False
            LOG.info("holding the session of source %s (epoch %d)", self.source["source_id"], epoch)
            self._session_ready.set()
            return True

    def _commands_loop(self) -> None:
        while not self.stop_event.is_set():
            if not self.ensure_session():
                self.stop_event.wait(5)
                continue
            self._acks_delivered.clear()  # before the poll: an ack sent during it counts
            try:
                commands = self.api_poll.poll_commands(self.config.poll_wait_s)
            except Go2CloudError as exc:
                if self.stop_event.is_set():
                    return
                self._failed_call(exc, "command poll")
                self.stop_event.wait(30)
                continue
            self._reachable()
            new = False
            for raw in commands:
                if self.stop_event.is_set():
                    return
                new = self.dispatch(raw) or new
            if commands and not new:
                # only commands this agent already has (running, or finished with the
                # acknowledgement on its way). Poll again as soon as an acknowledgement brings the
                # control plane news, so the next command (e.g. the start queued when a drill
                # passes) runs at once, not after the pause; a resent acknowledgement does not
                # count (no busy loop on a command the control plane keeps delivering)
                self._acks_delivered.wait(REDELIVERY_PAUSE_S)
            elif not commands and self.config.poll_wait_s == 0:
                self.stop_event.wait(1)

    def _acks_loop(self) -> None:
        while not self.stop_event.is_set():
            self._ack_wakeup.wait(5)
            self._ack_wakeup.clear()
            self._check_home()
            if self.command_journal.unsent():
                self.flush_acks()

    def _events_loop(self) -> None:
        while not self.stop_event.wait(jittered(self.interval)):
            if not len(self.events) or not self._connected:
                continue
            try:
                self.events.flush(self.cp.post_events)
            except Go2CloudError as exc:
                self._failed_call(exc, "events")

    def heartbeat_payload(self) -> Dict[str, Any]:
        snap = self.runner.snapshot()
        payload = {
            "agent_version": __version__,
            "state": snap["state"],
            "task_id": snap["task_id"],
            "phase": snap["phase"],
            "cycle": snap["cycle"],
            "progress": snap["progress"],
            "last_error": snap["last_error"],
            "retry": snap.get("retry"),
            "bandwidth": snap.get("bandwidth"),
            "load": host_load(),
            "loops": self.loops.report(),
        }
        if self.home_full is not None:
            payload["last_error"] = {"code": self.home_full.code, "message": str(self.home_full)}
        return payload

    def heartbeat_once(self) -> None:
        payload = self.heartbeat_payload()
        self.write_status(payload)
        if self.home_full is not None:  # found by this very status write: reported at once
            payload["last_error"] = {"code": self.home_full.code, "message": str(self.home_full)}
        if not self.ensure_session():
            return
        try:
            resp = self.api_beat.heartbeat(payload)
        except Go2CloudError as exc:
            self._failed_call(exc, "heartbeat")
            return
        self._reachable()
        interval = resp.get("heartbeat_interval")
        if (isinstance(interval, (int, float)) and not isinstance(interval, bool)
                and 0.2 <= interval <= 3600 and interval != self.interval):
            LOG.info("heartbeat interval is now %ss", interval)
            self.interval = float(interval)
        self._check_skew(resp.get("server_time_epoch"))
        if resp.get("commands_waiting"):
            LOG.debug("the control plane has commands waiting")

    def _check_skew(self, server_epoch: Any) -> None:
        if not isinstance(server_epoch, (int, float)) or isinstance(server_epoch, bool):
            return
        skew = time.time() - float(server_epoch)
        if abs(skew) > SKEW_WARN_S and not self._skew_warned:
            self._skew_warned = True
            LOG.warning("this host's clock is %.0fs %s the control plane's; fix the time (NTP)",
                        abs(skew), "ahead of" if skew > 0 else "behind")
            self.events.add("warning", "clock_skew",
                            f"host clock differs from the control plane by {skew:.0f}s")
        elif abs(skew) < SKEW_WARN_S / 2:
            self._skew_warned = False

    def _heartbeat_loop(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
            # jittered: agents that came back together after an outage drift apart again
            next_at = time.monotonic() + jittered(self.interval)
            self._check_home()
            self.heartbeat_once()

    def write_status(self, payload: Optional[Dict[str, Any]] = None, *, running: bool = True) -> None:
        payload = payload or self.heartbeat_payload()
        doc = {
            "pid": os.getpid(), "running": running, "updated_at": utc_now(),
            "source_id": self.source["source_id"], "workgroup": self.source.get("workgroup"),
            "server": self.cp.server, "connected": self._connected,
            "heartbeat_interval": self.interval,
            **{k: payload.get(k) for k in ("state", "task_id", "phase", "cycle", "progress", "last_error",
                                           "retry", "loops", "bandwidth")},
        }
        try:
            self.home.write_state(self.home.status_file, doc)
        except HomeFullError as exc:
            # the status file is rewritten every heartbeat: the first write to notice a full home,
            # often the only one while no command arrives (the command journal is written only then)
            self._note_home_full(exc)
        except Go2CloudError as exc:
            LOG.warning("cannot write the status file: %s", exc)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Load state, settle interrupted commands, resume an interrupted cycle, start threads."""
        leftovers = kill_children(self.home)  # rsync left running by a killed agent
        if leftovers:
            LOG.warning("stopped rsync process groups left by the previous agent run: %s", leftovers)
        for line in recover_snapshots(self.home):  # snapshots / frozen filesystems of a killed agent
            LOG.warning("left by the previous agent run: %s", line)
        self.command_journal.load()
        self.runner.load(resume=False)
        task = self.runner.task
        resumable = self.runner.cycle_command()
        keep = {resumable} if resumable else set()
        failed = self.command_journal.fail_interrupted(
            keep, "the agent stopped while this command was running; it was not completed, issue it again")
        if failed:
            LOG.warning("commands interrupted by the last agent stop: %s", ", ".join(failed))
        try:
            self.api_task.authenticate()
        except Go2CloudError as exc:
            if not exc.retryable:
                raise
            self._unreachable(exc)
        if not self.ensure_session() and self.fatal is not None:
            raise self.fatal  # another live agent holds this source: nothing is resumed or run
        if task and task.get("status") == "running" and task.get("cycle"):
            self.runner.load(resume=True)
        for name, target in (("heartbeat", self._heartbeat_loop), ("commands", self._commands_loop),
                             ("acks", self._acks_loop), ("events", self._events_loop)):
            self._threads.append(self.loops.spawn(name, target))
        self._ack_wakeup.set()
        self.console.line(WAITING_LINE)

    def stop(self, reason: str = "stop requested") -> None:
        if self.stopped_by is None:
            self.stopped_by = reason
        self.stop_event.set()
        self._ack_wakeup.set()
        self._acks_delivered.set()

    def wait(self) -> None:
        while not self.stop_event.wait(0.5):
            pass

    def shutdown(self) -> None:
        """Stop the transfer (the task stays, so the next start resumes it) and the children."""
        self.stop_event.set()
        self._ack_wakeup.set()
        self.console.clear_progress()
        self.runner.shutdown()
        killed = kill_children(self.home)
        if killed:
            LOG.warning("stopped leftover rsync process groups %s", killed)
        self.write_status(running=False)
        for thread in self._threads:
            if thread.name != "commands":  # may sit in a long poll; it is a daemon thread
                thread.join(timeout=5)
        self.cp.close()

    def run(self) -> None:
        """Start, wait for a stop, shut down. Raises the fatal error that stopped it, if any."""
        self.start()
        try:
            self.wait()
        finally:
            self.shutdown()
        if self.fatal is not None:
            raise self.fatal
