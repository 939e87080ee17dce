#!/usr/bin/env python3
"""Block engine benchmark (run by hand as root, never in CI). Prints ratios against baselines
measured in the same run:

* full pass of a 2 GiB image with a realistic mix (random, text and binaries from /usr, written
  zeros, holes) vs ``cp --sparse=always`` + ``sync`` of the same image to the same target dir;
* incremental after changing 5% of the chunks vs ``rsync --inplace --no-whole-file`` of the new
  image onto a copy of the old one;
* peak RSS of an engine process replicating a 64 GiB sparse image;
* physical limits: read rate of the image (cold cache), xxh3-128 and zstd rates on one core.

The target is the real go2cloud_server HTTPS server with its block receiver, in its own process.
Page caches are dropped before every timed run. ``--runs N`` repeats the full pass and its cp
baseline N times (interleaved) and prints the median ratio. With ``socat`` installed, each run also
times a TLS floor: the image's non-zero data moved by socat over TLS on loopback (OpenSSL, C) into
the target dir: what encrypting, sending, decrypting and writing those bytes costs on this machine
with an open tool, before any of the engine's own work. The target's image and the rsync copy are
compared with the source by sha256 after each pass. Each pass prints the adaptive-compression
rounds (measured raw and compressed rates, the choice). ``--link-mbit N`` puts the target behind
a link of N Mbit/s (a network namespace, a veth pair, ``tc`` token bucket filter) to see the
choice on a WAN-like link.

    python3 bench/bench_block.py --workdir /var/tmp/g2c-bench --target-dir /dev/shm/g2c-bench-target

The CPU seconds of the engine (this process) and of the receiver (the server process) are
printed next to each wall time: on a shared VM they vary less than the wall clock. To compare
two versions of the code in the same session, point ``G2C_BENCH_ROOT`` at another checkout (its
engine and server are used, this script's measurements): ``mkdir /tmp/old && git archive HEAD~1 |
tar -x -C /tmp/old``, then ``G2C_BENCH_ROOT=/tmp/old python3 bench/bench_block.py ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(os.environ.get("G2C_BENCH_ROOT") or Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(ROOT))

import xxhash  # noqa: E402
import zstandard  # noqa: E402

from go2cloud_client.replication.block import (  # noqa: E402
    BlockCycle,
    BlockOptions,
    BlockReplicator,
    BlockTarget,
    Disk,
    adaptive,
    codec,  # noqa: E402
)

MiB = 1 << 20
GiB = 1 << 30


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def usr_corpus(limit: int) -> bytes:
    """Text and binaries from /usr (what real disks hold), up to ``limit`` bytes."""
    out = bytearray()
    for top in ("/usr/share/doc", "/usr/bin", "/usr/lib/python3", "/usr/share", "/usr/lib"):
        for dirpath, _dirs, files in os.walk(top):
            for name in sorted(files):
                p = os.path.join(dirpath, name)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    with open(p, "rb") as f:
                        out += f.read(limit - len(out))
                except OSError:
                    continue
                if len(out) >= limit:
                    return bytes(out)
    return bytes(out)


def make_image(path: Path, size: int, seed: int = 42) -> dict:
    """Segments of 1-16 MiB: 25% random, 40% /usr content, 20% written zeros, 15% holes."""
    rnd = random.Random(seed)
    corpus = usr_corpus(512 * MiB)
    kinds = {"random": 0, "usr": 0, "zeros": 0, "hole": 0}
    cpos = 0
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(size - pos, rnd.randint(1, 16) * MiB)
            r = rnd.random()
            kind = "random" if r < 0.25 else "usr" if r < 0.65 else "zeros" if r < 0.85 else "hole"
            if kind == "random":
                os.pwrite(f.fileno(), os.urandom(n), pos)
            elif kind == "usr":
                if cpos + n > len(corpus):
                    cpos = 0
                os.pwrite(f.fileno(), corpus[cpos:cpos + n], pos)
                cpos += n
            elif kind == "zeros":
                os.pwrite(f.fileno(), bytes(n), pos)
            kinds[kind] += n
            pos += n
    return {k: round(v / size * 100, 1) for k, v in kinds.items()}


def change_chunks(path: Path, size: int, fraction: float, seed: int = 7) -> int:
    rnd = random.Random(seed)
    count = size // MiB
    picked = rnd.sample(range(count), int(count * fraction))
    with open(path, "r+b") as f:
        for i in picked:
            os.pwrite(f.fileno(), os.urandom(64 * 1024), i * MiB + rnd.randrange(MiB - 64 * 1024))
    return len(picked)


class ServerProc:
    def __init__(self, data_dir: Path, link: Link | None = None) -> None:
        host = link.server_ip if link else "127.0.0.1"
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r})\n"
                "from tests.support.blockserver import BlockServer\n"
                f"s = BlockServer({str(data_dir)!r}, host={host!r}).start()\n"
                "print(json.dumps({'url': s.url, 'token': s.token, 'fp': s.fingerprint}), flush=True)\n"
                "sys.stdin.read()\n")
        netns = ["ip", "netns", "exec", link.netns] if link else []
        self.proc = subprocess.Popen([*netns, sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())
        self.data_dir = data_dir

    def target(self) -> BlockTarget:
        return BlockTarget(self.info["url"], self.info["token"], self.info["fp"])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


class Link:
    """A link of ``mbit`` Mbit/s to the target: the server runs in a network namespace behind a
    veth pair whose host end shapes what the engine sends (``tc`` token bucket filter)."""

    netns = "g2c-bench-link"
    host_if, peer_if = "g2cb-host", "g2cb-peer"
    host_ip, server_ip = "10.231.0.1", "10.231.0.2"

    def __init__(self, mbit: int) -> None:
        self.close()
        cmds = (f"ip netns add {self.netns}",
                f"ip link add {self.host_if} type veth peer name {self.peer_if}",
                f"ip link set {self.peer_if} netns {self.netns}",
                f"ip addr add {self.host_ip}/24 dev {self.host_if}",
                f"ip link set {self.host_if} up",
                f"ip netns exec {self.netns} ip addr add {self.server_ip}/24 dev {self.peer_if}",
                f"ip netns exec {self.netns} ip link set {self.peer_if} up",
                f"ip netns exec {self.netns} ip link set lo up",
                f"tc qdisc add dev {self.host_if} root tbf rate {mbit}mbit burst 256kb latency 100ms")
        try:
            for cmd in cmds:
                subprocess.run(cmd.split(), check=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], stderr=subprocess.DEVNULL, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], stderr=subprocess.DEVNULL, check=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


class TlsFloor:
    """The same non-zero data moved by socat over TLS on loopback (OpenSSL, C, one process per end;
    1 MiB buffers; no hashing, no compression, no holes): what encrypting, sending, receiving,
    decrypting and writing the bytes costs on this machine with an open tool, before any of the
    engine's own work. The data is the image's non-zero 1 MiB chunks, concatenated (the bytes the
    engine sends raw); cold cache like the other runs."""

    def __init__(self, work: Path, image: Path, data_file: Path) -> None:
        zero = bytes(MiB)
        with open(image, "rb") as src, open(data_file, "wb") as out:
            for block in iter(lambda: src.read(MiB), b""):
                if block != zero[:len(block)]:
                    out.write(block)
        self.data_file = data_file
        self.size = data_file.stat().st_size
        self.pem = work / "floor.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(self.pem), "-out", str(work / "floor.crt"), "-days", "1",
                        "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        self.pem.write_text(self.pem.read_text() + (work / "floor.crt").read_text())

    def run(self, dest: Path) -> tuple:
        """(wall s, CPU s of both socat processes) of one transfer to ``dest``, then ``sync``."""
        dest.unlink(missing_ok=True)
        port = 20000 + random.randrange(20000)
        rx = subprocess.Popen(["socat", "-u", "-b", str(MiB), f"OPENSSL-LISTEN:{port},reuseaddr,"
                               f"cert={self.pem},verify=0", f"CREATE:{dest}"])
        time.sleep(0.3)
        drop_caches()
        t = time.monotonic()
        before = os.times()
        subprocess.run(["socat", "-u", "-b", str(MiB), f"FILE:{self.data_file}",
                        f"OPENSSL:127.0.0.1:{port},verify=0"], check=True)
        rx.wait(60)
        os.sync()
        wall = time.monotonic() - t
        after = os.times()
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        assert dest.stat().st_size == self.size, "socat did not move all the data"
        dest.unlink()
        return wall, cpu


def timed(fn) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_cpu(fn, server_pid: int) -> tuple:
    """(wall s, CPU s of this process, CPU s of the server process) of ``fn()``."""
    a, r = cpu_s(os.getpid()), cpu_s(server_pid)
    wall = timed(fn)
    return wall, cpu_s(os.getpid()) - a, cpu_s(server_pid) - r


def physical(image: Path) -> dict:
    drop_caches()
    fd = os.open(str(image), os.O_RDONLY)
    t = time.monotonic()
    n = 0
    while True:
        buf = os.read(fd, 4 * MiB)
        if not buf:
            break
        n += len(buf)
    read_s = time.monotonic() - t
    os.close(fd)
    sample = open(image, "rb").read(256 * MiB)  # noqa: SIM115
    chunks = [sample[i:i + MiB] for i in range(0, len(sample), MiB)]
    t = time.monotonic()
    for c in chunks:
        xxhash.xxh3_128(c).digest()
    xxh_s = time.monotonic() - t
    cctx = zstandard.ZstdCompressor(level=codec.zstd_level(7) or 1)  # the console default
    t = time.monotonic()
    out = sum(len(cctx.compress(c)) for c in chunks)
    zstd_s = time.monotonic() - t
    return {"read_MBps": n / read_s / 1e6, "xxh3_MBps_1core": len(sample) / xxh_s / 1e6,
            "zstd_default_MBps_1core": len(sample) / zstd_s / 1e6, "zstd_ratio_on_sample": out / len(sample)}


RSS_CHILD = r"""
import sys, json, threading
sys.path.insert(0, %(root)r)
from go2cloud_client.replication.block import *
t = BlockTarget(%(url)r, %(token)r, %(fp)r)
rep = BlockReplicator(target=t, disks=[Disk("big", %(path)r)], options=BlockOptions(), state_dir=%(state)r)
r = rep.run_cycle(BlockCycle(1, False), threading.Event())
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child would report the
# benchmark's own peak (the 512 MiB corpus) instead of the engine's
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"maxrss_kib": hwm, "sent": r.chunks_sent,
                  "holes": r.chunks_holes}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/var/tmp/g2c-bench")
    ap.add_argument("--target-dir", default="/dev/shm/g2c-bench-target")
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--rss-gib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=1, help="full passes (each with its own cp baseline)")
    ap.add_argument("--compression", type=int, default=BlockOptions().compression,
                    help="console level 0-10 of the full and incremental passes (default: the engine's)")
    ap.add_argument("--link-mbit", type=int, default=0,
                    help="put the target behind a link of this many Mbit/s (a network namespace and tc); "
                         "the cp and TLS-floor baselines then say nothing about it")
    args = ap.parse_args()
    work = Path(args.workdir)
    tdir = Path(args.target_dir)
    for d in (work, tdir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    size = int(args.size_gib * GiB)
    image = work / "source.img"
    mix = make_image(image, size)
    print(f"image {size / GiB:.1f} GiB, mix % {mix}")
    phys = physical(image)
    print("physical: " + ", ".join(f"{k}={v:.2f}" for k, v in phys.items()))

    # full pass vs cp --sparse=always + sync, --runs times, interleaved (the last engine pass is
    # the base of the incremental below); with socat installed, also the TLS floor
    data_file = work / "data-only.bin"
    floor = TlsFloor(work, image, data_file) if shutil.which("socat") else None
    if floor is None:
        print("socat not installed: no TLS floor (apt-get install socat)")
    opts = BlockOptions(compression=args.compression)
    print(f"engine options: {opts}")
    cp_dst = tdir / "cp-copy.img"
    ratios: list = []
    res: dict = {}
    server = None
    link = None
    try:
        if args.link_mbit:
            link = Link(args.link_mbit)
            print(f"target behind a {args.link_mbit} Mbit/s link (tc tbf on a veth pair)")
        for run in range(1, args.runs + 1):
            if server is not None:  # the previous run's target: gone before the next baseline
                server.stop()
                server = None
            shutil.rmtree(tdir / "server", ignore_errors=True)
            cp_dst.unlink(missing_ok=True)
            drop_caches()
            cp_s = timed(lambda: (subprocess.run(["cp", "--sparse=always", "--", str(image), str(cp_dst)],
                                                 check=True), os.sync()))
            if floor is not None:
                floor_s, floor_cpu = floor.run(tdir / "floor.bin")
                print(f"run {run}: TLS floor (socat + OpenSSL, {floor.size / MiB:.0f} MiB of non-zero data, "
                      f"no hashing or compression): {floor_s:.2f} s, CPU {floor_cpu:.2f} s, "
                      f"{floor_s / cp_s:.2f} x cp+sync")
            shutil.rmtree(work / "state", ignore_errors=True)
            server = ServerProc(tdir / "server", link)
            rep = BlockReplicator(target=server.target(), disks=[Disk("d0", str(image))], options=opts,
                                  state_dir=work / "state")
            drop_caches()
            full_s, agent_cpu, recv_cpu = timed_cpu(
                lambda rep=rep: res.update(r1=rep.run_cycle(BlockCycle(1, False), threading.Event())),
                server.proc.pid)
            r1 = res["r1"]
            ratios.append(full_s / cp_s)
            print(f"run {run}: full pass: engine {full_s:.2f} s (sent {r1.bytes_sent / MiB:.0f} MiB, "
                  f"{r1.chunks_sent} chunks ({r1.chunks_compressed} compressed), {r1.chunks_holes} holes; "
                  f"CPU: engine {agent_cpu:.2f} s, receiver {recv_cpu:.2f} s)  cp+sync {cp_s:.2f} s  "
                  f"ratio {full_s / cp_s:.2f} (target <= 1.5)", flush=True)
            for n, raw, packed, choice in rep.adaptive.rounds:
                print(f"run {run}:   adaptive compression round {n}: raw {adaptive.rate_text(raw)}, "
                      f"compressed {adaptive.rate_text(packed)} -> {choice}")
        if args.runs > 1:
            print(f"full pass ratio, median of {args.runs}: {statistics.median(ratios):.2f} (target <= 1.5)")
        assert server is not None
        image_sha = sha256_file(image)
        target_img = next((tdir / "server").rglob("d0/current.img"))
        assert sha256_file(target_img) == image_sha, "the target's image differs from the source"

        # incremental after changing 5% of the chunks vs rsync --inplace --no-whole-file
        changed = change_chunks(image, size, 0.05)
        drop_caches()
        inc_s, agent_cpu, recv_cpu = timed_cpu(
            lambda: res.update(r2=rep.run_cycle(BlockCycle(2, True), threading.Event())), server.proc.pid)
        r2 = res["r2"]
        drop_caches()
        def rsync() -> None:
            subprocess.run(["rsync", "--inplace", "--no-whole-file", "--", str(image), str(cp_dst)], check=True)
            os.sync()

        rs_s = timed(rsync)
        print(f"incremental ({changed} of {size // MiB} chunks changed): engine {inc_s:.2f} s "
              f"(sent {r2.chunks_sent} chunks, {r2.bytes_sent / MiB:.1f} MiB; CPU: engine {agent_cpu:.2f} s, "
              f"receiver {recv_cpu:.2f} s)  rsync {rs_s:.2f} s  "
              f"ratio {inc_s / rs_s:.2f} (target <= 0.5)")
        image_sha = sha256_file(image)
        assert sha256_file(cp_dst) == image_sha and sha256_file(target_img) == image_sha
    finally:
        if server is not None:
            server.stop()
        if link is not None:
            link.close()
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)

    # peak RSS for a 64 GiB sparse image (256 MiB of data scattered over it)
    big = work / "big.img"
    with open(big, "wb") as f:
        f.truncate(args.rss_gib * GiB)
        rnd = random.Random(3)
        for _ in range(256):
            os.pwrite(f.fileno(), os.urandom(MiB), rnd.randrange(args.rss_gib * 1024) * MiB)
    server = ServerProc(tdir / "server")
    try:
        code = RSS_CHILD % {"root": str(ROOT), "url": server.info["url"], "token": server.info["token"],
                            "fp": server.info["fp"], "path": str(big), "state": str(work / "state-big")}
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout
        big_s = time.monotonic() - t
        doc = json.loads(out.strip().splitlines()[-1])
        print(f"{args.rss_gib} GiB sparse image: {big_s:.1f} s, peak RSS {doc['maxrss_kib'] / 1024:.1f} MiB "
              f"(target <= 200), {doc['sent']} data chunks, {doc['holes']} hole chunks")
    finally:
        server.stop()
    shutil.rmtree(tdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
