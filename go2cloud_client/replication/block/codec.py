"""Chunk encoding: zero detection, xxh3-128 / BLAKE3 hashes, zstd with the console's 0-10 scale.

Compression level: the console's 0-10 scale maps to zstd levels through the map both replication
modes share (:mod:`go2cloud_client.replication.levels`: 7, the default, is zstd 1). 0 is off.

A chunk is sent compressed only when the frame is smaller than the plain chunk; otherwise raw.
(Which level a chunk gets, the task's or 0, is the engine's choice: :mod:`.adaptive`.)
Chunks of :data:`SAMPLE_MIN` bytes or more are first probed: when none of three 4 KiB samples
(start, middle, end) compresses by :data:`SAMPLE_GAIN` or better, the chunk goes raw without
compressing it (random or already compressed data: zstd 1 spends ~0.35 ms per MiB finding that
out, the probe ~0.01 ms). A chunk compressible only away from the samples is then sent raw.

Batches (docs/protocol.md, "Block target"): several chunks travel in one request, each as a
frame :data:`FRAME` (index, count, payload length, encoding, flags, xxh3-128), then the 32-byte
BLAKE3 when ``flags & FLAG_BLAKE3``, then the payload (:func:`frame`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional

import blake3
import xxhash
import zstandard

from go2cloud_client.replication.levels import zstd_level

RAW = "raw"
ZSTD = "zstd"
HOLE = "hole"
#: batch frame header: index, count, payload length, encoding code, flags, 2 pad bytes, xxh3-128
FRAME = struct.Struct(">IIIBB2x16s")
ENCODING_CODES = {RAW: 0, ZSTD: 1, HOLE: 2}
FLAG_BLAKE3 = 1
_NO_HASH = bytes(16)
SAMPLE = 4096
SAMPLE_MIN = 64 * 1024
SAMPLE_GAIN = 0.95

_ZERO_CACHE: Dict[int, bytes] = {}
_ZERO_HASH: Dict[int, bytes] = {}


def zeros(length: int) -> bytes:
    found = _ZERO_CACHE.get(length)
    if found is None:
        found = bytes(length)
        if len(_ZERO_CACHE) < 8:
            _ZERO_CACHE[length] = found
    return found


def is_zero(data: bytes) -> bool:
    """True when every byte is 0 (one memcmp against a cached zero buffer)."""
    return data == zeros(len(data))


def zero_hash(length: int) -> bytes:
    """xxh3-128 digest of ``length`` zero bytes (what a hole hashes to)."""
    found = _ZERO_HASH.get(length)
    if found is None:
        found = xxhash.xxh3_128(zeros(length)).digest()
        if len(_ZERO_HASH) < 8:
            _ZERO_HASH[length] = found
    return found


def xxh3(data: bytes) -> bytes:
    return xxhash.xxh3_128(data).digest()


def blake3_hex(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@dataclass
class Encoded:
    """One chunk ready to send. ``body`` is empty for a hole."""

    index: int
    length: int
    digest: bytes
    encoding: str
    body: bytes
    blake3: Optional[str] = None
    count: int = 1  # > 1 only for a run of holes
    window: int = 0  # the adaptive-compression trial window it was encoded in (0 = none)


class Encoder:
    """Per-thread compressor (zstd contexts are not thread-safe): one per worker."""

    def __init__(self) -> None:
        self._level: Optional[int] = None
        self._cctx: Optional[zstandard.ZstdCompressor] = None

    def compress(self, data: bytes, level: int) -> Optional[bytes]:
        """zstd frame of ``data`` at console ``level``, or None when off or not smaller."""
        zl = zstd_level(level)
        if zl is None:
            return None
        if self._cctx is None or self._level != zl:
            self._cctx = zstandard.ZstdCompressor(level=zl, write_content_size=True, write_checksum=False)
            self._level = zl
        if len(data) >= SAMPLE_MIN and not self._samples_compress(self._cctx, data):
            return None  # random or already compressed data
        frame = self._cctx.compress(data)
        return frame if len(frame) < len(data) else None

    @staticmethod
    def _samples_compress(cctx: zstandard.ZstdCompressor, data: bytes) -> bool:
        view = memoryview(data)
        for off in (0, len(data) // 2 - SAMPLE // 2, len(data) - SAMPLE):
            if len(cctx.compress(view[off:off + SAMPLE])) < SAMPLE * SAMPLE_GAIN:
                return True
        return False

    def encode(self, index: int, data: bytes, level: int, checksum: bool,
               digest: Optional[bytes] = None) -> Encoded:
        length = len(data)
        if is_zero(data):
            return Encoded(index, length, zero_hash(length), HOLE, b"")
        if digest is None:
            digest = xxh3(data)
        b3 = blake3_hex(data) if checksum else None
        frame = self.compress(data, level)
        if frame is None:
            return Encoded(index, length, digest, RAW, data, b3)
        return Encoded(index, length, digest, ZSTD, frame, b3)


def frame(enc: Encoded) -> List[bytes]:
    """The parts of ``enc``'s frame in a batch (header, BLAKE3 when set, payload)."""
    flags = FLAG_BLAKE3 if enc.blake3 else 0
    digest = enc.digest if enc.count == 1 and enc.digest else _NO_HASH
    parts = [FRAME.pack(enc.index, enc.count, len(enc.body), ENCODING_CODES[enc.encoding], flags, digest)]
    if enc.blake3:
        parts.append(bytes.fromhex(enc.blake3))
    if enc.body:
        parts.append(enc.body)
    return parts
