#!/usr/bin/env python3
"""File-level benchmark: agent overhead against plain rsync, and the idle agent's footprint.

Run by hand (never in CI), as root, after ./scripts/setup.sh:

    python3 bench/bench_file.py [--files 20000] [--rounds 3] [--idle-seconds 30]

What it does, all in one run so the ratios compare like with like:

1. builds a tree of ``--files`` files (sizes 1 KiB - 256 KiB, log-uniform, text and random data);
2. starts the reference server and one agent, imports it, and measures the idle agent: peak RSS
   and CPU use over ``--idle-seconds`` while it heartbeats and long-polls;
3. ``--rounds`` times, alternating the order: a full sync driven by the agent (from the start
   request to the task being ``pending``, i.e. including command delivery, the rsync run through
   the agent's TLS tunnel into the server's single-use rsync daemon, and the acknowledgement),
   then a plain rsync with the same arguments as the agent's rsync (read from the running process,
   without ``-e``) straight to a plaintext ``rsync --daemon`` on loopback (the transport the
   agent used before it carried rsync inside TLS), followed by ``sync`` (the target commits each
   cycle durably, so the baseline does too);
   the page cache is flushed before every timed run so one run's dirty pages do not bill the next;
4. prints the medians, the ratio agent/plain and the overhead, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from go2cloud_server.opclient import pinned_session  # noqa: E402


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


def agent_cycle_seconds(log: Path) -> float:
    """Seconds from the agent receiving the last `start` command to the cycle being finished (its
    own log, millisecond timestamps): the agent's share, without the target's commit."""
    from datetime import datetime

    def ts(line: str) -> float:
        return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").timestamp()

    lines = log.read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if ": start t-" in line)
    end = next(i for i in range(start, len(lines)) if "Full sync finished" in lines[i])
    return ts(lines[end]) - ts(lines[start])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--compression", type=int, default=7, help="the task's compression level (0-10)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--target-dir", type=Path, default=Path("/dev/shm/go2cloud-bench-target"),
                    help="where both targets write (default: tmpfs, so disk noise does not swamp the ratio)")
    args = ap.parse_args()

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

        # idle footprint -----------------------------------------------------------------------
        proc = psutil.Process(agent.pid)
        time.sleep(3)
        cpu0, t0, peak = sum(proc.cpu_times()[:2]), time.monotonic(), 0
        while time.monotonic() - t0 < args.idle_seconds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.5)
        idle_cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0) * 100
        print(f"idle agent: peak RSS {peak / 2**20:.1f} MiB, CPU {idle_cpu:.2f}% of one core "
              f"over {args.idle_seconds:g}s", flush=True)

        # plain rsync target: a second daemon, same configuration code ---------------------------
        plain_root = args.target_dir / "plain"
        shutil.rmtree(plain_root, ignore_errors=True)
        plain_root.mkdir()
        plain_daemon = PlainDaemon(work / "plain-rsyncd", plain_root)

        agent_times: List[float] = []
        plain_times: List[float] = []
        plain_nosync_times: List[float] = []
        agent_cycle_times: List[float] = []
        agent_argv: List[str] = []
        peak_busy = 0
        srv_proc = psutil.Process(server.pid)
        cpu_rows: List[Dict[str, float]] = []
        plain_cpu: List[Dict[str, float]] = []

        def cpu(p: psutil.Process) -> Dict[str, float]:
            t = p.cpu_times()
            return {"own": t.user + t.system, "children": t.children_user + t.children_system}

        def run_agent() -> float:
            nonlocal agent_argv, peak_busy
            os.sync()  # start clean: no dirty pages left over from the previous run
            a0, s0 = cpu(proc), cpu(srv_proc)
            t = time.monotonic()
            api.call("POST", f"/sources/{sid}/migration", {"paths": [str(src)], "compression": args.compression})
            tunnel_cpu: Dict[int, float] = {}  # the tunnel processes' CPU, last seen alive
            while True:
                task = (api.call("GET", f"/sources/{sid}/migration").get("tasks") or [{}])[0]
                for p in rsync_children(agent.pid):
                    try:
                        if not agent_argv:
                            agent_argv = p.cmdline()
                        for child in p.children():
                            times = child.cpu_times()
                            tunnel_cpu[child.pid] = times.user + times.system
                    except psutil.Error:
                        pass
                peak_busy = max(peak_busy, proc.memory_info().rss)
                if task.get("status") == "pending":
                    break
                if task.get("status") == "failed":
                    raise SystemExit(f"task failed: {task}")
                time.sleep(0.05)
            elapsed = time.monotonic() - t
            a1, s1 = cpu(proc), cpu(srv_proc)
            cpu_rows.append({"agent": a1["own"] - a0["own"], "agent_children": a1["children"] - a0["children"],
                             "tunnel": sum(tunnel_cpu.values()),
                             "server": s1["own"] - s0["own"], "server_children": s1["children"] - s0["children"]})
            agent_cycle_times.append(agent_cycle_seconds(home / "Logs" / "go2cloud_client.log"))
            api.call("POST", f"/sources/{sid}/migration/cancel", {})
            time.sleep(0.5)
            shutil.rmtree(data_dir / "tasks", ignore_errors=True)  # cancel keeps images; free the tmpfs
            return elapsed

        def run_plain(n: int) -> float:
            assert agent_argv, "the agent's rsync command line was not captured"
            argv = list(agent_argv)
            url = f"rsync://plain@127.0.0.1:{plain_daemon.port}/plain/round{n}{src}/"
            argv[-1] = url
            if "-e" in argv:  # the tunnel: the baseline talks to the plaintext daemon directly
                i = argv.index("-e")
                del argv[i:i + 2]
            argv = [a for a in argv if not a.startswith("--link-dest")]
            os.sync()
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            d0 = cpu(psutil.Process(plain_daemon.proc.pid))
            t = time.monotonic()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "RSYNC_PASSWORD": "plain-password"})
            plain_nosync_times.append(time.monotonic() - t)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            time.sleep(0.2)  # the daemon reaps its connection's child
            d1 = cpu(psutil.Process(plain_daemon.proc.pid))
            plain_cpu.append({"client": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                              "daemon": d1["children"] - d0["children"] + d1["own"] - d0["own"]})
            os.sync()  # the target commits durably (fsync) before a cycle counts as done; so does this
            elapsed = time.monotonic() - t
            shutil.rmtree(plain_root / f"round{n}", ignore_errors=True)
            return elapsed

        for n in range(args.rounds):
            if n % 2 == 0:
                agent_times.append(run_agent())
                plain_times.append(run_plain(n))
            else:
                plain_times.append(run_plain(n))
                agent_times.append(run_agent())
            print(f"round {n + 1}: agent cycle {agent_cycle_times[-1]:.2f}s (end to end {agent_times[-1]:.2f}s), "
                  f"plain rsync {plain_nosync_times[-1]:.2f}s (+sync {plain_times[-1]:.2f}s)", flush=True)

        a, p = statistics.median(agent_times), statistics.median(plain_times)
        print()
        print("| measure | value |\n| --- | --- |")
        print(f"| tree | {args.files} files, {total / 2**20:.1f} MiB, compression {args.compression} |")
        print(f"| plain rsync to a plaintext daemon, same arguments, without the final sync (median) | "
              f"{statistics.median(plain_nosync_times):.2f} s |")
        print(f"| plain rsync, same arguments, then `sync` (median of {args.rounds}) | {p:.2f} s |")
        c, pn = statistics.median(agent_cycle_times), statistics.median(plain_nosync_times)
        print(f"| agent cycle: command received to cycle finished, agent log (median) | {c:.2f} s |")
        print(f"| **agent cycle through TLS / plain rsync to a plaintext daemon** | "
              f"**{c / pn:.3f} ({100 * (c / pn - 1):+.1f}%)** |")
        print(f"| end to end: start request to `pending`, incl. the target's durable commit (median) | {a:.2f} s |")
        print(f"| end to end / (plain rsync + sync) | {a / p:.3f} ({100 * (a / p - 1):+.1f}%) |")
        for key, what in (("agent", "agent process (threads: commands, progress parsing, estimate)"),
                          ("agent_children", "agent's children: rsync sender + generator and the TLS tunnel"),
                          ("tunnel", "the TLS tunnel alone (sampled every 50 ms, a lower bound)"),
                          ("server", "server process (API, the session's TLS pump, commit)"),
                          ("server_children", "server's children: the session's rsync daemon")):
            print(f"| CPU per cycle, {what} (median) | "
                  f"{statistics.median(r[key] for r in cpu_rows):.2f} s |")
        print(f"| CPU per run, plain rsync client (sender + generator) (median) | "
              f"{statistics.median(r['client'] for r in plain_cpu):.2f} s |")
        print(f"| CPU per run, plaintext daemon (receiver) (median) | "
              f"{statistics.median(r['daemon'] for r in plain_cpu):.2f} s |")
        print(f"| agent RSS while syncing (peak, agent process only) | {peak_busy / 2**20:.1f} MiB |")
        print(f"| idle agent peak RSS | {peak / 2**20:.1f} MiB |")
        print(f"| idle agent CPU | {idle_cpu:.2f}% of one core |")
        print(f"\nrsync arguments: {' '.join(a for a in agent_argv[:-1])} USER@go2cloud::MODULE/...")
        return 0
    finally:
        if agent and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        if plain_daemon:
            plain_daemon.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
