"""Test-only: the whole image of a block generation, whatever its kind. A full generation's file is
the image; a delta (a target filesystem without reflink) holds only the chunks of its cycle, so
its image is written out with ``go2cloud_server image export`` (the operator's way)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

MIB = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def exported(server: Any, source_id: str, art: Mapping[str, Any], out: Path) -> Path:
    """Generation ``art`` (an artifact row of ``source_id``'s latest task) written to ``out``
    by ``go2cloud_server image export``."""
    server.j("image", "export", "--source", source_id, "--cycle", str(art["cycle"]), "--disk",
             str(art["disk"]), "--out", str(out), "--force")
    return out


def generation_sha256(server: Any, source_id: str, art: Mapping[str, Any]) -> str:
    """sha256 of the whole image of block generation ``art``: its file for a full image, else
    its image as ``image export`` writes it."""
    if (art.get("report") or {}).get("kind", "full") == "full":
        return sha256(Path(art["path"]))
    out = Path(server.data_dir).parent / f"export-{source_id}-{art['cycle']}-{art['disk']}.img"
    try:
        return sha256(exported(server, source_id, art, out))
    finally:
        out.unlink(missing_ok=True)
