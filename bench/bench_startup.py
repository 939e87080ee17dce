#!/usr/bin/env python3
"""Start-up time of the operator commands and of the packaged agent (docs/performance.md,
"Executable startup" and "Issue 16: operator command start-up").

    PYTHONPATH=$PWD python3 bench/bench_startup.py [--runs 20] [--compare-ref main] [--only operator|agent]
                                                   [--exe PATH ...]

Operator commands (``go2cloud_server``): ``--help``, each group's ``--help``, ``source list
--help``, ``migration start --help`` and ``source list`` / ``workgroup list --json`` against a
server the bench starts (``serve`` on 127.0.0.1, port 0, a temporary data directory; the
commands find it through ``GO2CLOUD_DATA_DIR`` as an operator on the server machine does), run
as ``python3 -m go2cloud_server`` and through the console script (``go2cloud_server`` of
pyproject.toml, the file pip writes: its ``python3`` runs it directly, without a shell shim). For
reference, the same interpreter's ``-c pass`` and ``-c "import click"``: the floor every Python
command pays on this machine. ``--compare-ref REF`` measures the ``go2cloud_server`` package of
that git ref too (``git archive`` into a temporary directory: no worktree, nothing changed in the
repository), run by run interleaved with this tree so both see the same load; both talk to the
same server (this tree's). Each tree is byte-compiled first (``compileall``), as an installed
package is, and the bench checks which tree's code each run imports.

The packaged agent: the staticx executable (build/pyinstaller/dist/static/go2cloud_client) and
PyInstaller's before staticx (build/pyinstaller/dist/go2cloud_client), both from ``python3
packaging/build.py``; ``--version`` and ``rsync-tunnel`` with no tunnel environment (the tunnel
starts exactly as for every rsync run, unpacks, imports its module, reads its settings and stops
before any network I/O: the per-rsync-run start cost).

Wall-clock median, min and max of ``--runs`` runs and the median CPU time (user + system of the
process and the children it waits for) in milliseconds. Wall-clock times depend on the
machine's load (the shared development machine: say so with the figures); the CPU time much
less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

#: the operator commands measured (each group's --help, the commands the issue names)
OPERATOR_COMMANDS: List[Tuple[str, ...]] = [
    ("--help",),
    ("serve", "--help"),
    ("workgroup", "--help"),
    ("code", "--help"),
    ("source", "--help"),
    ("migration", "--help"),
    ("drill", "--help"),
    ("source", "list", "--help"),
    ("migration", "start", "--help"),
    ("source", "list"),
    ("workgroup", "list", "--json"),
]
#: the ones also run through the console script
CONSOLE_COMMANDS: List[Tuple[str, ...]] = [("--help",), ("source", "list")]


def measure_once(argv: Sequence[str], env: Dict[str, str], cwd: Optional[Path] = None,
                 check: bool = False) -> Tuple[float, float]:
    """Wall-clock seconds and CPU seconds (user + system of the process and the children it
    waits for: staticx's start-up code, PyInstaller's two processes) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    proc = subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=env, cwd=str(cwd) if cwd else None, check=False)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def measure(argv: List[str], runs: int) -> Tuple[List[float], List[float]]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYINSTALLER_RESET_ENVIRONMENT": "1"}
    wall, cpu = [], []
    for _ in range(runs):
        w, c = measure_once(argv, env)
        wall.append(w)
        cpu.append(c)
    return wall, cpu


# ----------------------------------------------------------------------------------------------
# the packaged agent
def bench_agent(exes: List[Path], runs: int) -> None:
    print(f"{'executable':50} {'size MB':>8} {'what':13} {'wall median':>11} {'min':>5} {'max':>5} "
          f"{'CPU median':>10}  (seconds)")
    for exe in exes:
        if not exe.is_file():
            print(f"{exe}: missing (python3 packaging/build.py)", file=sys.stderr)
            continue
        size = os.path.getsize(exe) / 1e6
        for what, argv in (("--version", [str(exe), "--version"]),
                           ("rsync-tunnel", [str(exe), "rsync-tunnel"])):
            wall, cpu = measure(argv, runs)
            name = str(exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe)
            print(f"{name:50} {size:8.1f} {what:13} {statistics.median(wall):11.2f} {min(wall):5.2f} "
                  f"{max(wall):5.2f} {statistics.median(cpu):10.2f}")


