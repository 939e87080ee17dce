"""Batches of framed chunks (``POST .../disks/{disk}/chunks``): built with the agent's own frame
encoder (go2cloud_client.replication.block.codec) and fed to the receiver without sockets. A
batch is checked as a whole before anything of it is written."""

from __future__ import annotations

import os
from typing import List

import blake3
import pytest
import xxhash
import zstandard

from go2cloud_client.replication.block import codec
from go2cloud_client.replication.block.codec import Encoded, Encoder
from go2cloud_server import blockrx
from go2cloud_server.blockrx import BlockReceiver
from go2cloud_server.blockstore import BlockTaskStore

CS = 65536
SIZE = 16 * CS
TOKEN = "tok-1"
PATH = "/block/v1/tasks/t-1/disks/d0/chunks"


@pytest.fixture
def store(tmp_path):
    return BlockTaskStore(tmp_path / "tasks" / "t-1" / "block")


@pytest.fixture
def rx(store):
    return BlockReceiver(lambda task, token: store if (task, token) == ("t-1", TOKEN) else None)


def body_of(encs: List[Encoded]) -> bytes:
    return b"".join(part for enc in encs for part in codec.frame(enc))


def post(rx, body: bytes, cs: int = CS, size: int = SIZE):
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Chunk-Size": str(cs), "X-Disk-Size": str(size)}
    return rx.handle("POST", PATH, headers, bytearray(body))


def image(store) -> bytes:
    path = store.root / "d0" / "current.img"
    return path.read_bytes() if path.exists() else b""


def text_chunk(seed: int) -> bytes:
    return (f"line {seed} of a text file that compresses well\n" * 3000).encode()[:CS]


def test_frame_layout_matches_the_receiver():
    assert codec.FRAME.format == blockrx.FRAME.format and codec.FRAME.size == 32
    assert codec.FLAG_BLAKE3 == blockrx.FLAG_BLAKE3
    assert {v: k for k, v in codec.ENCODING_CODES.items()} == blockrx.ENCODINGS
    assert BlockReceiver.max_body("POST", PATH) == blockrx.MAX_BATCH_BODY


def test_batch_of_raw_zstd_holes_and_blake3_is_written(rx, store):
    enc = Encoder()
    rnd = os.urandom(CS)
    text = text_chunk(1)
    items = [enc.encode(0, rnd, 7, False), enc.encode(1, text, 7, True), enc.encode(2, bytes(CS), 7, False),
             Encoded(3, 5 * CS, b"", codec.HOLE, b"", count=5), enc.encode(8, text_chunk(2), 0, True)]
    assert [e.encoding for e in items] == ["raw", "zstd", "hole", "hole", "raw"]
    status, doc = post(rx, body_of(items))
    assert status == 200, doc
    assert doc["chunks"] == 5 and doc["first"] == 0
    img = image(store)
    assert img[:CS] == rnd and img[CS:2 * CS] == text and img[2 * CS:8 * CS] == bytes(6 * CS)
    assert img[8 * CS:9 * CS] == text_chunk(2)
    # idempotent
    assert post(rx, body_of(items))[0] == 200
    assert image(store) == img


def test_a_corrupted_chunk_refuses_the_whole_batch(rx, store):
    enc = Encoder()
    good = [enc.encode(i, os.urandom(CS), 7, False) for i in range(3)]
    bad = enc.encode(3, text_chunk(3), 7, False)
    bad.digest = xxhash.xxh3_128(b"something else").digest()
    status, doc = post(rx, body_of(good + [bad]))
    assert status == 422 and doc["error"]["code"] == "chunk_hash_mismatch"
    assert "chunk 3" in doc["error"]["message"]
    assert image(store) == b""  # not even the good chunks before it
    # a BLAKE3 mismatch (checksum verification on) refuses it too
    b3 = enc.encode(4, text_chunk(4), 7, True)
    b3.blake3 = blake3.blake3(b"other").hexdigest()
    status, doc = post(rx, body_of(good + [b3]))
    assert status == 422 and image(store) == b""
    # a hole carrying the hash of non-zero data
    hole = Encoded(5, CS, xxhash.xxh3_128(b"x").digest(), codec.HOLE, b"")
    assert post(rx, body_of(good + [hole]))[0] == 422 and image(store) == b""
    # corrupt zstd payload
    z = enc.encode(6, text_chunk(6), 7, False)
    z.body = z.body[:10] + bytes(len(z.body) - 10)
    assert post(rx, body_of(good + [z]))[0] == 400 and image(store) == b""


