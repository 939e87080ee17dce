#!/usr/bin/env python3
"""Fleet benchmark: the control plane under N idle agents for a long time (issue 17, item 3).

Run by hand (never in CI):

    nice -n 19 python3 bench/bench_fleet.py [--agents 1000] [--minutes 30] [--sample 30]

What it does:

1. starts the reference server (``python -m go2cloud_server serve`` of this repository) on a free
   loopback port with a fresh data directory and ``--heartbeat-interval 10`` (the default);
2. creates ``agents / 50`` workgroups (50 sources each, the limit) and one activation code each,
   and imports ``--agents`` sources through the real API (``POST /sources/import``: scrypt on
   the server's bounded pool; Ed25519 keys made here), 8 imports at a time;
3. simulates every agent the way the real agent talks (go2cloud_client/agent.py): its own two
   keep-alive HTTPS connections, one for the heartbeat (``POST .../heartbeat`` every interval, the
   first at a random point of the first interval) and one for the command long poll
   (``GET .../commands?wait=25`` in a loop); the challenge/token handshake at start and again on
   ``401``; TLS without session reuse, pinned to nothing (loopback);
4. samples the server's RSS, open file descriptors and threads from /proc every ``--sample``
   seconds, with the requests done and failed and the heartbeat latency (median, p95) in that
   sample;
5. prints the samples as a Markdown table and writes them as JSON (``--out``).

Ctrl-C (or SIGTERM) stops a run cleanly: during the import at once, later after the current
sample, with the table of the samples so far; the server runs in its own session (the terminal's
Ctrl-C does not reach it), is stopped by the bench (SIGTERM, then SIGKILL after 30 s) and is
sent SIGTERM by the kernel if the bench itself dies. ``--env NAME=VALUE`` sets the server's
environment (``GLIBC_TUNABLES=...`` to compare allocators); ``--memtrace FILE`` has the server
trace its allocations (go2cloud_server/memtrace.py) into FILE every sample.

The simulated agents run in one asyncio process (TLS included), so the client side needs a bit of
CPU too; on a busy machine the latencies include waiting for it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

REPO = Path(__file__).resolve().parents[1]
SIGNATURE_DOMAIN = b"go2cloud-token-v1\n"
PER_WORKGROUP = 50


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM when the bench dies, however it dies (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def proc_figures(pid: int) -> Dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fig: Dict[str, int] = {}
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            fig["rss_kib"] = int(line.split()[1])
        elif line.startswith("Threads:"):
            fig["threads"] = int(line.split()[1])
    fig["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fig


class Conn:
    """One keep-alive HTTPS connection speaking just enough HTTP/1.1 for the agent API."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port = port
        self.ctx = ctx
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.opened = 0

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ctx, server_hostname="127.0.0.1")
        self.opened += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: Any = None,
                      token: Optional[str] = None, timeout: float = 90) -> Tuple[int, Any]:
        for attempt in (1, 2):  # a keep-alive connection the server closed: once more on a new one
            if self.writer is None:
                await self._open()
            assert self.reader is not None and self.writer is not None
            data = json.dumps(body).encode() if body is not None else b""
            head = [f"{method} {path} HTTP/1.1", "Host: bench", "Accept: application/json",
                    f"Content-Length: {len(data)}"]
            if data:
                head.append("Content-Type: application/json")
            if token:
                head.append(f"Authorization: Bearer {token}")
            try:
                self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
                await self.writer.drain()
                raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
                self.close()
                if attempt == 2:
                    raise
                continue
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            length = int(headers.get("content-length", "0"))
            payload = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, json.loads(payload) if payload else None
        raise AssertionError("unreachable")


