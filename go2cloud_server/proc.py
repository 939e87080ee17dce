"""The one way the server runs a child process (the rsync daemon of a session, the filesystem
checks of a block generation); no other module of ``go2cloud_server`` imports ``subprocess``.

* Arguments are always a list (never a shell string).
* The environment is minimal and built on purpose (:func:`child_env`): ``PATH`` and the C locale,
  plus what the caller passes. Nothing else of the server's environment is inherited, so no
  secret (``GO2CLOUD_ADMIN_TOKEN``, a ``*_PASSWORD``...) reaches a child.
* Every child leads its own session (``killpg`` reaches what it starts) and has no inherited file
  descriptors but the ones given.
* :func:`run` always has a timeout: the child's process group is killed when it runs out and
  :data:`TimeoutExpired` is raised.
* ``die_with_server=True`` sets ``PR_SET_PDEATHSIG = SIGKILL`` (Linux) in the child before exec
  (see :mod:`go2cloud_server.children`, whose registry starts the children it records this way).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

#: the type of a started child, and the error of a run that outlived its timeout
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

#: the search path of a child when the server has none
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def child_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A child's whole environment: the server's ``PATH``, ``LC_ALL=C`` and ``LANG=C`` (output
    that is parsed is never translated), then ``extra``."""
    env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "LC_ALL": "C", "LANG": "C"}
    if extra:
        env.update(extra)
    return env


def die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when the thread of ``parent`` that started it ends (a
    ``kill -9`` of the server ends them all at once). A parent that died before the prctl would
    never signal the child: it exits instead."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def spawn(argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, die_with_server: bool = False,
          **kw: Any) -> subprocess.Popen:
    """Start ``argv`` (``subprocess.Popen`` keywords in ``kw`` for its standard streams and
    directory) in its own session with :func:`child_env` (``env``: the variables added to it)."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("proc.spawn takes an argument list, never a shell string")
    for key in ("env", "shell", "start_new_session", "preexec_fn"):
        if key in kw:
            raise TypeError(f"proc.spawn sets {key} itself")
    kw.setdefault("close_fds", True)
    preexec: Optional[Callable[[], None]] = None
    if die_with_server:
        parent = os.getpid()

        def preexec() -> None:
            die_with_parent(parent)

    return subprocess.Popen([os.fspath(a) for a in argv], env=child_env(env), start_new_session=True,
                            preexec_fn=preexec, **kw)  # noqa: PLW1509


def run(argv: Sequence[str], *, timeout: float, env: Optional[Mapping[str, str]] = None,
        spawner: Optional[Callable[..., subprocess.Popen]] = None,
        input: Optional[bytes] = None) -> Tuple[int, bytes]:
    """Run ``argv`` to its end: (exit status, stdout and stderr together). Its stdin is ``input``
    (e.g. sfdisk's script), else closed. When ``timeout`` runs out its process group is killed and
    :data:`TimeoutExpired` raised; a child not found raises FileNotFoundError. ``spawner``
    (default :func:`spawn`) starts the child (the children registry passes its own, which records
    it)."""
    child = (spawner or spawn)(argv, env=env, stdin=PIPE if input is not None else DEVNULL, stdout=PIPE,
                               stderr=STDOUT)
    try:
        out, _ = child.communicate(input=input, timeout=timeout)
        return child.returncode, out
    except TimeoutExpired:
        kill_group(child.pid)
        child.communicate()
        raise
    finally:
        if child.poll() is None:
            kill_group(child.pid)
            child.wait()


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (the child and what it started), else the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def kill(child: subprocess.Popen) -> None:
    """SIGKILL a started child's process group unless it has exited already."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


def reap(child: subprocess.Popen, grace: float = 5.0) -> int:
    """Wait up to ``grace`` seconds for ``child``; killed (and -1) when it is still running."""
    try:
        return child.wait(timeout=grace)
    except TimeoutExpired:
        kill(child)
        child.wait(timeout=grace)
        return -1
