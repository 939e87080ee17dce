"""The receive buffers of block requests (httpapi.BodyBuffers): reused, and bounded when idle.
The path through the real HTTPS server is in tests/integration/test_block_replication.py."""

from __future__ import annotations

from go2cloud_server.httpapi import BodyBuffers


def test_buffers_are_reused_and_idle_ones_are_bounded():
    pool = BodyBuffers(keep=2)
    a = pool.take(8 << 20)
    assert len(a) == 8 << 20
    pool.give(a)
    assert pool.take(1 << 20) is a  # a smaller body reuses the larger buffer
    b, c, d = pool.take(4 << 20), pool.take(4 << 20), pool.take(4 << 20)
    assert len({id(a), id(b), id(c), id(d)}) == 4  # concurrent requests never share one
    for buf in (a, b, c, d):
        pool.give(buf)
    kept = [pool.take(1), pool.take(1), pool.take(1)]
    assert kept[0] is a and kept[1] is b  # only `keep` idle buffers stay
    assert kept[2] is not c and kept[2] is not d and len(kept[2]) == 1


def test_a_larger_body_replaces_a_too_small_idle_buffer():
    pool = BodyBuffers(keep=1)
    small = pool.take(1024)
    pool.give(small)
    big = pool.take(1 << 20)
    assert big is not small and len(big) == 1 << 20
    pool.give(big)
    assert pool.take(4096) is big
