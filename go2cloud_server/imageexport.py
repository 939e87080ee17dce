"""``go2cloud_server image export``: a committed block generation written out as a raw image.

Runs on the target host, next to (or instead of) a running ``serve``: it reads the server's
database read-only (which source, which block task, which cycles are committed: the artifact rows)
and the generation's files under the image directory; it never reads ``current.img`` (what a
running pass writes) and never changes anything of the server's. The output is a sparse raw
image, bit-identical to the source disk at that cycle: a full generation is copied as it is, a
delta generation composed from the chain it belongs to (``blockgens``). It is written to a
temporary name next to ``--out`` and renamed at the end, so an interrupted export leaves no
half-written image under the name asked for.

The image comes from a :class:`GenerationStore` (the local block store today; an object store
can implement the same two methods), and is written by the one :func:`write_image` whatever
the store.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Protocol

from go2cloud_server.errors import Conflict, InvalidInput, NotFound, ServerError

if TYPE_CHECKING:
    from go2cloud_server.repositories.db import Db

FORMATS = ("raw",)


class GenerationImage(Protocol):
    """One generation of one disk, opened for reading."""

    size: int

    def copy_to(self, out_fd: int) -> Iterator[int]:
        """Write the image's data into ``out_fd`` (already ``size`` bytes long and sparse) at the
        same offsets, leaving its zeros as holes; yields the bytes written as it goes."""
        ...

    def close(self) -> None: ...


class GenerationStore(Protocol):
    """Where a block task's generations are (``blockstore.BlockTaskStore`` for a local store)."""

    def open_generation(self, disk: str, cycle: int) -> GenerationImage:
        """The generation opened; ``NotFound`` when it does not exist."""
        ...

    def generation_report(self, disk: str, cycle: int) -> Optional[Dict[str, Any]]:
        """Its report, or None once it is discarded."""
        ...


@dataclass
class ExportRequest:
    data_dir: Path
    source: str
    out: Path
    cycle: Optional[int] = None
    disk: Optional[str] = None
    fmt: str = "raw"
    force: bool = False
    #: the database ``serve`` was given (``--database``); None: the SQLite file in ``data_dir``
    database: Optional[str] = None


@dataclass
class ExportResult:
    source: str
    task: str
    disk: str
    cycle: int
    out: str
    bytes: int
    data_bytes: int
    kind: str
    state: Optional[str]
    sha256: Optional[str]

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _connect(req: ExportRequest) -> Db:
    """The server's database, for reading: the SQLite file of the data directory opened read-only,
    or the PostgreSQL database ``serve`` was given (``--database``)."""
    if req.database:
        from go2cloud_server.store import open_database

        return open_database(req.database, req.data_dir, pool_size=1)
    path = req.data_dir / "server.db"
    if not path.is_file():
        raise NotFound(f"no server database at {path}: give the --data-dir the server runs with "
                       "(env GO2CLOUD_DATA_DIR), or its --database")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def image_dir(data_dir: Path) -> Path:
    """Where the server keeps its images: the directory recorded by ``serve --target-dir``
    (``<data-dir>/target-dir``), else the data directory."""
    try:
        recorded = (data_dir / "target-dir").read_text().strip()
    except FileNotFoundError:
        recorded = ""
    return Path(recorded) if recorded else data_dir


@dataclass
class _Chosen:
    task: str
    disk: str
    cycle: int
    report: Dict[str, Any]
    #: a file task's: the committed cycle's tree and the source's inventory
    tree: Optional[Path] = None
    inventory: Optional[Dict[str, Any]] = None


def _choose(d: Db, req: ExportRequest) -> _Chosen:
    """The task (the newest with a committed cycle), disk and cycle the request names (clear errors
    otherwise)."""
    import json

    from go2cloud_server.repositories import artifacts as repo_artifacts
    from go2cloud_server.repositories import sources as repo_sources
    from go2cloud_server.repositories import tasks as repo_tasks

    if repo_sources.get(d, req.source) is None:
        raise NotFound(f"source {req.source} is unknown ('go2cloud_server source list' shows the sources)")
    tasks = repo_tasks.all_of_source(d, req.source)  # newest first
    if not tasks:
        raise NotFound(f"source {req.source} has no migration task ('go2cloud_server migration start')")
    rows: List[Dict[str, Any]] = []
    task: Dict[str, Any] = {}
    for t in tasks:  # the newest task with a committed cycle
        rows = [r for r in repo_artifacts.of_task(d, t["id"]) if bool(r["disk"]) == (t["mode"] == "block")]
        if rows:
            task = t
            break
    if not rows:
        raise NotFound(f"source {req.source}: its task {tasks[0]['id']} has no committed cycle yet "
                       "('go2cloud_server migration show' shows its progress)")
    if task["mode"] != "block":
        return _choose_file(d, req, task, rows)
    cycles = sorted({int(r["cycle"]) for r in rows})
    cycle = cycles[-1] if req.cycle is None else req.cycle
    if cycle not in cycles:
        raise NotFound(f"cycle {cycle} of source {req.source} is not committed (or no longer kept); "
                       f"committed cycles: {', '.join(str(c) for c in cycles)}")
    disks = {r["disk"]: r for r in rows if int(r["cycle"]) == cycle}
    names = ", ".join(sorted(disks))
    if req.disk is None:
        if len(disks) > 1:
            raise InvalidInput(f"source {req.source} has {len(disks)} disks at cycle {cycle}: give --disk "
                               f"(one of: {names})")
        disk = next(iter(disks))
    elif req.disk not in disks:
        raise NotFound(f"disk {req.disk} is not a disk of source {req.source} at cycle {cycle} "
                       f"(its disks: {names})")
    else:
        disk = req.disk
    try:
        report = json.loads(disks[disk]["report"] or "{}")
    except ValueError:
        report = {}
    return _Chosen(task["id"], disk, cycle, report if isinstance(report, dict) else {})


