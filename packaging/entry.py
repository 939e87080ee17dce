"""Entry point of the frozen ``go2cloud_client`` executable (PyInstaller, packaging/build.py).

Besides running the agent's CLI it answers one Python-interpreter form: the agent starts small
helper children as ``[sys.executable, "-I", "-B", "-c", CODE, ARGS...]`` (the fsfreeze guard of
snapshot_driver). In a frozen program ``sys.executable`` is this executable, so that form runs
CODE with ``sys.argv == ["-c", ARGS...]`` exactly as ``python -c`` would, instead of reaching the
agent's command line.
"""

from __future__ import annotations

import sys
from typing import List

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


def run() -> None:
    if getattr(sys, "frozen", False) and _python_c(sys.argv):
        return
    if sys.argv[1:2] == ["rsync-tunnel"]:  # rsync's transport, started for every rsync run
        from go2cloud_client.replication import tunnel

        sys.exit(tunnel.main(sys.argv[2:]))
    from go2cloud_client.cli import main

    main()


if __name__ == "__main__":
    run()
