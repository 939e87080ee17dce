from __future__ import annotations

import os

import pytest
import xxhash
import zstandard

from go2cloud_client.replication.block import codec


def test_zstd_level_map_is_monotonic_and_bounded():
    assert codec.zstd_level(0) is None
    levels = [codec.zstd_level(n) for n in range(1, 11)]
    assert levels == [-7, -5, -4, -3, -2, -1, 1, 3, 9, 19]
    assert levels == sorted(levels)
    assert codec.zstd_level(7) == 1  # the console default: zstd's fastest regular level
    for bad in (-1, 11, True, "7", 7.0):
        with pytest.raises(ValueError):
            codec.zstd_level(bad)  # type: ignore[arg-type]


def test_zero_detection():
    assert codec.is_zero(bytes(1 << 20))
    data = bytearray(1 << 20)
    data[-1] = 1
    assert not codec.is_zero(bytes(data))
    data[-1] = 0
    data[0] = 0x80
    assert not codec.is_zero(bytes(data))
    assert codec.zero_hash(4096) == xxhash.xxh3_128(bytes(4096)).digest()


def test_encode_hole_raw_and_zstd():
    enc = codec.Encoder()
    hole = enc.encode(0, bytes(65536), 7, checksum=True)
    assert hole.encoding == codec.HOLE and hole.body == b"" and hole.blake3 is None
    assert hole.digest == codec.zero_hash(65536)

    noise = os.urandom(65536)
    raw = enc.encode(1, noise, 7, checksum=False)
    assert raw.encoding == codec.RAW and raw.body == noise and raw.blake3 is None

    text = b"the quick brown fox jumps over the lazy dog\n" * 2000
    z = enc.encode(2, text, 7, checksum=True)
    assert z.encoding == codec.ZSTD and len(z.body) < len(text) // 10
    assert zstandard.ZstdDecompressor().decompress(z.body) == text
    assert z.digest == xxhash.xxh3_128(text).digest()
    assert z.blake3 is not None and len(z.blake3) == 64

    off = enc.encode(3, text, 0, checksum=False)
    assert off.encoding == codec.RAW and off.body == text


def test_encoder_follows_level_changes():
    enc = codec.Encoder()
    text = os.urandom(2048).hex().encode() * 8
    fast = enc.encode(0, text, 1, False).body
    best = enc.encode(0, text, 10, False).body
    assert len(best) <= len(fast)
    assert zstandard.ZstdDecompressor().decompress(best) == text
