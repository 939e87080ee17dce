#!/usr/bin/env python3
"""A complete local migration against the embedded control plane and target.

Starts ``go2cloud_server serve`` on loopback, creates a workgroup and an activation code, imports
this host with a real ``go2cloud_client`` (its own home, so it does not touch a real install),
migrates a generated sample tree (full sync, changes, incremental sync, changes, final sync,
complete), verifies that the final artifact equals the source by a full tree manifest, prints a
summary and stops everything it started. Exit status 0 only when the artifact is identical.

    ./scripts/demo.sh [--workdir DIR] [--files N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from go2cloud_server.manifest import build as tree_manifest  # noqa: E402
from go2cloud_server.manifest import diff

WORDS = ("migration source target cycle image rsync agent server workgroup disk block file "
         "snapshot change sync final pending complete").split()


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def make_sample_tree(root: Path, files: int, rng: random.Random) -> None:
    """A small server-like tree: configs, logs, binaries, a database-ish file with holes, links."""
    for i in range(files):
        d = root / ["etc", "srv/app", "srv/app/static", "var/log", "home/alice", "opt/tool/bin"][i % 6]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file-{i:05d}{['.conf', '.py', '.css', '.log', '.txt', ''][i % 6]}"
        if i % 6 == 5:
            p.write_bytes(rng.randbytes(rng.randint(1, 64 * 1024)))
            p.chmod(0o755)
        else:
            p.write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 2000))) + "\n")
    (root / "srv/app/config link").symlink_to("../../etc/file-00000.conf")
    (root / "srv/app/dangling").symlink_to("/nonexistent/target")
    os.link(root / "etc/file-00000.conf", root / "etc/hardlink-to-file-00000.conf")
    (root / "var/lib/db").mkdir(parents=True)
    with open(root / "var/lib/db/data.db", "wb") as f:  # sparse: 32 MiB with data at both ends
        f.write(rng.randbytes(1 << 20))
        f.seek(31 << 20)
        f.write(rng.randbytes(1 << 20))
    (root / "var/empty").mkdir()
    secret = root / "home/alice/.ssh"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_text("not a real key\n")
    (secret / "id_ed25519").chmod(0o600)
    secret.chmod(0o700)
    cache = root / "srv/app/cache"
    cache.mkdir()
    (cache / "big.tmp").write_bytes(b"x" * 4096)


def change_tree(root: Path, rng: random.Random, round_no: int) -> Dict[str, int]:
    files = sorted(p for p in root.rglob("file-*") if p.is_file() and not p.is_symlink())
    changed = rng.sample(files, max(1, len(files) // 20))
    for p in changed:
        with open(p, "ab") as f:
            f.write(f"changed in round {round_no}\n".encode())
    deleted = [p for p in rng.sample(files, max(1, len(files) // 100)) if p not in changed]
    for p in deleted:
        p.unlink()
    for i in range(20):
        (root / "srv/app" / f"new-r{round_no}-{i}.txt").write_text(f"new file {i} of round {round_no}\n")
    for p in rng.sample([f for f in files if f.exists()], 5):
        p.chmod(0o640)
    return {"changed": len(changed), "deleted": len(deleted), "added": 20}


class Proc:
    def __init__(self, argv: List[str], log: Path, echo: bool = False, extra_env: Optional[Dict[str, str]] = None):
        self.log = open(log, "w")
        self.lines: List[str] = []
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", env={**env(), **(extra_env or {})}, stdin=subprocess.DEVNULL)
        self.echo = echo
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout
        for line in self.p.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line.rstrip("\n"))
            if self.echo:
                print("  agent| " + line.rstrip("\n"), flush=True)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where to put the server data, agent home and sample tree")
    ap.add_argument("--files", type=int, default=3000, help="regular files in the sample tree (default 3000)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = ap.parse_args()

    if shutil.which("rsync") is None:
        print("error: rsync is not installed; run ./scripts/setup.sh as root first", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="go2cloud-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir, home, source = work / "server", work / "agent-home", work / "source"
    say(f"work directory: {work}")
    rng = random.Random(20261127)
    started = time.monotonic()

    server = Proc([sys.executable, "-m", "go2cloud_server", "serve", "--listen", "127.0.0.1:0",
                   "--data-dir", str(data_dir), "--heartbeat-interval", "2"], work / "server.log")
    agent: Optional[Proc] = None
    try:
        info_file = data_dir / "server.json"
        deadline = time.monotonic() + 30
        while not info_file.exists():
            if server.p.poll() is not None or time.monotonic() > deadline:
                print("error: the server did not start; see " + str(work / "server.log"), file=sys.stderr)
                return 1
            time.sleep(0.2)
        info = json.loads(info_file.read_text())
        say(f"control plane at {info['url']} (certificate {info['fingerprint'][:23]}...)")

        def op(*a: str) -> Any:
            r = subprocess.run([sys.executable, "-m", "go2cloud_server", *a, "--json"], capture_output=True,
                               text=True, env={**env(), "GO2CLOUD_DATA_DIR": str(data_dir)}, timeout=60)
            if r.returncode != 0:
                raise SystemExit(f"error: go2cloud_server {' '.join(a)} failed: {r.stderr.strip()}")
            return json.loads(r.stdout)

        op("workgroup", "create", "demo-wg", "--description", "local demo", "--tag", "env=demo")
        code = op("code", "create", "--workgroup", "demo-wg", "--uses", "1", "--days", "1")
        say(f"activation code {code['token_id']} created (1 use, 1 day)")

        say(f"generating a sample tree of {args.files} files in {source}")
        make_sample_tree(source, args.files, rng)

        agent = Proc([sys.executable, "-m", "go2cloud_client", "--home", str(home), "--server", info["url"],
                      "--server-fingerprint", info["fingerprint"], "--token-id", code["token_id"],
                      "--yes", "--no-prompt"], work / "agent.out", echo=True,
                     extra_env={"GO2CLOUD_TOKEN_CODE": code["token_code"]})  # never an argument
        source_id = ""
        deadline = time.monotonic() + 30
        while not source_id:
            for line in agent.lines:
                if line.startswith("Import Source Server [") and line.endswith("] Successfully!"):
                    source_id = line.split("[", 1)[1].split("]", 1)[0]
            if agent.p.poll() is not None or time.monotonic() > deadline:
                print("error: the agent did not import; see " + str(work / "agent.out"), file=sys.stderr)
                return 1
            time.sleep(0.2)

        def wait_status(want: str, timeout: float = 300) -> Dict[str, Any]:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                tasks = op("migration", "show", "--source", source_id).get("tasks") or []
                if tasks and tasks[0]["status"] == want:
                    return tasks[0]
                if tasks and tasks[0]["status"] == "failed":
                    raise SystemExit(f"error: the task failed: {tasks[0]}")
                if tasks and tasks[0]["status"] == "drill_abnormal":
                    raise SystemExit("error: the drill found a critical item: "
                                     f"{(tasks[0].get('error') or {}).get('message')}")
                time.sleep(0.5)
            raise SystemExit(f"error: timed out waiting for the task to be {want}")

        t0 = time.monotonic()
        res = op("migration", "start", "--workgroup", "demo-wg", "--path", str(source), "--keep-images", "3",
                 "--compression", "7")
        task_id = res["started"][0]["task_id"]
        say(f"migration started: task {task_id}; the drill runs first, then the full sync")
        end = time.monotonic() + 120
        drill = op("drill", "show", "--source", source_id)
        while drill.get("status") not in ("passed", "abnormal") and time.monotonic() < end:
            time.sleep(0.3)
            drill = op("drill", "show", "--source", source_id)
        counts = (drill.get("report") or {}).get("summary") or {}
        say(f"drill {drill['status']}: {counts.get('critical', 0)} critical, {counts.get('warning', 0)} "
            f"warning, {counts.get('info', 0)} info (go2cloud_server drill show --source {source_id})")
        wait_status("pending")
        timings = {"full sync": time.monotonic() - t0}

        for round_no, label in ((1, "incremental sync"), (2, "final sync")):
            delta = change_tree(source, rng, round_no)
            say(f"changed the source: {delta}")
            t0 = time.monotonic()
            if label == "incremental sync":
                op("migration", "sync", "--source", source_id)
                wait_status("pending")
            else:
                op("migration", "complete", "--source", source_id, "--final-sync")
                wait_status("completed")
            timings[label] = time.monotonic() - t0
            say(f"{label} done in {timings[label]:.1f}s")

        artifacts = op("migration", "artifacts", "--source", source_id)["artifacts"]
        last = max(artifacts, key=lambda a: a["cycle"])
        image = Path(last["path"]) / str(source).lstrip("/")
        say(f"verifying artifact of cycle {last['cycle']} ({image}) against the source")
        differences = diff(tree_manifest(source), tree_manifest(image))
        entries = len(tree_manifest(source).entries)
        print()
        print("go2cloud demo summary")
        print(f"  source            {source} ({entries} entries)")
        print(f"  source server     {source_id}, task {task_id}")
        for k, v in timings.items():
            print(f"  {k:<17} {v:6.1f} s")
        print(f"  artifacts         {', '.join(str(a['cycle']) for a in sorted(artifacts, key=lambda a: a['cycle']))}")
        if differences:
            print(f"  result            DIFFERENT: {len(differences)} differences, first: {differences[:5]}")
            return 1
        print("  result            identical (type, mode, owner, size, content, mtime, xattrs, ACLs, links)")
        print(f"  total time        {time.monotonic() - started:.1f} s")
        return 0
    finally:
        if agent:
            agent.stop()
        server.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            say(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
