"""The reference target's rsync daemon: one real ``rsync --daemon`` per server, one module per task.

rsyncd re-reads its configuration file for every connection, so modules are added and removed
by rewriting the file atomically; the daemon never needs a restart. Each module is confined to
its task directory (``use chroot`` when running as root), authenticates one user from its own
secrets file (0600, ``strict modes``), keeps numeric owners (``uid = 0``/``gid = 0`` when root so
the receiver can set any owner) and stores symlinks verbatim (``munge symlinks = false``: safe
because the module belongs to one task and chroot confines the daemon).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from go2cloud_server.atomicfile import write_atomic

LOG = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RsyncDaemonError(RuntimeError):
    """The rsync daemon could not be started or configured (the message says why)."""


@dataclass(frozen=True)
class _Module:
    name: str
    path: Path
    user: str
    secrets: Path


def _check_name(kind: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(f"invalid rsync {kind} {value!r}: use 1-64 of A-Z a-z 0-9 . _ -")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_busy(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class RsyncDaemon:
    """A real ``rsync --daemon`` listening on ``host:port`` with per-task modules."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", port: int = 8873,
                 rsync_path: str = "rsync", max_connections: int = 8) -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port
        self.rsync_path = rsync_path
        self.max_connections = max_connections
        self._modules: Dict[str, _Module] = {}
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._as_root = os.geteuid() == 0

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.state_dir / "rsyncd.conf"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "rsyncd.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "rsyncd.pid"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- configuration -------------------------------------------------------------------------
    def _render(self) -> str:
        lines = [
            "# written by go2cloud_server; rewritten on every module change, do not edit",
            f"pid file = {self.pid_path}",
            f"lock file = {self.state_dir / 'rsyncd.lock'}",
            f"log file = {self.log_path}",
            "reverse lookup = no",
            "",
        ]
        for mod in sorted(self._modules.values(), key=lambda m: m.name):
            lines += [
                f"[{mod.name}]",
                f"    path = {mod.path}",
                "    read only = false",
                "    write only = false",
                "    list = false",
                f"    auth users = {mod.user}",
                f"    secrets file = {mod.secrets}",
                "    strict modes = true",
                "    numeric ids = true",
                "    munge symlinks = false",
                f"    max connections = {self.max_connections}",
                "    transfer logging = false",
            ]
            if self._as_root:
                lines += ["    use chroot = true", "    uid = 0", "    gid = 0"]
            else:
                lines += ["    use chroot = false"]
            lines.append("")
        return "\n".join(lines)

    def _write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, self._render().encode(), 0o600)

    def add_module(self, name: str, path: Path, user: str, password: str) -> None:
        """Add (or replace) module ``name`` serving ``path`` to ``user`` with ``password``."""
        _check_name("module name", name)
        _check_name("user", user)
        if not password or any(c in password for c in "\x00\r\n") or len(password) > 1024:
            raise ValueError("invalid rsync password (empty, too long, or contains NUL/newline)")
        path = Path(path).resolve()
        if any(c in str(path) for c in "\n\r\x00"):
            raise ValueError("module path contains a control character")
        path.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.secrets_dir, 0o700)
            secrets = self.secrets_dir / f"{name}.secrets"
            write_atomic(secrets, f"{user}:{password}\n".encode(), 0o600)
            self._modules[name] = _Module(name, path, user, secrets)
            self._write_config()
        LOG.info("rsync module %s added (path %s, user %s)", name, path, user)

    def remove_module(self, name: str) -> None:
        with self._lock:
            mod = self._modules.pop(name, None)
            if mod is None:
                return
            self._write_config()
            try:
                mod.secrets.unlink()
            except FileNotFoundError:
                pass
        LOG.info("rsync module %s removed", name)

    def modules(self) -> List[str]:
        with self._lock:
            return sorted(self._modules)

    # -- process -------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        rsync = shutil.which(self.rsync_path)
        if rsync is None:
            raise RsyncDaemonError(
                f"rsync is not installed ({self.rsync_path!r} not found on PATH): install the "
                "'rsync' package (e.g. apt-get install rsync) to serve file-level migrations"
            )
        if self.port == 0:
            self.port = _free_port(self.host)
        elif _port_busy(self.host, self.port):
            raise RsyncDaemonError(
                f"cannot start the rsync daemon: {self.host}:{self.port} is already in use; "
                "choose another port"
            )
        with self._lock:
            self._write_config()
        args = [rsync, "--daemon", "--no-detach", f"--config={self.config_path}",
                f"--address={self.host}", f"--port={self.port}"]
        LOG.info("starting rsync daemon on %s:%s", self.host, self.port)
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log_tail = self._log_tail()
                self._proc = None
                detail = (err.strip() or log_tail).strip()
                if "in use" in detail:
                    raise RsyncDaemonError(
                        f"cannot start the rsync daemon: {self.host}:{self.port} is already in use")
                raise RsyncDaemonError(f"the rsync daemon exited at start: {detail[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.settimeout(1.0)
                    greeting = s.recv(64)
                if greeting.startswith(b"@RSYNCD:"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RsyncDaemonError(f"the rsync daemon did not accept connections on {self.host}:{self.port}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1000:]
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=grace)
        if proc.stderr:
            proc.stderr.close()
        LOG.info("rsync daemon on %s:%s stopped", self.host, self.port)

    def __enter__(self) -> RsyncDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
