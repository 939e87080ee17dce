"""Entry point of the frozen ``go2cloud_client`` executable (PyInstaller, packaging/build.py).

Besides running the agent's CLI it answers one Python-interpreter form: the agent starts small
helper children as ``[sys.executable, "-I", "-B", "-c", CODE, ARGS...]`` (the fsfreeze guard of
snapshot_driver). In a frozen program ``sys.executable`` is this executable, so that form runs
CODE with ``sys.argv == ["-c", ARGS...]`` exactly as ``python -c`` would, instead of reaching the
agent's command line.

Two corrections of the frozen process's view, made before anything else runs:

- staticx (packaging/build.py) runs PyInstaller's program from a copy it unpacks into a
  temporary folder that is removed when it exits, so ``sys.executable`` names that copy;
  everything that starts the agent again (rsync's ``-e "<exe> rsync-tunnel"``, the service unit,
  the fsfreeze guard) and the package folder (home.py) must use the executable the operator ran,
  which staticx passes in ``STATICX_PROG_PATH``;
- PyInstaller sets ``LD_LIBRARY_PATH`` to its unpacked libraries (OpenSSL, zlib, libgcc_s built
  for this build host's glibc). The running process no longer needs it (the loader reads it once
  at start); the host programs the agent starts (rsync, lsblk, ...) must load the host's own
  libraries, so it is restored to what the operator had (``LD_LIBRARY_PATH_ORIG``) or removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from typing import List, MutableMapping, Optional

_INTERPRETER_FLAGS = ("-I", "-B", "-E", "-s", "-S", "-u")


def _python_c(argv: List[str]) -> bool:
    """Run ``[-I] [-B] ... -c CODE ARGS...``; False when ``argv`` is not that form."""
    args = argv[1:]
    while args and args[0] in _INTERPRETER_FLAGS:
        args = args[1:]
    if len(args) < 2 or args[0] != "-c":
        return False
    code = args[1]
    sys.argv = ["-c", *args[2:]]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    return True


def _same_dir(a: str, b: str) -> bool:
    """Whether two paths name one directory (``$TMPDIR`` may be ``/``, giving ``//staticx-...``)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fix_frozen_environment(environ: MutableMapping[str, str]) -> None:
    bundle, prog = environ.get("STATICX_BUNDLE_DIR"), environ.get("STATICX_PROG_PATH")
    if bundle and prog and _same_dir(os.path.dirname(sys.executable), bundle):
        sys.executable = prog
    if "LD_LIBRARY_PATH_ORIG" in environ:
        environ["LD_LIBRARY_PATH"] = environ.pop("LD_LIBRARY_PATH_ORIG")
    else:
        environ.pop("LD_LIBRARY_PATH", None)


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def _watch_staticx_wrapper(environ: MutableMapping[str, str], period: float = 1.0) -> None:
    """staticx's start-up process (the one the operator's shell started) forwards SIGTERM and
    SIGINT to the agent, not SIGHUP: a hang-up kills it and would leave the agent running
    orphaned and its unpacked copy in ``$TMPDIR/staticx-*``. So the agent watches that process
    (its grandparent: staticx starts PyInstaller's program, which starts this interpreter) and,
    once it is gone, removes the unpacked copy and stops as on a hang-up of its own."""
    bundle = environ.get("STATICX_BUNDLE_DIR")
    if not bundle or not os.path.isdir(bundle):
        return
    wrapper = _parent_of(os.getppid())
    if wrapper is None or wrapper <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(period)
            if os.getppid() != 1 and _parent_of(os.getppid()) == wrapper:
                continue
            shutil.rmtree(bundle, ignore_errors=True)
            os.kill(os.getpid(), signal.SIGHUP)
            return

    threading.Thread(target=watch, name="staticx-watch", daemon=True).start()


def run() -> None:
    frozen = getattr(sys, "frozen", False)
    if frozen:
        _fix_frozen_environment(os.environ)
        if _python_c(sys.argv):
            return
    if sys.argv[1:2] == ["rsync-tunnel"]:  # rsync's transport, started for every rsync run
        from go2cloud_client.replication import tunnel

        sys.exit(tunnel.main(sys.argv[2:]))
    if frozen:
        _watch_staticx_wrapper(os.environ)
    from go2cloud_client.cli import main

    main()


if __name__ == "__main__":
    run()
