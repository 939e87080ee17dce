"""The reference target's file-level receiver: one single-use rsync daemon per agent connection.

There is no rsync listener. An agent's rsync reaches the target through the control plane's one
HTTPS port: the agent's own executable is rsync's remote shell (``rsync -e``); it opens a TLS
connection pinned to the control plane's certificate and asks for an upgrade of
``POST /rsync/v1/tasks/<task>/session`` (``httpapi``). Once the service has checked the task's
credentials, cycle and path, :meth:`RsyncSessions.run` starts ``rsync --server --daemon`` on one
end of a socket pair, with a configuration written for this connection only, and pumps the
agent's bytes to it as they are, and its output, stderr and exit status back in frames (the
tunnel exits with that status, as ssh does), until it ends. Every byte between the hosts is
inside TLS; the single-use daemon dies with its connection (no pid file, no port; a daemon whose
server was killed reads end-of-file and exits).

Confinement (docs/security.md). The module is the task's tree (``use chroot`` as root), but the
daemon's own filter lets the source write only below the cycle it is writing, for the path of
this session (``/<cycle>/<path>``, minus the subtrees of the task's other paths nested in it),
and lets its ``--link-dest`` name only ``/<previous cycle>/<path>``. Committed images, their
records (in the database, not in the tree) and other tasks are out of reach. Options that
write outside the destination or into existing inodes are refused (``--inplace``,
``--temp-dir``, ``--partial-dir``, ``--backup-dir`` ...). Two effects of hard links are closed by
the session itself: files an earlier session of the same cycle hard-linked to the previous
image are unlinked before rsync starts (rsync would otherwise change their owner or mode in
place, in both images), and the link-dest directory and the tree's root get their attributes
back, and lose any entry the session created in them, before the agent is told the session ended.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from go2cloud_server import tlsstream
from go2cloud_server.proc import PIPE, Popen, kill, reap, spawn

LOG = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: rsync options a source may never use against the target (rsyncd.conf ``refuse options``):
#: each writes outside the destination, into an existing inode, or reads the target's devices
REFUSED_OPTIONS = (
    "inplace", "append", "append-verify", "backup", "backup-dir", "suffix", "temp-dir",
    "partial-dir", "delay-updates", "write-devices", "copy-devices", "compare-dest", "copy-dest",
    "remove-source-files", "remove-sent-files", "keep-dirlinks", "only-write-batch",
    "write-batch", "read-batch", "files-from", "fake-super", "log-file", "log-file-format",
)
PUMP_BUFFER = 256 * 1024
#: daemon -> agent frames: kind (1 byte), payload length (4 bytes), payload
FRAME = struct.Struct(">BI")
#: a session with no byte in either direction for this long is ended (rsync's own keep-alive
#: messages flow every few seconds while it works)
IDLE_TIMEOUT_S = 600.0


class RsyncSessionError(RuntimeError):
    """An rsync session could not be started (the message says why)."""


@dataclass(frozen=True)
class SessionSpec:
    """What one agent connection may do: write ``path`` of ``cycle`` into ``tree_root``."""

    task_id: str
    tree_root: Path
    cycle: int
    path: str
    link_cycle: Optional[int] = None
    other_paths: Tuple[str, ...] = ()
    user: str = ""
    password: str = field(default="", repr=False)

    def _under(self, cycle: int, path: str) -> Path:
        return self.tree_root.joinpath(f"{cycle:06d}", *_parts(path))

    def dest_dir(self) -> Path:
        """Where this session writes: ``<tree>/<cycle>/<path>``."""
        return self._under(self.cycle, self.path)

    def nested_dirs(self) -> List[Path]:
        """The task's other paths below this one, in this cycle (other sessions write them)."""
        mine = _parts(self.path)
        return [self._under(self.cycle, o) for o in self.other_paths
                if len(_parts(o)) > len(mine) and _parts(o)[: len(mine)] == mine]

    def link_dir(self) -> Optional[Path]:
        """The ``--link-dest`` directory: this path in the previous image, if there is one."""
        return self._under(self.link_cycle, self.path) if self.link_cycle else None


