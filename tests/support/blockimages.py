"""Test-only: the whole image of a block generation, whatever its kind. A full generation's file is
the image; a delta (a target filesystem without reflink) holds only the chunks of its cycle, so
its image is composed from the generations' files, read-only, as ``image export`` does
(tests/integration/test_block_generations.py runs the command itself)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

MIB = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def write_generation(art: Mapping[str, Any], out: Path) -> Path:
    """Block generation ``art`` (an artifact row) written to ``out`` as a raw image."""
    from go2cloud_server.blockstore import BlockTaskStore
    from go2cloud_server.imageexport import write_image

    path = Path(art["path"])  # <task>/block/<disk>/gen-N.img or .delta
    out.unlink(missing_ok=True)
    write_image(BlockTaskStore(path.parents[1]), str(art["disk"]), int(art["cycle"]), out)
    return out


def generation_sha256(art: Mapping[str, Any]) -> str:
    """sha256 of the whole image of block generation ``art``: its file for a full image, else
    composed from the deltas."""
    if (art.get("report") or {}).get("kind", "full") == "full":
        return sha256(Path(art["path"]))
    # next to the test's files, not the target's (which may be a tiny filesystem on purpose)
    out = Path(tempfile.gettempdir()) / f"g2c-test-gen-{os.getpid()}-{art['cycle']}-{art['disk']}.img"
    try:
        return sha256(write_generation(art, out))
    finally:
        out.unlink(missing_ok=True)
