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


def bench_commit(workdir: Path, disk_gib: int, data_mib: int, changed_mib: int, chunk: int = MiB) -> None:
    """What a cycle's commit costs on the target (``BlockTaskStore.commit`` + ``commit_cycle``: the
    generation), on a ``disk_gib`` GiB sparse disk holding ``data_mib`` MiB of data of which
    ``changed_mib`` MiB changed since the previous cycle, in ``workdir`` (its filesystem decides:
    reflink clones, or deltas). Also the first generation (a full copy of the data where the
    filesystem cannot clone) and a retention fold (keep 1)."""
    from go2cloud_server.blockstore import BlockTaskStore, zero_xxh3

    shutil.rmtree(workdir, ignore_errors=True)
    store = BlockTaskStore(workdir / "block")
    size = disk_gib * GiB
    count = size // chunk
    rnd = random.Random(5)
    zero = bytes.fromhex(zero_xxh3(chunk))
    hashes = [zero] * count
    data_idx = rnd.sample(range(count), data_mib * MiB // chunk)
    store.write_holes("d0", 0, count, chunk, size)
    for i in data_idx:
        buf = os.urandom(chunk)
        h = xxhash.xxh3_128(buf)
        store.write_chunk("d0", i, chunk, size, buf, h.hexdigest())
        hashes[i] = h.digest()

    def commit(cycle: int) -> tuple:
        drop_caches()
        a, t = os.times(), time.monotonic()
        store.commit("d0", cycle, size, b"".join(hashes), chunk)
        (rep,) = store.commit_cycle(cycle)
        wall, b = time.monotonic() - t, os.times()
        return wall, (b.user - a.user) + (b.system - a.system), rep

    w1, c1, r1 = commit(1)
    print(f"commit, {disk_gib} GiB sparse disk, {data_mib} MiB of data: first generation {w1:.2f} s "
          f"(CPU {c1:.2f} s, {r1.get('kind', 'full')} {r1['copy']}, {(r1.get('copied_bytes') or 0) / MiB:.0f} MiB copied)")
    for i in rnd.sample(data_idx, changed_mib * MiB // chunk):
        buf = os.urandom(chunk)
        h = xxhash.xxh3_128(buf)
        store.write_chunk("d0", i, chunk, size, buf, h.hexdigest())
        hashes[i] = h.digest()
    w2, c2, r2 = commit(2)
    print(f"commit, {disk_gib} GiB sparse disk, {changed_mib} MiB changed: {w2:.2f} s (CPU {c2:.2f} s, "
          f"{r2.get('kind', 'full')} {r2['copy']}, {(r2.get('copied_bytes') or 0) / MiB:.0f} MiB copied)  target < 1 s")
    drop_caches()
    t = time.monotonic()
    store.retain(1)
    print(f"retention (keep 1: generation 1 folded into 2): {time.monotonic() - t:.2f} s")
    shutil.rmtree(workdir, ignore_errors=True)


class LoopbackSsh:
    """sshd on 127.0.0.1 with temporary host and client keys (the rsync and blocksync peers go
    through it, as they would to a real target)."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "sshd"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client.pub").read_text())
        os.chmod(self.dir / "authorized_keys", 0o600)
        self.port = 30000 + random.randrange(20000)
        cfg = self.dir / "sshd_config"
        cfg.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host'}\n"
                       f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                       "PasswordAuthentication no\nUsePAM no\nSubsystem sftp internal-sftp\n"
                       f"PidFile {self.dir / 'sshd.pid'}\nStrictModes no\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        self.ssh = (f"ssh -i {self.dir / 'client'} -p {self.port} -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


BLOCKSYNC_CHILD = r"""
import sys, logging
sys.path.insert(0, %(lib)r)
from blocksync import local_to_remote
manager, status = local_to_remote(%(src)r, %(dest)r, block_size=1 << 20, workers=1, create_dest=%(create)r,
                                  wait=True, hostname="127.0.0.1", port=%(port)d, username="root",
                                  key_filename=%(key)r, allow_load_system_host_keys=False, compress=False)
print(status.blocks, flush=True)
"""


def make_fs_image(path: Path, size: int, data: int, seed: int = 11) -> None:
    """An ext4 image (mkfs, loop mount) holding ``data`` bytes in files: half random, half /usr
    content (the issue's workload: 1 GiB, 629 MiB of data)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)], check=True)
    mnt = path.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(path), str(mnt)], check=True)
    try:
        corpus = usr_corpus(data // 2)
        done, i = 0, 0
        while done < data:
            n = min(data - done, rnd.randint(1, 8) * MiB)
            body = os.urandom(n) if i % 2 else corpus[(done // 2) % max(1, len(corpus) - n):][:n]
            (mnt / f"f{i:05d}.bin").write_bytes(body)
            done += n
            i += 1
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def change_fs_image(path: Path, fraction: float, seed: int) -> None:
    """Overwrite ``fraction`` of the files' bytes in place, through the filesystem."""
    rnd = random.Random(seed)
    mnt = path.with_suffix(".mnt")
    subprocess.run(["mount", "-o", "loop", str(path), str(mnt)], check=True)
    try:
        files = sorted(mnt.glob("f*.bin"))
        budget = int(sum(f.stat().st_size for f in files) * fraction)
        while budget > 0:
            f = rnd.choice(files)
            n = min(budget, 256 * 1024, f.stat().st_size)
            with open(f, "r+b") as fh:
                fh.seek(rnd.randrange(0, f.stat().st_size - n + 1))
                fh.write(os.urandom(n))
            budget -= n
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def proc_cpu_tree(pid: int) -> float:
    """CPU seconds of a process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_e2e(work: Path, tdir: Path, runs: int, size: int, data: int, changed: float,
              blocksync_lib: str) -> None:
    """The operator's view, end to end through the real control plane and agent (the server's
    images in ``tdir``): ``migration start`` -> task ``pending`` (full pass, first generation)
    and ``migration sync`` -> ``pending`` (incremental, its generation), against cp + sync, rsync
    --inplace over ssh and blocksync (PyPI) over ssh, ``runs`` interleaved rounds, page caches
    dropped before every timed run."""
    from tests.support.harness import Agent, Server, wait_for

    image = work / "e2e.img"
    make_fs_image(image, size, data)
    base = work / "e2e-base.img"
    shutil.copyfile(image, base)
    print(f"e2e workload: {size / GiB:.1f} GiB ext4 image, {data / MiB:.0f} MiB of data, {changed:.0%} changed "
          f"per incremental; target {tdir}")
    ssh = LoopbackSsh(work)
    rows: dict = {}

    def add(name: str, wall: float, **extra: float) -> None:
        rows.setdefault(name, []).append(dict(wall=wall, **extra))
        more = ", ".join(f"{k} {v:.2f}" for k, v in extra.items())
        print(f"  {name}: {wall:.2f} s" + (f" ({more})" if more else ""), flush=True)

    def one_round(run: int) -> None:
        print(f"round {run}", flush=True)
        shutil.copyfile(base, image)
        dst = tdir / "peer.img"
        # full: cp + sync
        dst.unlink(missing_ok=True)
        drop_caches()
        add("full: cp --sparse=always + sync", timed(lambda: (subprocess.run(
            ["cp", "--sparse=always", "--", str(image), str(dst)], check=True), os.sync())))
        # full: rsync over ssh
        dst.unlink(missing_ok=True)
        drop_caches()
        add("full: rsync --inplace over ssh", timed(lambda: (subprocess.run(
            ["rsync", "--inplace", "--sparse", "-e", ssh.ssh, "--", str(image), f"root@127.0.0.1:{dst}"],
            check=True), os.sync())))
        bs_dst = tdir / "blocksync.img"
        if blocksync_lib:
            bs_dst.unlink(missing_ok=True)
            code = BLOCKSYNC_CHILD % {"lib": blocksync_lib, "src": str(image), "dest": str(bs_dst),
                                      "create": True, "port": ssh.port, "key": str(ssh.dir / "client")}
            drop_caches()
            add("full: blocksync (PyPI 3.0.1) over ssh", timed(lambda: (subprocess.run(
                [sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL), os.sync())))
        # go2cloud: command -> pending
        sdir = tdir / "server"
        shutil.rmtree(sdir, ignore_errors=True)
        server = Server(sdir, heartbeat_interval=1).start()
        agent = Agent(work / "agent-home", server)
        shutil.rmtree(agent.home, ignore_errors=True)
        try:
            server.j("workgroup", "create", "wg-bench")
            agent.start(code=server.new_code("wg-bench", uses=1))
            sid = agent.wait_imported()
            assert server.proc is not None and agent.proc is not None

            def to_pending(*cmd: str) -> tuple:
                a_cpu, s_cpu = proc_cpu_tree(agent.proc.pid), proc_cpu_tree(server.proc.pid)  # type: ignore
                drop_caches()
                t = time.monotonic()
                server.cli(*cmd)
                wait_for(lambda: server.task_status(sid) == "pending", 600, "pending", interval=0.02)
                wall = time.monotonic() - t
                return (wall, proc_cpu_tree(agent.proc.pid) - a_cpu,  # type: ignore
                        proc_cpu_tree(server.proc.pid) - s_cpu)  # type: ignore

            wall, acpu, scpu = to_pending("migration", "start", "--source", sid, "--mode", "block", "--disk",
                                          str(image), "--snapshot", "live", "--no-drill", "--keep-images", "2")
            add("full: go2cloud, migration start -> pending", wall, agent_cpu=acpu, server_cpu=scpu)
            change_fs_image(image, changed, seed=100 + run)
            # incremental peers first (same changed image, their copy of the old one)
            drop_caches()
            add("incremental: rsync --inplace --no-whole-file over ssh", timed(lambda: (subprocess.run(
                ["rsync", "--inplace", "--no-whole-file", "-e", ssh.ssh, "--", str(image),
                 f"root@127.0.0.1:{dst}"], check=True), os.sync())))
            if blocksync_lib:
                code = BLOCKSYNC_CHILD % {"lib": blocksync_lib, "src": str(image), "dest": str(bs_dst),
                                          "create": False, "port": ssh.port, "key": str(ssh.dir / "client")}
                drop_caches()
                add("incremental: blocksync (PyPI 3.0.1) over ssh", timed(lambda: (subprocess.run(
                    [sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL), os.sync())))
            wall, acpu, scpu = to_pending("migration", "sync", "--source", sid)
            add("incremental: go2cloud, migration sync -> pending", wall, agent_cpu=acpu, server_cpu=scpu,
                agent_rss=hwm_mib(agent.proc.pid), server_rss=hwm_mib(server.proc.pid))
            arts = server.artifacts(sid)
            want = sha256_file(image)
            assert sha256_file(dst) == want, "rsync's copy differs"
            if blocksync_lib and sha256_file(bs_dst) != want:
                print("  blocksync's copy DIFFERS from the source: its times are not those of a correct copy")
            out = work / "exported.img"
            r = server.cli("image", "export", "--source", sid, "--out", str(out), "--force", check=False)
            if r.returncode == 0:
                assert sha256_file(out) == want, "the exported generation differs from the source"
            else:  # the code of G2C_BENCH_ROOT has no image export: its newest generation is a full image
                assert sha256_file(Path(arts[-1]["path"])) == want, "the newest generation differs"
            print(f"  generations: {[(a['cycle'], a['report'].get('kind'), a['report'].get('copy')) for a in arts]}")
        finally:
            agent.stop()
            server.stop()
            shutil.rmtree(sdir, ignore_errors=True)

    try:
        for run in range(1, runs + 1):
            one_round(run)
    finally:
        ssh.stop()
    print("\nmedians (range) over", runs, "rounds:")
    for name, vals in rows.items():
        walls = [v["wall"] for v in vals]
        extra = {k: statistics.median(v[k] for v in vals) for k in vals[0] if k != "wall"}
        more = ", ".join(f"{k} {x:.2f}" for k, x in extra.items())
        print(f"  {name}: {statistics.median(walls):.2f} s ({min(walls):.2f}-{max(walls):.2f})"
              + (f"; {more}" if more else ""))


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
    ap.add_argument("--commit-gib", type=int, default=0,
                    help="only measure the commit of a cycle on a sparse disk of this many GiB (in --target-dir)")
    ap.add_argument("--commit-data-mib", type=int, default=1024)
    ap.add_argument("--commit-changed-mib", type=int, default=64)
    ap.add_argument("--e2e", action="store_true",
                    help="only the end-to-end rounds (command -> pending through the control plane and agent)")
    ap.add_argument("--e2e-size-gib", type=float, default=1)
    ap.add_argument("--e2e-data-mib", type=int, default=629)
    ap.add_argument("--e2e-changed", type=float, default=0.06)
    ap.add_argument("--blocksync-lib", default="",
                    help="a directory holding the blocksync package from PyPI and paramiko "
                         "(pip install --target DIR blocksync==3.0.1 paramiko): adds it as a peer")
    args = ap.parse_args()
    if args.e2e:
        for d in (Path(args.workdir), Path(args.target_dir)):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        bench_e2e(Path(args.workdir), Path(args.target_dir), args.runs, int(args.e2e_size_gib * GiB),
                  args.e2e_data_mib * MiB, args.e2e_changed, args.blocksync_lib)
        return 0
    if args.commit_gib:
        bench_commit(Path(args.target_dir) / "commit", args.commit_gib, args.commit_data_mib,
                     args.commit_changed_mib)
        return 0
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