def _choose_file(d: Db, req: ExportRequest, task: Dict[str, Any], rows: List[Dict[str, Any]]) -> _Chosen:
    """A file task's committed cycle: its tree and the source's inventory (what imagebuild needs)."""
    import json

    from go2cloud_server.repositories import sources as repo_sources

    paths = json.loads(task.get("paths") or "[]")
    if "/" not in paths:
        raise InvalidInput(f"task {task['id']} of source {req.source} migrated {', '.join(paths)}, not the "
                           "whole system ('/'): a bootable disk needs the root file system")
    if req.disk is not None:
        raise InvalidInput("--disk is for block tasks: a file task's disk is the one that held '/' "
                           "(from the source's inventory)")
    cycles = sorted(int(r["cycle"]) for r in rows)
    cycle = cycles[-1] if req.cycle is None else req.cycle
    if cycle not in cycles:
        raise NotFound(f"cycle {cycle} of source {req.source} is not committed (or no longer kept); "
                       f"committed cycles: {', '.join(str(c) for c in cycles)}")
    row = next(r for r in rows if int(r["cycle"]) == cycle)
    source = repo_sources.get(d, req.source) or {}
    inventory = json.loads(source.get("inventory") or "{}")
    return _Chosen(task["id"], "", cycle, {}, tree=Path(row["path"]), inventory=inventory)


def export_image(req: ExportRequest) -> ExportResult:
    """Write the generation ``req`` names to ``req.out`` (see the module's docstring)."""
    if req.fmt not in FORMATS:
        raise InvalidInput(f"--format {req.fmt}: not available yet; this version writes raw images only "
                           "(convert one with 'qemu-img convert -f raw -O qcow2 IN OUT')")
    out = Path(req.out)
    if out.exists() and not req.force:
        raise Conflict(f"{out} exists: give --force to replace it, or another --out")
    if out.exists() and not out.is_file():
        raise InvalidInput(f"{out} exists and is not a regular file")
    if not out.parent.is_dir():
        raise NotFound(f"{out.parent} does not exist: create it first, or give another --out")
    conn = _connect(req)
    try:
        chosen = _choose(conn, req)
    finally:
        conn.close()
    if chosen.tree is not None:
        return _export_file_task(req, chosen, out)
    from go2cloud_server.blockstore import BlockTaskStore

    store = BlockTaskStore(image_dir(req.data_dir) / "tasks" / chosen.task / "block")
    try:
        size, data = write_image(store, chosen.disk, chosen.cycle, out, req.force)
    except OSError as exc:
        raise ServerError(f"cannot export cycle {chosen.cycle} of disk {chosen.disk} to {out}: {exc} "
                          "(nothing was written under that name)", code="export_failed") from exc
    report = store.generation_report(chosen.disk, chosen.cycle) or chosen.report
    return ExportResult(source=req.source, task=chosen.task, disk=chosen.disk, cycle=chosen.cycle,
                        out=str(out), bytes=size, data_bytes=data, kind=str(report.get("kind") or "full"),
                        state=report.get("state"), sha256=report.get("sha256"))


def _export_file_task(req: ExportRequest, chosen: _Chosen, out: Path) -> ExportResult:
    """A file task's cycle built into a bootable disk (go2cloud_server.imagebuild), with its
    conversion report next to it (``<out>.conversion.json`` / ``.txt``)."""
    from go2cloud_server import imagebuild

    assert chosen.tree is not None
    if not chosen.tree.is_dir():
        raise NotFound(f"the tree of cycle {chosen.cycle} is missing at {chosen.tree}")
    layout = imagebuild.plan(chosen.inventory or {}, chosen.tree)
    report = imagebuild.build(chosen.tree, layout, out, force=req.force)
    imagebuild.write_report(report, out)
    st = out.stat()
    return ExportResult(source=req.source, task=chosen.task, disk=layout.name, cycle=chosen.cycle,
                        out=str(out), bytes=st.st_size, data_bytes=st.st_blocks * 512, kind="converted",
                        state=None, sha256=None)


def write_image(store: GenerationStore, disk: str, cycle: int, out: Path, force: bool = False) -> tuple:
    """Generation ``cycle`` of ``disk`` as a sparse raw file at ``out``: written to a temporary
    file next to it, fsynced, renamed. Conflict (nothing left behind) when the generation was
    discarded while it was written. Returns (size, data bytes written)."""
    before = store.generation_report(disk, cycle)
    image = store.open_generation(disk, cycle)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.export-tmp")
    done = False
    try:
        fd = os.open(str(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, image.size)
            data = sum(image.copy_to(fd))
            os.fsync(fd)
        finally:
            os.close(fd)
        image.close()
        after = store.generation_report(disk, cycle)
        if after is None or before is None or after.get("id") != before.get("id"):
            raise Conflict(f"generation {cycle} of disk {disk} was discarded (retention or cancel) while it "
                           "was exported: nothing was written; export a cycle that is kept")
        if out.exists() and not force:
            raise Conflict(f"{out} was created meanwhile: give --force to replace it")
        os.replace(tmp, out)
        done = True
        dfd = os.open(str(out.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return image.size, data
    finally:
        image.close()
        if not done:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
