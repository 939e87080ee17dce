"""List the file names inside an initramfs without unpacking it to disk.

An initramfs is one or more cpio archives (``newc`` format, magic ``070701`` / ``070702``)
concatenated, the first ones often uncompressed (early microcode), the last one usually
compressed (gzip, xz, zstd, lz4 is not read). ``lsinitramfs`` / ``lsinitrd`` are used when the
host has them (:func:`list_with_tool`); this reader is the fallback so the drill can still tell
whether a driver is there.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
from pathlib import Path
from typing import List, Optional

from go2cloud_client import subp

#: Decompressed size above which we stop reading (an initramfs is tens of MiB).
MAX_BYTES = 1024 * 1024 * 1024
_NEWC = (b"070701", b"070702")
_HEADER = 110


class InitramfsUnreadable(Exception):
    """The image is in a format this reader does not know."""


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        return reader.read(MAX_BYTES)
    raise InitramfsUnreadable("unknown compression (not cpio, gzip, xz or zstd)")


def list_names(data: bytes) -> List[str]:
    """File names of every cpio archive in ``data`` (decompressing the compressed tail)."""
    names: List[str] = []
    pos = 0
    while pos < len(data):
        if data[pos:pos + 6] in _NEWC:
            while True:
                header = data[pos:pos + _HEADER]
                if len(header) < _HEADER or header[:6] not in _NEWC:
                    raise InitramfsUnreadable("truncated cpio archive")
                filesize = int(header[54:62], 16)
                namesize = int(header[94:102], 16)
                name = data[pos + _HEADER:pos + _HEADER + namesize - 1].decode("utf-8", "replace")
                pos = (pos + _HEADER + namesize + 3) & ~3
                pos = (pos + filesize + 3) & ~3
                if name == "TRAILER!!!":
                    break
                names.append(name)
            while pos < len(data) and data[pos] == 0:  # padding between archives
                pos += 1
            continue
        names.extend(list_names(_decompress(data[pos:])))
        break
    return names


def read_names(path: Path) -> List[str]:
    return list_names(path.read_bytes())


def list_with_tool(path: Path) -> Optional[List[str]]:
    """The listing from ``lsinitramfs`` (Debian) or ``lsinitrd`` (dracut), None when neither is
    installed or it fails."""
    for tool in ("lsinitramfs", "lsinitrd"):
        exe = shutil.which(tool)
        if not exe:
            continue
        try:  # lsinitramfs prints names, lsinitrd "ls -l" lines: the name is the last field
            out = subp.run([exe, str(path)], timeout=120).stdout
        except subp.ProcessError:
            return None
        return [line.split()[-1] for line in out.splitlines() if line.strip()]
    return None
