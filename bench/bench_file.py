#!/usr/bin/env python3
"""File-level benchmark: the agent against plain rsync (ssh, daemon), rsync -z and cp, full and
incremental, on a fast link or one shaped with tc; and the idle agent's footprint.

Run by hand (never in CI), as root, after ./scripts/setup.sh, from the checkout whose code you mean
to measure (the agent and server are started with PYTHONPATH set to it):

    PYTHONPATH=$PWD python3 bench/bench_file.py [--files 20000] [--rounds 5] [--idle-seconds 30]
        [--compression 7] [--shaped-mbit 100] [--peers agent,ssh,ssh-z,daemon,cp]

Needs rsync, and for the ssh peers OpenSSH's server and client (Debian: ``apt-get install
openssh-server``): the bench starts its own ``sshd`` on a free loopback port with a host key and a
client key it generates in its work directory (nothing of the machine's ssh configuration is used
or changed), and stops it at the end.

What it does, all in one run so the ratios compare like with like:

1. builds a tree of ``--files`` files (sizes 1 KiB - 256 KiB, log-uniform, a third random bytes,
   the rest text) in its work directory;
2. starts the reference server and one agent, imports it, and measures the idle agent: peak RSS
   and CPU use over ``--idle-seconds`` while it heartbeats and long-polls;
3. ``--rounds`` rounds; in each, every tool makes a **full** copy into a fresh target, then ~5% of
   the files get new contents (the same files for every tool), then every tool makes an
   **incremental** copy over its full one; the order of the tools rotates from round to round:
   - ``agent``: a sync driven by the agent (start request, or the operator's ``sync`` action, to the
     task being ``pending``: command delivery, rsync through the agent's TLS tunnel into the
     server's single-use rsync daemon, the target's durable commit). Its *cycle* is read from its
     log: command received to cycle finished;
   - ``ssh``: plain rsync over ssh (the agent's rsync arguments without the tunnel and without
     compression, so that both do the same work apart from transport and compression);
   - ``ssh-z``: the same with ``-z`` (rsync's own choice: zstd at its default level 3 between two
     rsync >= 3.2 with zstd);
   - ``daemon``: plain rsync with exactly the agent's arguments (compression included) straight to a
     plaintext ``rsync --daemon`` (the transport the agent used before it carried rsync inside TLS);
   - ``cp``: ``cp -a`` (full copies only);
   every peer run is followed by ``sync`` (the target commits each cycle durably, so the peers do
   too), and the page cache's dirty pages are flushed before every timed run;
4. prints, per workload and tool: the median and range of wall time, the ratio to plain rsync over
   ssh, CPU seconds on the source side and the target side, and the peak RSS of each side (sum
   over the side's processes, sampled every 0.1 s), as Markdown tables; and the rows of the
   issue 11 table (agent cycle through TLS / plain rsync to a plaintext daemon).

``--shaped-mbit N`` runs everything (server, agent, peers, sshd) inside a network namespace the
bench creates (``s16-file-bench-PID``) whose loopback is shaped to N Mbit/s by tc's token bucket
filter (MTU 1500, burst 32 KiB, latency 100 ms: as the block tests shape a link), and deletes it at
the end; ``cp`` is left out (it does not cross the link).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from go2cloud_server.tlspin import pinned_session  # noqa: E402


class PlainDaemon:
    """The baseline: a plaintext ``rsync --daemon`` on loopback with one module (bench only)."""

    def __init__(self, state: Path, root: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (state / "secrets").write_text("plain:plain-password\n")
        os.chmod(state / "secrets", 0o600)
        (state / "rsyncd.conf").write_text(
            f"pid file = {state}/rsyncd.pid\nlog file = {state}/rsyncd.log\n[plain]\n"
            f"    path = {root}\n    read only = false\n    auth users = plain\n"
            f"    secrets file = {state}/secrets\n    use chroot = true\n    uid = 0\n    gid = 0\n"
            "    numeric ids = true\n    munge symlinks = false\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={state}/rsyncd.conf",
                                      "--address=127.0.0.1", f"--port={self.port}"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the plaintext rsync daemon did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def make_tree(root: Path, files: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    total = 0
    text = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor\n") * 4096
    for i in range(files):
        d = root / f"d{i % 200:03d}" / f"e{(i // 200) % 10}"
        d.mkdir(parents=True, exist_ok=True)
        size = int(math.exp(rng.uniform(math.log(1024), math.log(256 * 1024))))
        data = rng.randbytes(size) if i % 3 == 0 else text[:size]
        (d / f"f{i:06d}").write_bytes(data)
        total += size
    return total


class Api:
    def __init__(self, data_dir: Path):
        info = json.loads((data_dir / "server.json").read_text())
        self.url = info["url"]
        self.fingerprint = info["fingerprint"]
        self.s = pinned_session(self.fingerprint)
        self.s.headers["Authorization"] = "Bearer " + (data_dir / "admin.token").read_text().strip()

    def call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        r = self.s.request(method, self.url + "/api/v1" + path, json=body, timeout=60, verify=False)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()


def rsync_children(agent_pid: int) -> List[psutil.Process]:
    """The agent's own rsync runs (other rsync processes on the machine are not ours)."""
    try:
        procs = psutil.Process(agent_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if p.name() == "rsync" and any("@go2cloud::" in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:  # it ended meanwhile
            pass
    return out


def agent_cycle_seconds(log: Path, command: str = "start", label: str = "Full sync") -> float:
    """Seconds from the agent receiving the last ``command`` to the cycle (``label``) being finished
    (its own log, millisecond timestamps): the agent's share, without the target's commit."""
    from datetime import datetime

    def ts(line: str) -> float:
        return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").timestamp()

    lines = log.read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if f": {command} t-" in line)
    end = next(i for i in range(start, len(lines)) if f"{label} finished" in lines[i])
    return ts(lines[end]) - ts(lines[start])


SSH_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


class SshServer:
    """A loopback ``sshd`` of the bench's own (host and client keys generated in ``state``)."""

    def __init__(self, state: Path, cipher: str = "") -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.access(sshd, os.X_OK) or shutil.which("ssh") is None:
            raise SystemExit("the ssh peers need OpenSSH's server and client: apt-get install openssh-server "
                             "(or leave them out with --peers agent,daemon,cp)")
        state.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            if not (state / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / name)], check=True)
        shutil.copy(state / "client_key.pub", state / "authorized_keys")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (state / "sshd_config").write_text(SSH_CONFIG.format(port=self.port, dir=state))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.proc = subprocess.Popen([os.path.abspath(sshd), "-D", "-e", "-f", str(state / "sshd_config")],
                                     stderr=open(state / "sshd.log", "w"))
        self.rsh = (f"ssh -i {state}/client_key -p {self.port} -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -o IdentitiesOnly=yes "
                    "-o Compression=no" + (f" -c {cipher}" if cipher else ""))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(self.rsh.split() + ["root@127.0.0.1", "true"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit(f"the bench's sshd did not start, see {state}/sshd.log")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def tree_pids(root: int, include_root: bool = True) -> List[psutil.Process]:
    try:
        p = psutil.Process(root)
        return ([p] if include_root else []) + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


class RssSampler:
    """Peak of the summed RSS of each process tree, sampled every 0.1 s while running."""

    def __init__(self, roots: Dict[str, Tuple[int, bool]]) -> None:
        self.roots = roots
        self.peak = {name: 0 for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, (pid, with_root) in self.roots.items():
                total = 0
                for proc in tree_pids(pid, with_root):
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak[name] = max(self.peak[name], total)
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Run:
    seconds: float                 # to done, including the durable commit / sync
    cpu_source: float
    cpu_target: Optional[float]    # None: one process does both (cp)
    rss_source: int
    rss_target: Optional[int]
    cycle: Optional[float] = None  # the agent only: its cycle, from its log
    nosync: Optional[float] = None  # the peers: the command alone, without the final sync


@dataclass
class Results:
    runs: Dict[Tuple[str, str], List[Run]] = field(default_factory=dict)

    def add(self, workload: str, tool: str, run: Run) -> None:
        self.runs.setdefault((workload, tool), []).append(run)


def cpu_of(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def run_command(argv: Sequence[str], env: Dict[str, str], target_root: Optional[int]) -> Run:
    """One peer run: the command (its CPU from wait4, children included), then ``sync``."""
    os.sync()
    t0 = time.monotonic()
    tgt0 = cpu_of(psutil.Process(target_root)) if target_root else 0.0
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    roots = {"source": (proc.pid, True)}
    if target_root:
        roots["target"] = (target_root, False)
    with RssSampler(roots) as rss:
        _, status, usage = os.wait4(proc.pid, 0)
        nosync = time.monotonic() - t0
        os.sync()
        seconds = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed ({os.waitstatus_to_exitcode(status)}): {err[-2000:]}")
    tgt = None
    if target_root:
        time.sleep(0.3)  # the listener reaps its connection's processes
        tgt = cpu_of(psutil.Process(target_root)) - tgt0
    return Run(seconds, usage.ru_utime + usage.ru_stime, tgt, rss.peak["source"], rss.peak.get("target"),
               nosync=nosync)


def mutate(src: Path, round_no: int, share: int = 20) -> int:
    """New contents for one file in ``share`` (same size, same kind), different in every round."""
    # a seed of its own per run: rewriting the contents an earlier run wrote would change only mtimes
    rng = random.Random(f"{time.time_ns()}-{round_no}")
    files = sorted(p for p in src.rglob("f*") if p.is_file())
    changed = 0
    for i, f in enumerate(files):
        if (i + round_no) % share:
            continue
        size = f.stat().st_size
        if i % 3 == 0:
            data = rng.randbytes(size)
        else:
            word = f"round {round_no} file {i} {rng.random()} ".encode()
            data = (word * (size // len(word) + 1))[:size]
        f.write_bytes(data)
        changed += 1
    return changed


def peer_args(agent_argv: List[str], *, compress: bool, incremental: bool) -> List[str]:
    """The agent's rsync arguments without the tunnel, the destination, --link-dest and (unless
    ``compress``) its compression options; --delete on incrementals."""
    argv = list(agent_argv[:-2])  # ... -- SRC DEST: keep up to and without "--"
    if argv and argv[-1] == "--":
        argv.pop()
    if "-e" in argv:
        i = argv.index("-e")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--link-dest") and a != "--delete"]
    if not compress:
        argv = [a for a in argv if not a.startswith(("--compress", "-z"))]
    if incremental:
        argv.append("--delete")
    return argv


def shaped(args: argparse.Namespace) -> int:
    """Run this bench again inside a namespace whose loopback carries ``--shaped-mbit``."""
    ns = f"s16-file-bench-{os.getpid()}"

    def ip(*a: str) -> None:
        subprocess.run(["ip", *a], check=True)

    ip("netns", "add", ns)
    try:
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "mtu", "1500", "up")
        ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
           f"{args.shaped_mbit}mbit", "burst", "32kb", "latency", "100ms")
        print(f"network namespace {ns}: loopback shaped to {args.shaped_mbit} Mbit/s (tbf)", flush=True)
        argv = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--in-namespace"]
        return subprocess.run(argv, env=env()).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def fmt_mib(n: Optional[int]) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"


def report(results: Results, tools: List[str], baseline: str = "ssh") -> None:
    for workload in ("full", "incremental"):
        base_runs = results.runs.get((workload, baseline))
        base = statistics.median(r.seconds for r in base_runs) if base_runs else None
        print(f"\n{workload}: wall time to done (including the target's durable commit / `sync`)\n")
        print(f"| tool | median | range | / {baseline} | CPU s source side | CPU s target side "
              "| peak RSS source (MiB) | peak RSS target (MiB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for tool in tools:
            runs = results.runs.get((workload, tool))
            if not runs:
                continue
            secs = [r.seconds for r in runs]
            med = statistics.median(secs)
            ratio = f"{med / base:.2f}" if base else "—"
            tgt = [r.cpu_target for r in runs if r.cpu_target is not None]
            rss_t = [r.rss_target for r in runs if r.rss_target is not None]
            print(f"| {TOOL_NAMES[tool]} | {med:.2f} s | {min(secs):.2f}–{max(secs):.2f} s | {ratio} | "
                  f"{statistics.median(r.cpu_source for r in runs):.2f} | "
                  f"{statistics.median(tgt) if tgt else float('nan'):.2f} | "
                  f"{fmt_mib(max(r.rss_source for r in runs))} | {fmt_mib(max(rss_t) if rss_t else None)} |"
                  .replace("| nan |", "| — |"))
        agent = results.runs.get((workload, "agent"))
        if agent:
            cyc = [r.cycle for r in agent if r.cycle is not None]
            print(f"\nagent {workload} cycle (its log: command received to cycle finished): median "
                  f"{statistics.median(cyc):.2f} s, range {min(cyc):.2f}–{max(cyc):.2f} s"
                  + (f"; / {baseline} without its sync: "
                     f"{statistics.median(cyc) / statistics.median(r.nosync for r in base_runs if r.nosync):.2f}"
                     if base_runs else ""))


TOOL_NAMES = {"agent": "go2cloud agent (TLS tunnel, server's daemon)", "ssh": "rsync over ssh",
              "ssh-z": "rsync -z over ssh", "daemon": "rsync, agent's arguments, plaintext daemon",
              "cp": "cp -a"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--compression", type=int, default=7, help="the task's compression level (0-10)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--target-dir", type=Path, default=Path("/dev/shm/go2cloud-bench-target"),
                    help="where every target writes (default: tmpfs, so disk noise does not swamp the ratio)")
    ap.add_argument("--peers", default="agent,ssh,ssh-z,daemon,cp",
                    help="tools to run, comma-separated (agent, ssh, ssh-z, daemon, cp)")
    ap.add_argument("--shaped-mbit", type=int, default=0,
                    help="run everything in a network namespace whose loopback carries this many Mbit/s")
    ap.add_argument("--ssh-cipher", default="",
                    help="the ssh peers' cipher (default: ssh's own choice, chacha20-poly1305 with OpenSSH 9)")
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shaped_mbit and not args.in_namespace:
        return shaped(args)
    tools = [t for t in args.peers.split(",") if t]
    unknown = set(tools) - set(TOOL_NAMES)
    if unknown or "agent" not in tools:
        raise SystemExit(f"--peers: the agent and any of {', '.join(TOOL_NAMES)} (not {', '.join(unknown)})")
    if args.shaped_mbit and "cp" in tools:
        tools.remove("cp")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="go2cloud-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    if not src.exists():
        print(f"building {args.files} files in {src}", flush=True)
        make_tree(src, args.files)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    print(f"tree: {args.files} files, {total / 2**20:.1f} MiB", flush=True)
    subprocess.run(["tar", "cf", "/dev/null", "-C", str(src), "."], check=True)  # warm the page cache

    args.target_dir.mkdir(parents=True, exist_ok=True)
    data_dir = args.target_dir / "server"
    shutil.rmtree(data_dir, ignore_errors=True)
    srv_log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "go2cloud_server", "serve", "--listen", "127.0.0.1:0",
                               "--data-dir", str(data_dir)], stdout=srv_log,
                              stderr=subprocess.STDOUT, env=env())
    plain_daemon: Optional[PlainDaemon] = None
    sshd: Optional[SshServer] = None
    agent: Optional[subprocess.Popen] = None
    try:
        while not (data_dir / "server.json").exists():
            if server.poll() is not None:
                raise SystemExit("server did not start, see server.log")
            time.sleep(0.1)
        api = Api(data_dir)
        api.call("POST", "/workgroups", {"name": "bench"})
        code = api.call("POST", "/workgroups/bench/codes", {"uses": 1})
        home = work / "agent-home"
        shutil.rmtree(home, ignore_errors=True)
        agent_out = open(work / "agent.out", "w")
        agent = subprocess.Popen([sys.executable, "-m", "go2cloud_client", "--home", str(home), "--server", api.url,
                                  "--server-fingerprint", api.fingerprint, "--token-id", code["token_id"],
                                  "--yes", "--no-prompt"], stdout=agent_out, stderr=subprocess.STDOUT,
                                 env={**env(), "GO2CLOUD_TOKEN_CODE": code["token_code"]}, stdin=subprocess.DEVNULL)
        sid = ""
        while not sid:
            text = (work / "agent.out").read_text()
            if "] Successfully!" in text:
                sid = text.split("Import Source Server [", 1)[1].split("]", 1)[0]
            elif agent.poll() is not None:
                raise SystemExit("agent did not import, see agent.out")
            time.sleep(0.1)
        agent_pid = agent.pid
        proc = psutil.Process(agent_pid)

        # idle footprint -----------------------------------------------------------------------
        time.sleep(3)
        cpu0, t0, peak = sum(proc.cpu_times()[:2]), time.monotonic(), 0
        while time.monotonic() - t0 < args.idle_seconds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.5)
        idle_cpu = (sum(proc.cpu_times()[:2]) - cpu0) / max(0.001, time.monotonic() - t0) * 100
        print(f"idle agent: peak RSS {peak / 2**20:.1f} MiB, CPU {idle_cpu:.2f}% of one core "
              f"over {args.idle_seconds:g}s", flush=True)

        peers_root = args.target_dir / "peers"
        shutil.rmtree(peers_root, ignore_errors=True)
        peers_root.mkdir()
        if "daemon" in tools:
            plain_daemon = PlainDaemon(work / "plain-rsyncd", peers_root)
        if "ssh" in tools or "ssh-z" in tools:
            sshd = SshServer(work / "ssh", args.ssh_cipher)

        results = Results()
        agent_argv: Dict[str, List[str]] = {}
        srv_proc = psutil.Process(server.pid)
        cpu_rows: List[Dict[str, float]] = []

        def cpu(p: psutil.Process) -> Dict[str, float]:
            t = p.cpu_times()
            return {"own": t.user + t.system, "children": t.children_user + t.children_system}

        def run_agent(workload: str) -> Run:
            os.sync()  # start clean: no dirty pages left over from the previous run
            a0, s0 = cpu(proc), cpu(srv_proc)
            before = (api.call("GET", f"/sources/{sid}/migration").get("tasks") or [{}])[0]
            t = time.monotonic()
            if workload == "full":
                api.call("POST", f"/sources/{sid}/migration", {"paths": [str(src)], "compression": args.compression})
            else:
                api.call("POST", f"/sources/{sid}/migration/sync", {})
            tunnel_cpu: Dict[int, float] = {}  # the tunnel processes' CPU, last seen alive
            with RssSampler({"source": (agent_pid, True), "target": (server.pid, True)}) as rss:
                while True:
                    running = rsync_children(agent_pid)
                    for p in running:
                        try:
                            agent_argv.setdefault(workload, p.cmdline())
                            for child in p.children():
                                times = child.cpu_times()
                                tunnel_cpu[child.pid] = times.user + times.system
                        except psutil.Error:
                            pass
                    if running:
                        # while rsync runs, the control plane is not asked (a request every 50 ms
                        # took the server's CPU and GIL from the session's TLS pump)
                        time.sleep(0.25)
                        continue
                    task = (api.call("GET", f"/sources/{sid}/migration").get("tasks") or [{}])[0]
                    done = task.get("status") == "pending" and (
                        workload == "full" or (task.get("last_committed_cycle") or 0)
                        > (before.get("last_committed_cycle") or 0))
                    if done:
                        break
                    if task.get("status") == "failed":
                        raise SystemExit(f"task failed: {task}")
                    time.sleep(0.05)
                elapsed = time.monotonic() - t
            a1, s1 = cpu(proc), cpu(srv_proc)
            cpu_rows.append({"workload": 0.0 if workload == "full" else 1.0,
                             "agent": a1["own"] - a0["own"], "agent_children": a1["children"] - a0["children"],
                             "tunnel": sum(tunnel_cpu.values()),
                             "server": s1["own"] - s0["own"], "server_children": s1["children"] - s0["children"]})
            log = home / "Logs" / "go2cloud_client.log"
            cycle = (agent_cycle_seconds(log) if workload == "full"
                     else agent_cycle_seconds(log, "sync", "Incremental sync"))
            return Run(elapsed, a1["own"] - a0["own"] + a1["children"] - a0["children"],
                       s1["own"] - s0["own"] + s1["children"] - s0["children"],
                       rss.peak["source"], rss.peak["target"], cycle=cycle)

        def run_peer(tool: str, workload: str, n: int) -> Run:
            argv_agent = agent_argv.get("full")
            assert argv_agent, "the agent's rsync command line was not captured"
            incremental = workload == "incremental"
            if tool == "cp":
                dest = peers_root / f"cp-{n}"
                shutil.rmtree(dest, ignore_errors=True)
                return run_command(["cp", "-a", "--", str(src), str(dest)], dict(os.environ), None)
            if tool == "daemon":
                assert plain_daemon is not None
                argv = peer_args(argv_agent, compress=True, incremental=incremental)
                argv += ["--", f"{src}/", f"rsync://plain@127.0.0.1:{plain_daemon.port}/plain/daemon-{n}{src}/"]
                return run_command(argv, {**os.environ, "RSYNC_PASSWORD": "plain-password"},
                                   plain_daemon.proc.pid)
            assert sshd is not None
            argv = peer_args(argv_agent, compress=False, incremental=incremental)
            if tool == "ssh-z":
                argv.append("-z")
            argv += ["-e", sshd.rsh, "--", f"{src}/", f"root@127.0.0.1:{peers_root}/{tool}-{n}{src}/"]
            return run_command(argv, dict(os.environ), sshd.proc.pid)

        for n in range(args.rounds):
            order = tools[n % len(tools):] + tools[:n % len(tools)]
            if n == 0:  # the peers that reuse the agent's arguments need them first
                order = ["agent"] + [t for t in order if t != "agent"]
            for workload in ("full", "incremental"):
                if workload == "incremental":
                    changed = mutate(src, n)
                    subprocess.run(["tar", "cf", "/dev/null", "-C", str(src), "."], check=True)
                line = []
                for tool in order:
                    if tool == "cp" and workload == "incremental":
                        continue
                    r = run_agent(workload) if tool == "agent" else run_peer(tool, workload, n)
                    results.add(workload, tool, r)
                    line.append(f"{tool} {r.seconds:.2f}s" + (f" (cycle {r.cycle:.2f}s)" if r.cycle else ""))
                extra = f", {changed} files changed" if workload == "incremental" else ""
                print(f"round {n + 1} {workload}{extra}: " + ", ".join(line), flush=True)
            api.call("POST", f"/sources/{sid}/migration/cancel", {})
            time.sleep(0.5)
            shutil.rmtree(data_dir / "tasks", ignore_errors=True)  # cancel keeps images; free the tmpfs
            for d in peers_root.iterdir():
                shutil.rmtree(d, ignore_errors=True)

        print(f"\ntree: {args.files} files, {total / 2**20:.1f} MiB, compression {args.compression}, "
              f"{args.rounds} rounds" + (f", link shaped to {args.shaped_mbit} Mbit/s" if args.shaped_mbit else "")
              + f", ssh cipher {args.ssh_cipher or 'ssh default'}")
        report(results, tools)

        # the issue 11 rows: the agent's cycle against plain rsync to a plaintext daemon -----------
        full_agent = results.runs[("full", "agent")]
        c = statistics.median(r.cycle for r in full_agent if r.cycle is not None)
        print("\n| measure | value |\n| --- | --- |")
        print(f"| agent cycle: command received to cycle finished, agent log (median) | {c:.2f} s |")
        if ("full", "daemon") in results.runs:
            daemon_runs = results.runs[("full", "daemon")]
            pn = statistics.median(r.nosync for r in daemon_runs if r.nosync is not None)
            p = statistics.median(r.seconds for r in daemon_runs)
            a = statistics.median(r.seconds for r in full_agent)
            print(f"| plain rsync to a plaintext daemon, same arguments, without the final sync (median) | {pn:.2f} s |")
            print(f"| **agent cycle through TLS / plain rsync to a plaintext daemon** | "
                  f"**{c / pn:.3f} ({100 * (c / pn - 1):+.1f}%)** |")
            print(f"| end to end / (plain rsync + sync) | {a / p:.3f} ({100 * (a / p - 1):+.1f}%) |")
        full_rows = [r for r in cpu_rows if r["workload"] == 0.0]
        for key, what in (("agent", "agent process (threads: commands, progress parsing, estimate)"),
                          ("agent_children", "agent's children: rsync sender + generator and the TLS tunnel"),
                          ("tunnel", "the TLS tunnel alone (sampled every 50 ms, a lower bound)"),
                          ("server", "server process (API, the session's TLS pump, commit)"),
                          ("server_children", "server's children: the session's rsync daemon")):
            print(f"| CPU per full cycle, {what} (median) | {statistics.median(r[key] for r in full_rows):.2f} s |")
        print(f"| idle agent peak RSS | {peak / 2**20:.1f} MiB |")
        print(f"| idle agent CPU | {idle_cpu:.2f}% of one core |")
        for workload, argv in agent_argv.items():
            print(f"\nagent's rsync arguments ({workload}): {' '.join(argv[:-1])} USER@go2cloud::MODULE/...")
        return 0
    finally:
        if agent and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        if plain_daemon:
            plain_daemon.stop()
        if sshd:
            sshd.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
