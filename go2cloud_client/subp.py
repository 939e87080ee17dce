"""The one way the agent runs a child process.

* Arguments are always a list (never a shell string); callers put ``--`` before paths.
* stdin is closed unless data is given; a timeout is always set for short runs.
* The environment is built on purpose: :func:`child_env` starts from the agent's environment,
  removes anything that looks like a secret, and adds what the caller passes (for example
  ``RSYNC_PASSWORD``), so secrets reach only the child that needs them.
* A failure raises :class:`ProcessError` carrying the command, exit code, stdout and stderr.
* Long runs (rsync) use :class:`StreamingProcess`: the child gets its own process group, stdout
  lines are handed to a callback as they arrive (``\\r`` counts as a line end, for progress
  output), stderr is drained on its own thread, and :meth:`StreamingProcess.terminate` stops the
  whole group, and the child dies with the agent: ``PR_SET_PDEATHSIG = SIGKILL`` (Linux), so an
  agent killed with ``kill -9`` (or by the OOM killer) leaves no rsync writing to the target while
  the restarted agent runs the cycle again (its tunnel reads end-of-file and ends too).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from go2cloud_client.errors import Go2CloudError

LOG = logging.getLogger(__name__)
#: what ends an output line: rsync rewrites its progress line with a carriage return
_LINE_END = re.compile(rb"[\r\n]")

#: Environment variables never inherited by children.
_SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "PASSPHRASE", "CREDENTIAL")

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Optional[Callable[..., int]] = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def die_with_parent(parent: int) -> None:
    """In the child (before exec, or at its start): SIGKILL when the thread of ``parent`` that
    started it ends (a ``kill -9`` of the agent ends them all at once). A parent that died before
    the prctl would never signal the child: it exits instead."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class ProcessError(Go2CloudError):
    """A child process failed (exit code not allowed, timeout, or could not be started)."""

    exit_code = 1
    code = "process_failed"
    summary = "a helper program failed"

    def __init__(
        self,
        cmd: Sequence[str],
        returncode: Optional[int],
        stdout: str = "",
        stderr: str = "",
        reason: str = "",
    ) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        what = reason or f"exited with status {returncode}"
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        message = f"{self.cmd[0]} {what}"
        if tail:
            message += ": " + " | ".join(tail)
        super().__init__(message)


@dataclass
class Result:
    cmd: List[str]
    returncode: int
    stdout: str
    stderr: str


def child_env(extra: Optional[Mapping[str, str]] = None, *, lang_c: bool = True) -> Dict[str, str]:
    """Environment for a child: inherited, minus secrets, plus ``extra``; ``LC_ALL=C`` so that
    output we parse is not translated."""
    env = {k: v for k, v in os.environ.items() if not any(m in k.upper() for m in _SECRET_MARKERS)}
    if lang_c:
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def run(
    args: Sequence[str],
    *,
    timeout: float = 60.0,
    rcs: Iterable[int] = (0,),
    data: Optional[bytes] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
) -> Result:
    """Run ``args`` to completion and return its output; raise ProcessError unless the exit code
    is in ``rcs``."""
    if isinstance(args, (str, bytes)):
        raise TypeError("subp.run takes an argument list, never a shell string")
    cmd = [os.fspath(a) for a in args]
    LOG.debug("running %s", cmd)
    try:
        proc = subprocess.run(
            cmd,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
            env=dict(env) if env is not None else child_env(),
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ProcessError(cmd, None, reason="is not installed (not found on PATH)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ProcessError(
            cmd, None, _decode(exc.stdout or b""), _decode(exc.stderr or b""),
            reason=f"timed out after {timeout:g}s",
        ) from exc
    out, err = _decode(proc.stdout), _decode(proc.stderr)
    if proc.returncode not in set(rcs):
        raise ProcessError(cmd, proc.returncode, out, err)
    return Result(cmd, proc.returncode, out, err)


def spawn_detached(args: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                   cwd: Optional[str] = None) -> subprocess.Popen[bytes]:
    """Start ``args`` as a daemon-like child: its own session (no controlling terminal, so it
    survives the caller's logout), stdin/stdout/stderr on /dev/null, not waited for. Returns
    the Popen (``poll()`` tells whether it exited already). Used to start the agent when no
    service manager runs."""
    if isinstance(args, (str, bytes)):
        raise TypeError("spawn_detached takes an argument list, never a shell string")
    cmd = [os.fspath(a) for a in args]
    LOG.debug("starting detached %s", cmd)
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(env) if env is not None else child_env(lang_c=False), cwd=cwd or "/",
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        raise ProcessError(cmd, None, reason=f"could not be started ({exc.strerror or exc})") from exc
    return proc


class StreamingProcess:
    """A long-running child in its own process group with live output.

    ``on_line`` is called from a reader thread for every stdout line (split on ``\\n`` and
    ``\\r``); stderr is collected (bounded to the last ``stderr_limit`` bytes) on another thread.
    Call :meth:`wait` to get the exit code; :meth:`terminate` stops the group (SIGTERM, then
    SIGKILL after ``grace`` seconds) and is safe to call from any thread, more than once.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        on_line: Optional[Callable[[str], None]] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stderr_limit: int = 256 * 1024,
    ) -> None:
        if isinstance(args, (str, bytes)):
            raise TypeError("StreamingProcess takes an argument list, never a shell string")
        self.cmd = [os.fspath(a) for a in args]
        self._on_line = on_line
        self._stderr_limit = stderr_limit
        self._stderr = bytearray()
        self._lock = threading.Lock()
        self.terminated = False
        LOG.debug("starting %s", self.cmd)
        parent = os.getpid()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env) if env is not None else child_env(),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(parent),  # noqa: PLW1509 - prctl only
            )
        except FileNotFoundError as exc:
            raise ProcessError(self.cmd, None, reason="is not installed (not found on PATH)") from exc
        self._out_thread = threading.Thread(target=self._read_stdout, name="subp-stdout", daemon=True)
        self._err_thread = threading.Thread(target=self._read_stderr, name="subp-stderr", daemon=True)
        self._out_thread.start()
        self._err_thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            lines = _LINE_END.split(buf + chunk)
            buf = lines.pop()  # the unfinished line
            for line in lines:
                self._emit(line)
        if buf:
            self._emit(buf)

    def _emit(self, line: bytes) -> None:
        if self._on_line is None or not line:
            return
        try:
            self._on_line(_decode(line))
        except Exception:  # a bad callback must not kill the reader (the child would block)
            LOG.exception("output callback failed")

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            chunk = self.proc.stderr.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            with self._lock:
                self._stderr += chunk
                if len(self._stderr) > self._stderr_limit:
                    del self._stderr[: len(self._stderr) - self._stderr_limit]

    @property
    def stderr(self) -> str:
        with self._lock:
            return _decode(bytes(self._stderr))

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the child; then stop what is left of its process group (e.g. rsync's remote
        shell still sitting on a stalled connection after rsync timed out: it would hold the
        output pipes open). The group id cannot have been reused while a member lives."""
        rc = self.proc.wait(timeout=timeout)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._out_thread.join(timeout=5)
        self._err_thread.join(timeout=5)
        return rc

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def terminate(self, grace: float = 5.0) -> None:
        self.terminated = True
        if self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return
                time.sleep(0.05)
