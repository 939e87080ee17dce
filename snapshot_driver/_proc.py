"""The one way snapshot_driver runs a child process (standard library only).

* Arguments are always a list, never a shell string; callers put ``--`` before paths where the
  tool accepts it.
* stdin is closed, a timeout is always set, ``LC_ALL=C`` so the output we parse is not
  translated.
* The environment is built on purpose (:func:`child_env`): the caller's, minus anything that
  looks like a secret (the same markers as the agent's ``go2cloud_client/subp.py``: a token code,
  an rsync password never reach ``lvcreate`` or ``fsfreeze``).
* A failure raises :class:`ProcessError` carrying the command, exit code, stdout and stderr.
  Backends turn it into a :class:`snapshot_driver.base.SnapshotError` with a stable code.

:func:`start_guard` is the single exception to "stdin closed": it starts a long-lived guard
process whose stdin is a pipe held by this process, so the guard sees EOF when we die.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

LOG = logging.getLogger(__name__)

#: a guard process (:func:`start_guard`), and the error of a wait for one that outlived its timeout
Guard = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired


class ProcessError(Exception):
    """A child process could not be started, timed out, or exited with a code not allowed."""

    def __init__(self, cmd: Sequence[str], returncode: Optional[int], stdout: str = "",
                 stderr: str = "", reason: str = "") -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        self.not_found = reason == "not_found"
        what = "is not installed (not found on PATH)" if self.not_found else (
            reason or f"exited with status {returncode}")
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        message = f"{self.cmd[0] if self.cmd else '?'} {what}"
        if tail:
            message += ": " + " | ".join(tail)
        super().__init__(message)


@dataclass
class Result:
    cmd: List[str]
    returncode: int
    stdout: str
    stderr: str


#: Environment variables never inherited by children: a name containing one of these (any case).
#: The same list as the agent's (go2cloud_client/subp.py); snapshot_driver imports nothing of
#: the agent, so it is written here too.
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "PASSPHRASE", "CREDENTIAL")


def child_env() -> Dict[str, str]:
    """Environment for a child: inherited minus secrets, ``LC_ALL=C`` and ``LANG=C``."""
    env = {k: v for k, v in os.environ.items() if not any(m in k.upper() for m in SECRET_MARKERS)}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _decode(data: Optional[bytes]) -> str:
    return (data or b"").decode("utf-8", errors="surrogateescape")


def which(name: str) -> Optional[str]:
    """Full path of ``name`` on PATH, or None."""
    return shutil.which(name)


def run(args: Sequence[str], *, timeout: float = 120.0, rcs: Iterable[int] = (0,)) -> Result:
    """Run ``args`` to completion; raise ProcessError unless its exit code is in ``rcs``."""
    if isinstance(args, (str, bytes)):
        raise TypeError("_proc.run takes an argument list, never a shell string")
    cmd = [os.fspath(a) for a in args]
    LOG.debug("running %s", cmd)
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, env=child_env(), check=False)
    except FileNotFoundError as exc:
        raise ProcessError(cmd, None, reason="not_found") from exc
    except subprocess.TimeoutExpired as exc:
        raise ProcessError(cmd, None, _decode(exc.stdout), _decode(exc.stderr),
                           reason=f"timed out after {timeout:g}s") from exc
    res = Result(cmd, proc.returncode, _decode(proc.stdout), _decode(proc.stderr))
    if proc.returncode not in tuple(rcs):
        raise ProcessError(cmd, proc.returncode, res.stdout, res.stderr)
    return res


def start_guard(args: Sequence[str]) -> Guard[bytes]:
    """Start a guard process in its own session with stdin as a pipe we keep open.

    The guard's stdout/stderr go to /dev/null. Closing (or dying with) the pipe is the signal.
    """
    cmd = [os.fspath(a) for a in args]
    LOG.debug("starting guard %s", cmd)
    try:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    except FileNotFoundError as exc:
        raise ProcessError(cmd, None, reason="not_found") from exc