def _check_name(kind: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(f"invalid rsync {kind} {value!r}: use 1-64 of A-Z a-z 0-9 . _ -")


def _parts(path: str) -> List[str]:
    return [p for p in path.strip("/").split("/") if p]


_SPECIAL = re.compile(r"[*?\[\s%]")


def _pattern(parts: List[str], suffix: str = "") -> str:
    """Path components as one rsync filter pattern that matches exactly that path. rsync reads
    backslashes as escapes only in a pattern with wildcards, so a plain path stays as it is; one
    with a wildcard character, white space (which would split the daemon's ``filter`` parameter)
    or ``%`` (rsyncd.conf expands ``%VAR%``) has its wildcards and backslashes escaped, white
    space matched by the class ``[[:space:]]`` and ``%`` by ``[%]``."""
    if not suffix and not any(_SPECIAL.search(p) for p in parts):
        return "/".join(parts)
    escaped = [re.sub(r"\s", "[[:space:]]", re.sub(r"([*?\[\]\\])", r"\\\1", p)).replace("%", "[%]")
               for p in parts]
    return "/".join(escaped) + suffix


def filter_rules(spec: SessionSpec) -> List[str]:
    """The daemon filter of a session (first match wins): the cycle directory and the parents of
    the path (to create them), everything below the path except the task's other paths nested
    in it, the link-dest directory itself, and nothing else."""
    cycle = f"{spec.cycle:06d}"
    mine = _parts(spec.path)
    rules: List[str] = []
    for depth in range(len(mine) + 1):
        rules.append("+ /" + _pattern([cycle] + mine[:depth]))
    for other in spec.other_paths:
        o = _parts(other)
        if len(o) > len(mine) and o[: len(mine)] == mine:
            rules.append("- /" + _pattern([cycle] + o, "/**"))
    rules.append("+ /" + _pattern([cycle] + mine, "/**"))
    if spec.link_cycle:
        rules.append("+ /" + _pattern([f"{spec.link_cycle:06d}"] + mine))
    rules.append("- **")
    return rules


def render_config(spec: SessionSpec, secrets_file: Path, log_file: Path, as_root: bool) -> str:
    lines = [
        "# written by go2cloud_server for one agent connection; removed when it ends",
        f"log file = {log_file}",
        "reverse lookup = no",
        "",
        f"[{spec.task_id}]",
        f"    path = {spec.tree_root}",
        "    read only = false",
        "    write only = true",
        "    list = false",
        f"    auth users = {spec.user}",
        f"    secrets file = {secrets_file}",
        "    strict modes = true",
        "    numeric ids = true",
        "    munge symlinks = false",
        "    transfer logging = false",
        "    open noatime = true",
        f"    refuse options = {' '.join(REFUSED_OPTIONS)}",
        f"    filter = {' '.join(filter_rules(spec))}",
    ]
    if as_root:
        lines += ["    use chroot = true", "    uid = 0", "    gid = 0"]
    else:
        lines += ["    use chroot = false"]
    return "\n".join(lines) + "\n"


def unlink_shared(root: Path, skip: List[Path]) -> int:
    """Remove the non-directories below ``root`` that have other hard links (what an earlier
    rsync of the same cycle linked to the previous image with ``--link-dest``); the next rsync
    links or copies them again. Subtrees in ``skip`` are left alone. Returns how many went."""
    if not root.is_dir() or root.is_symlink():
        return 0
    skipped = {os.fsencode(str(p)) for p in skip}
    removed = 0
    stack = [os.fsencode(str(root))]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.path not in skipped:
                    stack.append(entry.path)
            elif st.st_nlink > 1:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError as exc:
                    LOG.warning("cannot unlink %r before an rsync session: %s", entry.path, exc)
    return removed


class _DirGuard:
    """A directory a session may name but not change (the tree's root, the link-dest directory):
    its attributes (mode, owner, times, extended attributes incl. ACLs) are put back and entries
    that appeared are removed when the session ends (rsync refuses to receive into a
    daemon-excluded directory, but creates the directory itself first)."""

    def __init__(self, path: Path, keep: Tuple[str, ...] = ()) -> None:
        self.path = path
        self.keep = keep
        self.st: Optional[os.stat_result] = None
        self.xattrs: Dict[str, bytes] = {}
        self.names: set = set()
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                self.names = set(os.listdir(path))
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        self.st = st
        try:
            for name in os.listxattr(path, follow_symlinks=False):
                self.xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass

    def restore(self) -> None:
        if self.st is None:
            return
        st = self.st
        try:
            now = os.lstat(self.path)
            if not stat.S_ISDIR(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                LOG.warning("%s is no longer the directory it was before the rsync session", self.path)
                return
            for name in set(os.listdir(self.path)) - self.names - set(self.keep):
                LOG.warning("rsync session created %s where it may not write: removed", self.path / name)
                victim = self.path / name
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim, ignore_errors=True)
                else:
                    victim.unlink(missing_ok=True)
            for name in os.listxattr(self.path, follow_symlinks=False):
                if name not in self.xattrs:
                    os.removexattr(self.path, name, follow_symlinks=False)
            for name, value in self.xattrs.items():
                os.setxattr(self.path, name, value, follow_symlinks=False)
            os.chown(self.path, st.st_uid, st.st_gid, follow_symlinks=False)
            os.chmod(self.path, stat.S_IMODE(st.st_mode))
            os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        except OSError as exc:
            LOG.warning("cannot restore the attributes of %s: %s", self.path, exc)


class _Session:
    """A task's claim on its one session: the daemon once it runs, and the event that stops it."""

    def __init__(self) -> None:
        self.proc: Optional[Popen] = None
        self.stopped = threading.Event()


def _check_conf_path(where: Path) -> None:
    """A path written into rsyncd.conf, which expands ``%VAR%`` and is line-based."""
    if any(c in str(where) for c in "\n\r\x00%"):
        raise RsyncSessionError(
            f"{where}: the data directory's path may not contain %, NUL or line breaks "
            "(rsyncd.conf would read them): choose another --data-dir")


def _write_private(path: Path, data: bytes) -> None:
    """A file of this session only (0600, created anew; nothing needs it after a crash)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class RsyncSessions:
    """Single-use rsync daemons, one per agent connection, at most one per task at a time."""

    def __init__(self, state_dir: Path, rsync_path: str = "rsync",
                 idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        self.state_dir = Path(state_dir)
        self.rsync_path = rsync_path
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._running: Dict[str, _Session] = {}
        self._as_root = os.geteuid() == 0

    def check(self) -> str:
        """The rsync executable (RsyncSessionError if it is missing: said at server start)."""
        _check_conf_path(self.state_dir)
        found = shutil.which(self.rsync_path)
        if found is None:
            raise RsyncSessionError(
                f"rsync is not installed ({self.rsync_path!r} not found on PATH): install the "
                "'rsync' package (e.g. apt-get install rsync) to serve file-level migrations")
        return found

    def busy(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._running

    def _prepare(self, spec: SessionSpec) -> Tuple[Path, Path, Path]:
        _check_name("module name", spec.task_id)
        _check_name("user", spec.user)
        if not spec.password or any(c in spec.password for c in "\x00\r\n") or len(spec.password) > 1024:
            raise ValueError("invalid rsync password (empty, too long, or contains NUL/newline)")
        _check_conf_path(spec.tree_root)
        _check_conf_path(self.state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        sdir = self.state_dir / f"{spec.task_id}.{secrets.token_hex(4)}"
        sdir.mkdir(mode=0o700)
        secrets_file = sdir / "secrets"
        _write_private(secrets_file, f"{spec.user}:{spec.password}\n".encode())
        log_file = sdir / "rsyncd.log"
        conf = sdir / "rsyncd.conf"
        _write_private(conf, render_config(spec, secrets_file, log_file, self._as_root).encode())
        return sdir, conf, log_file

    def _claim(self, task_id: str, timeout: float = 15.0) -> _Session:
        """The task's one session slot. A session still running for the task (an agent that
        reconnected after a cut, a pass that was stopped) is ended first: the newest connection
        of the task wins, and two never write at the same time."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                old = self._running.get(task_id)
                if old is None:
                    claim = self._running[task_id] = _Session()
                    return claim
            LOG.info("task %s: a new rsync session ends the one still running", task_id)
            old.stopped.set()
            if old.proc is not None:
                kill(old.proc)
            if time.monotonic() > deadline:
                raise RsyncSessionError(f"the previous rsync session of task {task_id} did not end")
            time.sleep(0.02)

    def run(self, conn: socket.socket, spec: SessionSpec) -> int:
        """Serve one agent connection (already upgraded) until it ends; returns rsync's exit
        status (-1 when it had to be killed). One session per task at a time (see _claim).
        Everything the session may have changed is put right, and the task's slot released,
        before the agent is told the daemon's exit status: its next session may start at once."""
        rsync = self.check()
        claim = self._claim(spec.task_id)
        sdir: Optional[Path] = None
        guards: List[_DirGuard] = []
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            for guard in guards:
                guard.restore()
            if sdir is not None:
                shutil.rmtree(sdir, ignore_errors=True)
            with self._lock:
                if self._running.get(spec.task_id) is claim:
                    del self._running[spec.task_id]

        try:
            sdir, conf, log_file = self._prepare(spec)
            removed = unlink_shared(spec.dest_dir(), spec.nested_dirs())
            if removed:
                LOG.info("task %s cycle %s: %d hard-linked file(s) of an earlier attempt unlinked "
                         "before rsync", spec.task_id, spec.cycle, removed)
            guards.append(_DirGuard(spec.tree_root, keep=(f"{spec.cycle:06d}",)))
            link_dir = spec.link_dir()
            if link_dir is not None:
                guards.append(_DirGuard(link_dir))
            ours, theirs = socket.socketpair()
            try:
                proc = spawn(
                    [rsync, "--server", "--daemon", f"--config={conf}", "."],
                    stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=PIPE, cwd=str(sdir),
                )
            finally:
                theirs.close()
            claim.proc = proc
            if claim.stopped.is_set():  # a newer session of the task came in meanwhile
                kill(proc)
            assert proc.stderr is not None
            tail = ""
            rc = -1

            def on_exit() -> None:
                nonlocal tail
                tail = _tail(log_file)
                finish()

            try:
                rc = _pump(conn, ours, proc.stderr.fileno(), proc, claim.stopped, self.idle_timeout, on_exit)
            finally:
                ours.close()
                if rc == -1 or proc.poll() is None:
                    kill(proc)
                reap(proc)
                proc.stderr.close()
            tail = tail or _tail(log_file)
            if rc != 0:
                LOG.warning("rsync session of task %s (cycle %s, %s) ended with exit %s: %s",
                            spec.task_id, spec.cycle, spec.path, rc, tail)
            else:
                LOG.info("rsync session of task %s (cycle %s, %s) done", spec.task_id, spec.cycle, spec.path)
            return rc
        finally:
            finish()

    def close_task(self, task_id: str, timeout: float = 10.0) -> None:
        """End the task's running session, if any, and wait until it is gone (a cycle is
        committed or discarded only after this)."""
        with self._lock:
            session = self._running.get(task_id)
        if session is None:
            return
        session.stopped.set()
        if session.proc is not None:
            kill(session.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.busy(task_id):
                return
            time.sleep(0.02)
        LOG.warning("the rsync session of task %s did not end within %.0f s", task_id, timeout)

    def stop(self) -> None:
        with self._lock:
            tasks = [t for t, s in self._running.items() if s is not None]
        for task_id in tasks:
            self.close_task(task_id)


def _tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.split("] ", 1)[-1] for line in lines[-3:])[-600:]


