"""A backend's record of what it changed on the host, kept in the caller's workdir.

One JSON file per backend (``<workdir>/snapshot-<backend>.json``), written atomically (temp file
in the same directory, fsync, rename, fsync the directory) *before* the host is changed, so that
recover() after a crash knows what to undo. Entries are dicts with at least ``id`` and ``state``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

VERSION = 1
_LOCK = threading.Lock()


class SnapshotRecord:
    """The entries of one backend's record file in ``workdir`` (see the module text)."""

    def __init__(self, workdir: Path, backend: str) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / f"snapshot-{backend.replace('_', '-')}.json"

    def entries(self) -> List[Dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []
        items = data.get("entries", []) if isinstance(data, dict) else []
        return [e for e in items if isinstance(e, dict) and "id" in e]

    def get(self, entry_id: str) -> Optional[Dict[str, Any]]:
        for e in self.entries():
            if e["id"] == entry_id:
                return e
        return None

    def put(self, entry: Dict[str, Any]) -> None:
        with _LOCK:
            items = [e for e in self.entries() if e["id"] != entry["id"]]
            items.append(entry)
            self._write(items)

    def remove(self, entry_id: str) -> None:
        with _LOCK:
            items = [e for e in self.entries() if e["id"] != entry_id]
            self._write(items)

    def _write(self, items: List[Dict[str, Any]]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not items:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=str(self.workdir))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": VERSION, "entries": items}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(str(self.workdir), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