# ----------------------------------------------------------------------------------------------
# the operator commands
class Tree:
    """A ``go2cloud_server`` package to measure: this checkout, or a ref exported from git."""

    def __init__(self, name: str, path: Path, env: Dict[str, str]):
        self.name = name
        self.path = path
        self.env = dict(env, PYTHONPATH=str(path))
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(path / "go2cloud_server")],
                       check=True, stdout=subprocess.DEVNULL, env=dict(self.env, PYTHONDONTWRITEBYTECODE=""))
        ran = subprocess.run([sys.executable, "-c", "import go2cloud_server.cli as c; print(c.__file__)"],
                             capture_output=True, text=True, env=self.env, cwd=str(path), check=True)
        where = Path(ran.stdout.strip()).resolve()
        if not where.is_relative_to(path.resolve()):
            raise SystemExit(f"{name}: go2cloud_server.cli comes from {where}, not from {path}")


def export_ref(ref: str, into: Path) -> Path:
    """The ``go2cloud_server`` package of git ``ref`` under ``into`` (git archive: read only)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "go2cloud_server"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def start_server(data_dir: Path) -> Tuple[subprocess.Popen, Dict[str, object]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(data_dir.parent / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "go2cloud_server", "serve", "--listen", "127.0.0.1:0",
                             "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))
    info_file = data_dir / "server.json"
    deadline = time.monotonic() + 60
    while not info_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: see {log.name}")
        time.sleep(0.1)
    return proc, json.loads(info_file.read_text())


def console_script() -> Optional[Path]:
    """The ``go2cloud_server`` entry point pip wrote for this interpreter (None when absent)."""
    path = Path(sysconfig.get_path("scripts")) / "go2cloud_server"
    return path if path.is_file() else None


def bench_operator(runs: int, compare_ref: Optional[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp_name:
        tmp = Path(tmp_name)
        server, info = start_server(tmp / "data")
        try:
            base_env = {k: v for k, v in os.environ.items()
                        if k not in ("GO2CLOUD_SERVER", "GO2CLOUD_ADMIN_TOKEN", "PYTHONPATH")}
            base_env["GO2CLOUD_DATA_DIR"] = str(tmp / "data")
            trees = [Tree("this tree", ROOT, base_env)]
            if compare_ref:
                ref_dir = tmp / "ref"
                ref_dir.mkdir()
                trees.insert(0, Tree(compare_ref, export_ref(compare_ref, ref_dir), base_env))
            script = console_script()
            rows: List[Tuple[str, List[str]]] = [("python3 -c pass", ["-c", "pass"]),
                                                 ("python3 -c 'import click'", ["-c", "import click"])]
            rows += [("-m go2cloud_server " + " ".join(c), ["-m", "go2cloud_server", *c])
                     for c in OPERATOR_COMMANDS]
            if script is not None:
                rows += [("go2cloud_server " + " ".join(c), [str(script), *c]) for c in CONSOLE_COMMANDS]
            for tree in trees:  # each command works before it is timed
                for _, args in rows:
                    measure_once([sys.executable, *args], tree.env, tree.path, check=True)
            results: Dict[Tuple[str, str], Tuple[List[float], List[float]]] = {
                (label, tree.name): ([], []) for label, _ in rows for tree in trees}
            for _ in range(runs):  # interleaved: every command of every tree once per round
                for label, args in rows:
                    for tree in trees:
                        w, c = measure_once([sys.executable, *args], tree.env, tree.path)
                        results[(label, tree.name)][0].append(w)
                        results[(label, tree.name)][1].append(c)
            print(f"operator commands: {runs} runs each, interleaved; server {info['url']}; "
                  f"{sys.executable} (Python {sys.version.split()[0]}); load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print(f"{'command':46} {'tree':10} {'wall median':>11} {'min':>5} {'max':>5} {'CPU median':>10}"
                  f"{'  wall/ref':>10}  (milliseconds)")
            for label, _ in rows:
                ref_median = statistics.median(results[(label, trees[0].name)][0])
                for tree in trees:
                    wall, cpu = results[(label, tree.name)]
                    ratio = f"{statistics.median(wall) / ref_median:9.2f}x" if len(trees) > 1 else ""
                    print(f"{label:46} {tree.name:10} {statistics.median(wall) * 1e3:11.0f} "
                          f"{min(wall) * 1e3:5.0f} {max(wall) * 1e3:5.0f} {statistics.median(cpu) * 1e3:10.0f}"
                          f" {ratio}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", choices=("operator", "agent"))
    parser.add_argument("--compare-ref", metavar="REF",
                        help="also measure the operator commands of this git ref (e.g. main)")
    parser.add_argument("--exe", action="append", type=Path, help="agent executable (repeat)")
    args = parser.parse_args()
    if args.only != "agent":
        bench_operator(args.runs, args.compare_ref)
    if args.only != "operator":
        if args.only is None:
            print()
        bench_agent(args.exe or [ROOT / "build/pyinstaller/dist/static/go2cloud_client",
                                 ROOT / "build/pyinstaller/dist/go2cloud_client"], args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
