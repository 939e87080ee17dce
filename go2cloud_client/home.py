"""The agent home: where config, identity, state, logs and exclusion lists live.

Layout (directory 0700, files 0600, every write atomic through :func:`atomic_write`)::

    <home>/config.yaml                 operator settings (optional)
    <home>/identity/key.pem            Ed25519 private key (PKCS#8 PEM)
    <home>/identity/previous_key.pem   the key of the aborted import, kept until the next import
                                       proved it to have the old source replaced (then deleted)
    <home>/state/source.json           the imported source (id, workgroup, server, pin)
    <home>/state/task.json             current task (never the target password)
    <home>/state/ledger.json           command journal (exactly-once; file name kept)
    <home>/state/status.json           live status for ``go2cloud_client status``
    <home>/state/children.json         process groups of running rsync children
    <home>/state/host_changes.json     host change journal (what the agent changed, with the undo)
    <home>/state/machine_id            generated machine id when the OS has none
    <home>/state/previous_source_id    the source replaced by the next import (after --abort)
    <home>/agent.lock, agent.pid       one agent per home
    <home>/Logs/go2cloud_client.log    rotating log, UTC timestamps
    <home>/Excludes/                   rsync exclusion lists

Which directory: ``--home``, then ``$GO2CLOUD_HOME``, then the folder of the executable when it
runs from an extracted package, else the system location (``/var/lib/go2cloud_client``).
"""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from go2cloud_client import platform
from go2cloud_client.atomicfile import atomic_write
from go2cloud_client.errors import AlreadyRunningError, ConfigError, HomeFullError

LOG = logging.getLogger(__name__)

STATE_VERSION = 1
HOME_ENV = "GO2CLOUD_HOME"
LOG_NAME = "go2cloud_client.log"
#: free space the agent asks for in its home when it is full (state files, logs, rsync filter)
HOME_MIN_FREE = 10 * 1024 * 1024