def frame(kind: int, payload: bytes) -> bytes:
    """One frame of the daemon-to-agent direction: kind (0 data, 1 daemon's stderr, 2 exit
    status as a signed 32-bit integer), payload length, payload (docs/protocol.md)."""
    return FRAME.pack(kind, len(payload)) + payload


def _pump(conn: Any, child: socket.socket, err_fd: int, proc: Popen,
          stopped: threading.Event, idle_timeout: float, on_exit: Callable[[], None]) -> int:
    """Copy the agent's bytes to the daemon as they are, and the daemon's output, its stderr and
    finally its exit status to the agent in frames. The agent's tunnel writes the data to rsync,
    the stderr to its stderr and exits with the daemon's status, as a remote shell does;
    ``on_exit`` runs between the daemon's exit and that last frame. ``conn`` is the upgraded
    connection: a :class:`~go2cloud_server.tlsstream.TLSConnection` (TLS in memory, safe to read
    and write from two threads) or, for plain http on loopback, the socket.

    One thread per direction (and one for stderr), each blocked in its own system calls, so
    every call moves whatever has arrived and nothing polls; this thread watches them: the
    session ends when the daemon's output and stderr end, when it is stopped, or when nothing
    moved for ``idle_timeout`` seconds. Returns the daemon's exit status (-1 if the session was
    stopped, timed out or the agent went away)."""
    raw: socket.socket = getattr(conn, "raw", conn)
    # agent -> daemon: decrypted straight into one buffer, as many records as have arrived
    recv_into: Callable[[memoryview], int] = (
        conn.recv_many_into if isinstance(conn, tlsstream.TLSConnection) else conn.recv_into)
    raw.settimeout(None)  # idleness is watched below, not by socket timeouts
    child.setblocking(True)
    os.set_blocking(err_fd, True)
    send_lock = threading.Lock()  # frames from two threads, never interleaved
    last = [time.monotonic()]
    agent_lost = threading.Event()

    def send(kind: int, payload: bytes) -> None:
        with send_lock:
            conn.sendall(frame(kind, payload))

    def upstream() -> None:  # agent -> daemon, raw
        buf = memoryview(bytearray(PUMP_BUFFER))
        try:
            while True:
                n = recv_into(buf)
                if not n:
                    break
                child.sendall(buf[:n])
                last[0] = time.monotonic()
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                child.shutdown(socket.SHUT_WR)  # the daemon sees end of file, as from a remote shell
            except OSError:
                pass

    def downstream(read: Callable[[], bytes], kind: int) -> None:  # daemon -> agent, framed
        try:
            while True:
                data = read()
                if not data:
                    return
                send(kind, data)
                last[0] = time.monotonic()
        except (OSError, ssl.SSLError):
            agent_lost.set()
            kill(proc)  # nobody to tell: end the daemon rather than leave it blocked

    workers = [
        threading.Thread(target=upstream, name="rsync-session-up", daemon=True),
        threading.Thread(target=downstream, args=(lambda: child.recv(PUMP_BUFFER), 0),
                         name="rsync-session-down", daemon=True),
        threading.Thread(target=downstream, args=(lambda: os.read(err_fd, 65536), 1),
                         name="rsync-session-stderr", daemon=True),
    ]
    for worker in workers:
        worker.start()

    def cut() -> None:
        kill(proc)
        try:
            raw.shutdown(socket.SHUT_RDWR)  # wakes the thread reading from the agent
        except OSError:
            pass
        for worker in workers:
            worker.join(5.0)

    try:
        while workers[1].is_alive() or workers[2].is_alive():
            workers[1].join(0.5)
            if stopped.is_set():
                cut()
                return -1
            if time.monotonic() - last[0] > idle_timeout:
                LOG.warning("rsync session idle for %.0f s: closed", idle_timeout)
                cut()
                return -1
        status = reap(proc)
        on_exit()
        if agent_lost.is_set():
            return -1
        try:
            send(2, struct.pack(">i", status))
        except (OSError, ssl.SSLError):
            pass
        return status
    finally:
        try:
            raw.shutdown(socket.SHUT_RDWR)  # the thread reading from the agent ends with the session
        except OSError:
            pass
        workers[0].join(5.0)