class Stats:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.errors: Dict[str, int] = {}
        self.beat_ms: List[float] = []

    def fail(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1


class SimAgent:
    def __init__(self, port: int, ctx: ssl.SSLContext, source_id: str, key: Ed25519PrivateKey,
                 stats: Stats, interval: float) -> None:
        self.sid = source_id
        self.key = key
        self.stats = stats
        self.interval = interval
        self.beat = Conn(port, ctx)
        self.poll = Conn(port, ctx)
        self.token: Optional[str] = None

    async def auth(self, conn: Conn) -> None:
        st, doc = await conn.request("POST", f"/api/v1/sources/{self.sid}/challenge", {})
        if st != 200:
            raise RuntimeError(f"challenge {st}: {doc}")
        nonce = doc["nonce"]
        sig = self.key.sign(SIGNATURE_DOMAIN + self.sid.encode() + b"\n" + nonce.encode())
        st, doc = await conn.request("POST", f"/api/v1/sources/{self.sid}/token",
                                     {"nonce": nonce, "signature": base64.b64encode(sig).decode()})
        if st != 200:
            raise RuntimeError(f"token {st}: {doc}")
        self.token = doc["token"]

    async def call(self, conn: Conn, method: str, path: str, body: Any = None,
                   timeout: float = 90) -> Tuple[int, Any]:
        if self.token is None:
            await self.auth(conn)
        st, doc = await conn.request(method, path, body, self.token, timeout)
        if st == 401:
            await self.auth(conn)
            st, doc = await conn.request(method, path, body, self.token, timeout)
        return st, doc

    async def heartbeats(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))
        body = {"agent_version": "bench", "state": "idle", "task_id": None, "phase": None, "cycle": None,
                "progress": None, "last_error": None, "load": {"load1": 0.1, "cpu_percent": 1.0,
                                                               "memory_percent": 5.0}}
        while not stop.is_set():
            started = time.monotonic()
            try:
                st, _ = await self.call(self.beat, "POST", f"/api/v1/sources/{self.sid}/heartbeat", body, 30)
                if st == 200:
                    self.stats.ok += 1
                    self.stats.beat_ms.append((time.monotonic() - started) * 1000)
                else:
                    self.stats.fail(f"heartbeat {st}")
            except Exception as exc:  # noqa: BLE001 - counted, the agent goes on like the real one
                self.stats.fail(f"heartbeat {type(exc).__name__}")
                self.beat.close()
            wait = self.interval - (time.monotonic() - started)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, wait))
            except asyncio.TimeoutError:
                pass

    async def polls(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))
        while not stop.is_set():
            try:
                st, _ = await self.call(self.poll, "GET", f"/api/v1/sources/{self.sid}/commands?wait=25",
                                        None, 25 + 30)
                if st == 200:
                    self.stats.ok += 1
                else:
                    self.stats.fail(f"commands {st}")
                    await asyncio.sleep(2)
            except Exception as exc:  # noqa: BLE001
                self.stats.fail(f"commands {type(exc).__name__}")
                self.poll.close()
                await asyncio.sleep(2)

    def close(self) -> None:
        self.beat.close()
        self.poll.close()


