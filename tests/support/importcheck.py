"""What a ``go2cloud_server`` command imports, read from ``python -X importtime`` (no timing:
the list of modules only), for the tests that keep operator commands fast to start
(docs/performance.md, "Issue 16: operator command start-up").

Modules the interpreter's start-up imports on this machine (``site`` and its ``.pth`` files) are
subtracted: they are not the command's doing, and they differ between machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[2]

#: never imported by an operator command: the server (its database, HTTP server, TLS certificate
#: generation, block receiver) and the agent-side libraries requests and cryptography
SERVER_ONLY = (
    "requests", "urllib3", "cryptography", "sqlite3", "_sqlite3", "http.server", "socketserver",
    "zstandard", "blake3", "xxhash", "concurrent.futures",
    "go2cloud_server.app", "go2cloud_server.service", "go2cloud_server.store",
    "go2cloud_server.httpapi", "go2cloud_server.blockrx", "go2cloud_server.rsyncd",
    "go2cloud_server.tls", "go2cloud_server.throttle", "go2cloud_server.space",
    "go2cloud_server.scheduler", "go2cloud_server.verifier", "go2cloud_server.heartbeat",
    "go2cloud_server.auth",
    # not the server's, but slow to import and not needed by an operator command (the server
    # and its modules log; the commands print)
    "logging",
)
#: not imported by ``--help`` either: the operator client and what only a command's run needs
RUN_ONLY = ("go2cloud_server.opclient", "http.client", "ssl", "json")


def _env(extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("GO2CLOUD_SERVER", None)
    env.update(extra or {})
    return env


def _modules(stderr: str) -> Set[str]:
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                found.add(name)
    return found


def imported(*args: str, env: Optional[Dict[str, str]] = None
             ) -> Tuple[subprocess.CompletedProcess, Set[str]]:
    """(the finished ``python -X importtime -m go2cloud_server ARGS``, the modules it imported
    beyond those of ``python -c pass``)."""
    base = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True,
                          text=True, env=_env(env), timeout=60, stdin=subprocess.DEVNULL, cwd=str(REPO))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "go2cloud_server", *args],
                          capture_output=True, text=True, env=_env(env), timeout=60, cwd=str(REPO),
                          stdin=subprocess.DEVNULL)
    mods = _modules(proc.stderr)
    # the check has something to check: the command's own module was imported and listed
    assert "go2cloud_server.cli" in mods and "click" in mods, proc.stderr[-2000:]
    return proc, mods - _modules(base.stderr)


def stderr_text(proc: subprocess.CompletedProcess) -> str:
    """The command's own stderr (without the ``import time:`` lines)."""
    return "".join(line for line in proc.stderr.splitlines(keepends=True)
                   if not line.startswith("import time:"))


def heavy(mods: Set[str], forbidden: Tuple[str, ...]) -> Set[str]:
    """The modules of ``mods`` that are, or are inside, one of ``forbidden``."""
    return {m for m in mods for f in forbidden if m == f or m.startswith(f + ".")}