def test_truncated_or_malformed_batches_write_nothing(rx, store):
    enc = Encoder()
    items = [enc.encode(i, os.urandom(CS), 7, False) for i in range(2)]
    body = body_of(items)
    for cut in (len(body) - 1, len(body) - CS, codec.FRAME.size + CS + 10, 5):
        status, doc = post(rx, body[:cut])
        assert status == 400 and "truncated" in doc["error"]["message"], (cut, doc)
    assert post(rx, b"")[0] == 400
    one = items[0]
    head = codec.FRAME.pack(0, 1, len(one.body), 9, 0, one.digest)  # unknown encoding
    assert post(rx, head + one.body)[0] == 400
    head = codec.FRAME.pack(0, 1, len(one.body), 0, 2, one.digest)  # unknown flag
    assert post(rx, head + one.body)[0] == 400
    head = codec.FRAME.pack(0, 2, len(one.body), 0, 0, one.digest)  # a data frame with a count
    assert post(rx, head + one.body)[0] == 400
    head = codec.FRAME.pack(0, 1, 4, 2, 0, bytes(16))  # a hole with a payload
    assert post(rx, head + b"abcd")[0] == 400
    head = codec.FRAME.pack(0, 3, 0, 2, 0, xxhash.xxh3_128(bytes(CS)).digest())  # a run with a hash
    assert post(rx, head)[0] == 400
    head = codec.FRAME.pack(0, 1, len(one.body), 0, 0, bytes(16))  # data without a hash
    assert post(rx, head + one.body)[0] == 400
    # a valid frame, then one outside the disk: nothing is written
    far = Encoded(16, CS, one.digest, codec.RAW, one.body)
    status, doc = post(rx, body_of([one, far]))
    assert status == 400 and "index" in doc["error"]["message"]
    run = Encoded(10, 7 * CS, b"", codec.HOLE, b"", count=7)  # runs past the end of the disk
    assert post(rx, body_of([one, run]))[0] == 400
    # a decompression bomb inside a batch
    bomb = Encoded(1, CS, xxhash.xxh3_128(bytes(CS)).digest(), codec.ZSTD,
                   zstandard.ZstdCompressor().compress(bytes(CS * 8)))
    assert post(rx, body_of([one, bomb]))[0] == 400
    assert image(store) == b""


def test_batch_limits(rx, store, monkeypatch):
    monkeypatch.setattr(blockrx, "MAX_BATCH_FRAMES", 4)
    holes = [Encoded(i, CS, b"", codec.HOLE, b"") for i in range(5)]
    status, doc = post(rx, body_of(holes))
    assert status == 400 and "frames" in doc["error"]["message"]
    monkeypatch.setattr(blockrx, "MAX_BATCH_PLAIN", 2 * CS)
    enc = Encoder()
    data = [enc.encode(i, text_chunk(i), 7, False) for i in range(3)]
    status, doc = post(rx, body_of(data))
    assert status == 400 and "bytes of chunk data" in doc["error"]["message"]
    assert image(store) == b""


def test_batch_needs_the_task_token(rx, store):
    enc = Encoder()
    body = body_of([enc.encode(0, os.urandom(CS), 7, False)])
    headers = {"Authorization": "Bearer wrong", "X-Chunk-Size": str(CS), "X-Disk-Size": str(SIZE)}
    assert rx.handle("POST", PATH, headers, body)[0] == 401
    assert image(store) == b""