async def setup_sources(port: int, ctx: ssl.SSLContext, admin: str, n: int
                        ) -> List[Tuple[str, Ed25519PrivateKey]]:
    op = Conn(port, ctx)
    codes: List[Dict[str, Any]] = []
    for w in range((n + PER_WORKGROUP - 1) // PER_WORKGROUP):
        st, wg = await op.request("POST", "/api/v1/workgroups", {"name": f"fleet-{w:03d}"}, admin)
        assert st == 201, (st, wg)
        st, code = await op.request("POST", f"/api/v1/workgroups/{wg['id']}/codes",
                                    {"uses": PER_WORKGROUP}, admin)
        assert st == 201, (st, code)
        codes.append(code)
    op.close()
    out: List[Tuple[str, Ed25519PrivateKey]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        conn = Conn(port, ctx)
        while not queue.empty():
            i = queue.get_nowait()
            code = codes[i // PER_WORKGROUP]
            key = Ed25519PrivateKey.generate()
            pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
            body = {"token_id": code["token_id"], "token_code": code["token_code"], "public_key": pub,
                    "agent_version": "bench",
                    "inventory": {"hostname": f"bench-{i:05d}", "machine_id": f"{i:032x}", "os": "linux"}}
            while True:
                st, doc = await conn.request("POST", "/api/v1/sources/import", body)
                if st in (429, 503):
                    await asyncio.sleep(2)
                    continue
                assert st == 201, (st, doc)
                break
            out.append((doc["source_id"], key))
        conn.close()

    await asyncio.gather(*(worker() for _ in range(8)))
    return out


async def run(args: argparse.Namespace) -> Dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    if args.memtrace:
        env["GO2CLOUD_MEMTRACE"] = str(args.memtrace.absolute())
        env["GO2CLOUD_MEMTRACE_INTERVAL"] = str(args.sample)
    log = open(data.parent / f"{data.name}-serve.log", "wb")
    # its own session: the terminal's Ctrl-C reaches the bench only, which stops the server
    # itself (SIGTERM, then SIGKILL) after the agents; and the kernel stops it if the bench dies
    server = subprocess.Popen(
        [sys.executable, "-m", "go2cloud_server", "serve", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(data), "--heartbeat-interval", str(args.interval), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        preexec_fn=_die_with_parent)
    print(f"server pid {server.pid}, log {log.name}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()
    interrupted = []

    def on_signal(signum: int) -> None:
        # the first Ctrl-C (or SIGTERM) ends the run: during setup at once, while the agents run
        # after the current sample (the table of the samples so far is printed)
        interrupted.append(signum)
        print(f"\nsignal {signum}: stopping", file=sys.stderr, flush=True)
        if stop.is_set() or main_task is None or not samples_started:
            if main_task is not None:
                main_task.cancel()
        stop.set()

    samples_started: List[bool] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        deadline = time.monotonic() + 60
        while not (data / "server.json").exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {log.name}")
            await asyncio.sleep(0.2)
        admin = (data / "admin.token").read_text().strip()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        t0 = time.monotonic()
        sources = await setup_sources(port, ctx, admin, args.agents)
        print(f"{len(sources)} sources imported in {time.monotonic() - t0:.0f} s", flush=True)
        base = proc_figures(server.pid)
        stats = Stats()
        samples_started.append(True)
        agents = [SimAgent(port, ctx, sid, key, stats, args.interval) for sid, key in sources]
        tasks = [asyncio.create_task(a.heartbeats(stop)) for a in agents]
        tasks += [asyncio.create_task(a.polls(stop)) for a in agents]
        samples: List[Dict[str, Any]] = []
        started = time.monotonic()
        end = started + args.minutes * 60
        while time.monotonic() < end and not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), min(args.sample, max(0.0, end - time.monotonic())))
            except asyncio.TimeoutError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}; see {log.name}")
            fig = proc_figures(server.pid)
            beats = sorted(stats.beat_ms)
            sample = {
                "t_s": round(time.monotonic() - started), **fig, "ok": stats.ok, "failed": stats.failed,
                "errors": dict(stats.errors),
                "beat_p50_ms": round(statistics.median(beats), 1) if beats else None,
                "beat_p95_ms": round(beats[int(len(beats) * 0.95)], 1) if beats else None,
                "connections_opened": sum(a.beat.opened + a.poll.opened for a in agents),
            }
            stats.ok = stats.failed = 0
            stats.errors = {}
            stats.beat_ms = []
            samples.append(sample)
            print(json.dumps(sample), flush=True)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in agents:
            a.close()
        return {"agents": args.agents, "minutes": args.minutes, "interval_s": args.interval,
                "before_agents": base, "samples": samples, "interrupted": bool(interrupted)}
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        print(f"stopping the server (pid {server.pid})", file=sys.stderr, flush=True)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--sample", type=float, default=30, help="seconds between samples")
    ap.add_argument("--interval", type=float, default=10, help="heartbeat interval (server option)")
    ap.add_argument("--out", type=Path, help="write the samples as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the server's data directory")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set this in the server's environment (e.g. MALLOC_ARENA_MAX=2); repeatable")
    ap.add_argument("--memtrace", type=Path, metavar="FILE",
                    help="trace the server's allocations (tracemalloc, glibc totals) into FILE every "
                         "sample (go2cloud_server/memtrace.py; slows the server)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 connections per simulated agent
    try:
        result = asyncio.run(run(args))
    except asyncio.CancelledError:
        raise SystemExit("interrupted before the agents ran: no samples") from None
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| t (s) | RSS (MiB) | fds | threads | requests ok | failed | heartbeat p50 / p95 (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    b = result["before_agents"]
    print(f"| before | {b['rss_kib'] / 1024:.0f} | {b['fds']} | {b['threads']} | | | |")
    for s in result["samples"]:
        print(f"| {s['t_s']} | {s['rss_kib'] / 1024:.0f} | {s['fds']} | {s['threads']} | {s['ok']} | "
              f"{s['failed']} | {s['beat_p50_ms']} / {s['beat_p95_ms']} |")


if __name__ == "__main__":
    main()
