#!/usr/bin/env python3
"""The file-level TLS relays alone: the agent's tunnel sending, the server's session receiving.

    python3 bench/bench_tunnel.py [--mib 900] [--rounds 3]

Run by hand (never in CI). Each round pipes ``--mib`` MiB of random data (from a file on
/dev/shm, so the disk plays no part) into the tunnel's send loop (:class:`Stream`, the code
``rsync-tunnel`` runs), over TLS on loopback, into the server's receive loop
(:class:`TLSConnection.recv_many_into`, the code an rsync session runs), which hands the bytes to a
child that discards them, as the rsync daemon would read them. Prints wall time, CPU time and minor
page faults per side, and the same transfer without TLS as the floor of the two relays.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from go2cloud_client.replication import tunnel  # noqa: E402
from go2cloud_server import tlsstream  # noqa: E402


def _usage() -> Dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": r.ru_utime + r.ru_stime, "minflt": float(r.ru_minflt)}


def receiver(port_file: str, cert: str, key: str, plain: bool) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    Path(port_file).write_text(str(listener.getsockname()[1]))
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    conn = sock if plain else tlsstream.TLSConnection.accept(sock, ctx, 10)
    ours, theirs = socket.socketpair()
    sink = subprocess.Popen(["cat"], stdin=theirs, stdout=subprocess.DEVNULL)
    theirs.close()
    before = _usage()
    start = time.monotonic()
    buf = memoryview(bytearray(256 * 1024))
    read = conn.recv_into if plain else conn.recv_many_into
    while True:
        try:
            n = read(buf)
        except OSError:
            break
        if not n:
            break
        ours.sendall(buf[:n])
    ours.close()
    sink.wait()
    after = _usage()
    print(f"{time.monotonic() - start:.3f} {after['cpu'] - before['cpu']:.3f} {after['minflt'] - before['minflt']:.0f}")


def sender(port: int, plain: bool) -> None:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if plain:
        stream = tunnel.Stream(raw)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        stream = tunnel.Stream.connect(raw, ctx, "bench")
    fd = sys.stdin.fileno()
    tunnel._widen_pipe(fd)
    buf = bytearray(tunnel.BUFFER)
    view = memoryview(buf)
    before = _usage()
    start = time.monotonic()
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        stream.send(view[:n])
    raw.shutdown(socket.SHUT_WR)
    after = _usage()
    print(f"{time.monotonic() - start:.3f} {after['cpu'] - before['cpu']:.3f} {after['minflt'] - before['minflt']:.0f}")


def one_round(work: Path, data: Path, plain: bool) -> List[List[float]]:
    port_file = work / "port"
    if port_file.exists():
        port_file.unlink()
    me = [sys.executable, __file__]
    rx = subprocess.Popen(me + ["--role", "receiver", "--port-file", str(port_file), "--cert", str(work / "c.pem"),
                                "--key", str(work / "k.pem")] + (["--plain"] if plain else []),
                          stdout=subprocess.PIPE, text=True)
    while not port_file.exists() or not port_file.read_text():
        time.sleep(0.05)
    with open(data, "rb") as src:
        tx = subprocess.run(me + ["--role", "sender", "--port", port_file.read_text()] + (["--plain"] if plain else []),
                            stdin=src, stdout=subprocess.PIPE, text=True, check=True)
    out, _ = rx.communicate(timeout=300)
    return [[float(x) for x in tx.stdout.split()], [float(x) for x in out.split()]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=900)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--role", choices=["receiver", "sender"], help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "receiver":
        receiver(args.port_file, args.cert, args.key, args.plain)
        return 0
    if args.role == "sender":
        sender(args.port, args.plain)
        return 0
    with tempfile.TemporaryDirectory(prefix="g2c-bench-tunnel-") as tmp:
        work = Path(tmp)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(work / "k.pem"), "-out", str(work / "c.pem"), "-days", "1",
                        "-subj", "/CN=bench"], check=True, capture_output=True)
        with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="g2c-bench-tunnel-") as data:
            for _ in range(args.mib):
                data.write(os.urandom(1 << 20))
            data.flush()
            rows: Dict[str, List[List[List[float]]]] = {"tls": [], "plain": []}
            for _ in range(args.rounds):
                for kind in ("tls", "plain"):
                    rows[kind].append(one_round(work, Path(data.name), kind == "plain"))
        print(f"{args.mib} MiB, {args.rounds} rounds, medians (range)")
        print("| transport | side | wall s | CPU s | minor faults |")
        print("| --- | --- | ---: | ---: | ---: |")
        for kind, runs in rows.items():
            for side, name in ((0, "tunnel (sender)"), (1, "server session (receiver)")):
                cols = []
                for i in range(3):
                    vals = [r[side][i] for r in runs]
                    cols.append(f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})" if i < 2
                                else f"{statistics.median(vals):.0f}")
                print(f"| {kind} | {name} | {' | '.join(cols)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