def _launcher_dir() -> Optional[Path]:
    """The package folder when running from an extracted package: sys.frozen (single-file
    executable), or a folder with ``Excludes/`` next to a ``go2cloud_client`` launcher."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    argv0 = sys.argv[0] if sys.argv else ""
    if not argv0:
        return None
    folder = Path(argv0).resolve().parent
    if (folder / "Excludes").is_dir() and any(
        (folder / name).exists() for name in ("go2cloud_client", "go2cloud_client.exe")
    ):
        return folder
    return None


def resolve_home(flag: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Path:
    environ = os.environ if environ is None else environ
    if flag:
        return Path(flag).expanduser().absolute()
    if environ.get(HOME_ENV):
        return Path(environ[HOME_ENV]).expanduser().absolute()
    return _launcher_dir() or platform.system_home()


class Home:
    """Paths and file access for one agent home. Cheap to create; :meth:`ensure` creates it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config_file = self.root / "config.yaml"
        self.identity_dir = self.root / "identity"
        self.key_file = self.identity_dir / "key.pem"
        self.previous_key_file = self.identity_dir / "previous_key.pem"
        self.state_dir = self.root / "state"
        self.source_file = self.state_dir / "source.json"
        self.task_file = self.state_dir / "task.json"
        self.command_journal_file = self.state_dir / "ledger.json"
        self.status_file = self.state_dir / "status.json"
        self.children_file = self.state_dir / "children.json"
        self.host_changes_file = self.state_dir / "host_changes.json"
        self.machine_id_file = self.state_dir / "machine_id"
        self.previous_source_file = self.state_dir / "previous_source_id"
        self.lock_file = self.root / "agent.lock"
        self.pid_file = self.root / "agent.pid"
        self.logs_dir = self.root / "Logs"
        self.log_file = self.logs_dir / LOG_NAME
        self.excludes_dir = self.root / "Excludes"
        self.work_dir = self.state_dir / "work"

    def __repr__(self) -> str:
        return f"Home({str(self.root)!r})"

    # -- creation ---------------------------------------------------------------------------

    def ensure(self, *, excludes: bool = True) -> None:
        """Create the home (0700) and its directories; install the exclusion lists."""
        try:
            for directory in (self.root, self.identity_dir, self.state_dir, self.logs_dir, self.work_dir):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(directory, 0o700)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the agent home {self.root}: {exc.strerror or exc}; "
                "run as root or choose another directory with --home"
            ) from exc
        if excludes:
            from go2cloud_client.replication.excludes import ensure_home_excludes

            ensure_home_excludes(self.root)

    def exists(self) -> bool:
        return self.root.is_dir()

    # -- files ------------------------------------------------------------------------------

    def write_bytes(self, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.full_error(path, exc) from exc
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def free_bytes(self) -> Optional[int]:
        """Free space of the home's filesystem for this user (None if it cannot be read)."""
        try:
            st = os.statvfs(str(self.root))
        except (OSError, AttributeError):
            return None
        return st.f_bavail * st.f_frsize

    def has_room(self) -> bool:
        free = self.free_bytes()
        return free is None or free >= HOME_MIN_FREE

    def full_error(self, path: Path, exc: Optional[OSError] = None) -> HomeFullError:
        free = self.free_bytes()
        have = f"{free // 1024} KiB free" if free is not None else "free space unknown"
        why = exc.strerror if exc is not None and exc.strerror else "No space left on device"
        return HomeFullError(
            f"the agent home {self.root} is full ({why} writing {path.name}; {have}): free at least "
            f"{HOME_MIN_FREE // (1024 * 1024)} MiB on that filesystem; the agent waits and resumes by "
            "itself when space returns")

    def read_text(self, path: Path) -> Optional[str]:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def write_state(self, path: Path, data: Mapping[str, Any]) -> None:
        """Write a versioned JSON state file atomically (``"version": 1`` is added)."""
        doc = {"version": STATE_VERSION, **{k: v for k, v in data.items() if k != "version"}}
        self.write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"))

    def read_state(self, path: Path) -> Optional[Dict[str, Any]]:
        """Read a versioned JSON state file; None when absent. A corrupt file or a version newer
        than this agent understands is a ConfigError that says what to do."""
        text = self.read_text(path)
        if text is None:
            return None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(
                f"state file {path} is corrupt ({exc}); move it away to start over "
                "(go2cloud_client --abort forgets the import)"
            ) from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"state file {path} is corrupt (not a JSON object)")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"state file {path} has no valid \"version\"; it is not an agent state file")
        if version > STATE_VERSION:
            raise ConfigError(
                f"state file {path} has version {version}, but this agent understands up to "
                f"{STATE_VERSION}: it was written by a newer go2cloud_client; upgrade the agent"
            )
        return doc

    def remove(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ConfigError(f"cannot remove {path}: {exc.strerror or exc}") from exc
        return True

    # -- small helpers for specific files ---------------------------------------------------

    def read_pid(self) -> Optional[int]:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        try:
            return int(text)
        except ValueError:
            return None

    def imported_source(self) -> Optional[Dict[str, Any]]:
        """source.json of a complete import (a source id and the identity key), None when this
        home is not imported; an unreadable source.json is the ConfigError of :meth:`read_state`
        (the caller decides whether that is fatal)."""
        if not self.exists():
            return None
        source = self.read_state(self.source_file)
        return source if source and source.get("source_id") and self.key_file.exists() else None

    def previous_source_id(self) -> Optional[str]:
        text = self.read_text(self.previous_source_file)
        if not text:
            return None
        return text.strip() or None

    def children(self) -> Dict[str, Any]:
        try:
            return self.read_state(self.children_file) or {}
        except ConfigError:
            return {}

    def set_child(self, pid: Optional[int]) -> None:
        """Record (or clear, with None) the process group of the running rsync child."""
        if pid is None:
            self.write_state(self.children_file, {"pgids": []})
        else:
            self.write_state(self.children_file, {"pgids": [pid]})


class HomeLock:
    """``agent.lock`` (flock) plus ``agent.pid``: at most one agent per home."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(str(self.home.lock_file), os.O_RDWR | os.O_CREAT, 0o600)
        if not platform.lock_exclusive(fd):
            os.close(fd)
            pid = self.home.read_pid()
            who = f" (pid {pid})" if pid else ""
            raise AlreadyRunningError(
                f"another go2cloud_client is already running with the home {self.home.root}{who}; "
                "stop it first (go2cloud_client --abort stops it and forgets the import), "
                "or use another --home"
            )
        self._fd = fd
        self.home.write_bytes(self.home.pid_file, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.home.read_pid() == os.getpid():
                self.home.remove(self.home.pid_file)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        try:
            platform.unlock(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HomeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_held(home: Home) -> bool:
    """Whether some process holds the home lock (i.e. an agent is running)."""
    if not home.lock_file.exists():
        return False
    try:
        fd = os.open(str(home.lock_file), os.O_RDWR)
    except OSError:
        return False
    try:
        if platform.lock_exclusive(fd):
            platform.unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:  # noqa: N802
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class _LogFileHandler(logging.handlers.RotatingFileHandler):
    """The agent's log file. A full home (ENOSPC/EDQUOT) does not print a traceback per line to
    stderr: one line says so, the lines stay in the file's buffer (written when space returns,
    as far as the buffer holds them) and the agent reports the full home through its heartbeat."""

    _full = False

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._note_full(exc)
            return
        self._full = False

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._note_full(exc)
            return
        super().handleError(record)

    def _note_full(self, exc: OSError) -> None:
        if not self._full:
            self._full = True
            sys.stderr.write(f"go2cloud_client: cannot write the log file {self.baseFilename} "
                             f"({exc.strerror}): the agent home is full; log lines wait in memory "
                             "until space returns\n")


_LOG_PATH: Optional[Path] = None


def configure_logging(home: Home, level: str = "INFO") -> Path:
    """Log to ``<home>/Logs/go2cloud_client.log`` (rotating, 10 MiB x 5, UTC timestamps)."""
    global _LOG_PATH
    home.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_go2cloud", False):
            root.removeHandler(handler)
            handler.close()
    handler = _LogFileHandler(
        str(home.log_file), maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
    )
    handler._go2cloud = True  # type: ignore[attr-defined]
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    try:
        os.chmod(home.log_file, 0o600)
    except OSError:
        pass
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _LOG_PATH = home.log_file
    return home.log_file


def log_path() -> Optional[Path]:
    """The log file configured by :func:`configure_logging`, if any."""
    return _LOG_PATH
