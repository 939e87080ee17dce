"""TLS in memory for the agents' rsync sessions (go2cloud_server.tlsstream): the ClientHello's ALPN
offer read without consuming it, and a TLSConnection that carries a stream both ways at once,
against the agent's real tunnel stream (go2cloud_client.replication.tunnel.Stream) over a socket
pair (no network)."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from typing import List

import pytest

from go2cloud_client.replication.tunnel import Stream
from go2cloud_client.tlspin import check_pin, client_context
from go2cloud_server import tls, tlsstream


def _hello(alpn: List[str]) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="cp.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_the_alpn_offer_of_a_real_client_hello():
    assert tlsstream.client_hello_alpn(_hello(["go2cloud-rsync"])) == [b"go2cloud-rsync"]
    assert tlsstream.client_hello_alpn(_hello(["h2", "http/1.1"])) == [b"h2", b"http/1.1"]
    assert tlsstream.client_hello_alpn(_hello([])) == []


def test_an_incomplete_or_foreign_first_flight_has_no_offer():
    hello = _hello(["go2cloud-rsync"])
    for cut in (0, 3, 5, 40, len(hello) - 1):
        assert tlsstream.client_hello_alpn(hello[:cut]) is None
    assert tlsstream.client_hello_alpn(b"POST /rsync/v1/tasks/t/session HTTP/1.1\r\n\r\n") is None
    bad = bytearray(hello)
    bad[5] = 0x02  # a ServerHello, not a ClientHello
    assert tlsstream.client_hello_alpn(bytes(bad)) is None


def test_peek_waits_for_the_whole_hello_and_consumes_nothing():
    hello = _hello(["go2cloud-rsync"])
    a, b = socket.socketpair()
    with a, b:
        a.sendall(hello[:20])
        timer = threading.Timer(0.05, a.sendall, args=(hello[20:],))
        timer.start()
        assert tlsstream.peek_alpn(b, timeout=5) == [b"go2cloud-rsync"]
        timer.join()
        assert b.recv(len(hello) + 10, socket.MSG_DONTWAIT) == hello  # all still there


def test_peek_gives_up_on_silence_and_on_plain_http():
    a, b = socket.socketpair()
    with a, b:
        assert tlsstream.peek_alpn(b, timeout=0.05) is None
        a.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert tlsstream.peek_alpn(b, timeout=1) is None


@pytest.fixture
def pair(tmp_path):
    cert, key = tls.ensure_certificate(tmp_path / "tls", [])
    server_ctx = tls.server_context(cert, key)
    client_ctx, pin = client_context(tls.fingerprint(cert))
    client_ctx.set_alpn_protocols(["go2cloud-rsync"])
    a, b = socket.socketpair()
    accepted: List[tlsstream.TLSConnection] = []
    t = threading.Thread(target=lambda: accepted.append(tlsstream.TLSConnection.accept(b, server_ctx, 10)))
    t.start()
    client = Stream.connect(a, client_ctx, "cp.example")
    t.join(10)
    check_pin(client, pin)  # the pinned certificate, read from the in-memory TLS state
    yield client, accepted[0]
    a.close()
    b.close()


def test_a_stream_flows_both_ways_at_once_bit_for_bit(pair):
    client, server = pair
    size = 24 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size)
    got: dict = {}

    def read_all(name, recv):
        h, n = hashlib.sha256(), 0
        while n < size:
            data = recv()
            assert data, f"{name}: end of stream after {n} bytes"
            h.update(data)
            n += len(data)
        got[name] = (n, h.hexdigest())

    def write_all(send, data):
        for i in range(0, len(data), 100_000):  # writes of odd sizes, records of every size
            send(data[i:i + 100_000])

    threads = [threading.Thread(target=read_all, args=("server", server.recv_some)),
               threading.Thread(target=read_all, args=("client", client.recv)),
               threading.Thread(target=write_all, args=(client.send, up)),
               threading.Thread(target=write_all, args=(server.sendall, down))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got["server"] == (size, hashlib.sha256(up).hexdigest())
    assert got["client"] == (size, hashlib.sha256(down).hexdigest())


def test_the_http_request_head_reads_through_makefile_and_the_end_is_seen(pair):
    client, server = pair
    client.send(b"POST /rsync/v1/tasks/t-1/session HTTP/1.1\r\nHost: cp\r\n\r\n")
    rfile = server.makefile("rb", -1)
    assert rfile.readline() == b"POST /rsync/v1/tasks/t-1/session HTTP/1.1\r\n"
    assert rfile.readline() == b"Host: cp\r\n"
    assert rfile.readline() == b"\r\n"
    server.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert client.recv() == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    client.sock.shutdown(socket.SHUT_WR)
    assert server.recv_some() == b""
