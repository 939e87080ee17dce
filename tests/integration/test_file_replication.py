"""File-level replication end to end: the real FileReplicator and rsync through the agent's TLS
tunnel into the server's real HTTPS listener and single-use rsync daemons (tests/support/
rsynctarget.py) on loopback, the nasty tree, comparisons by full manifest (bit for bit)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from go2cloud_client.replication import excludes
from go2cloud_client.replication import rsync as rsync_mod
from go2cloud_client.replication.base import Progress, TransferCancelled
from go2cloud_client.replication.rsync import (
    Cycle,
    FileReplicator,
    RsyncConnectionError,
    RsyncPartialTransferError,
    RsyncTarget,
    TransferOptions,
)
from go2cloud_server import manifest, rsyncd
from go2cloud_server.artifacts import TaskTree
from tests.support import tree
from tests.support.rsynctarget import RsyncTargetServer, TaskEntry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, ACLs, chroot daemon)"),
]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[RsyncTargetServer]:
    d = RsyncTargetServer(tmp_path_factory.mktemp("rsync-target")).start()
    yield d
    d.stop()


class Task:
    """One task: credentials + cycle tree + the cycle being written + a replicator factory."""

    def __init__(self, daemon: RsyncTargetServer, base: Path) -> None:
        self.daemon = daemon
        self.base = base
        self.name = "t-" + secrets.token_hex(6)
        self.password = secrets.token_urlsafe(24)
        self.tree = TaskTree(base / "target" / self.name)
        self.tree.root.mkdir(parents=True)
        self.entry = TaskEntry(self.password, self.tree.root)
        daemon.tasks.entries[self.name] = self.entry
        self.committed: List[int] = []
        self.home = base / "home"
        self.excludes_file = excludes.ensure_home_excludes(self.home)
        self.children: List[Optional[int]] = []
        self.progress: List[Progress] = []

    def target(self, password: Optional[str] = None) -> RsyncTarget:
        return RsyncTarget(self.daemon.url(self.name), self.daemon.fingerprint, self.name, self.name,
                           password if password is not None else self.password)

    def replicator(self, paths: List[str], options: Optional[TransferOptions] = None,
                   **kw) -> FileReplicator:
        options = options or TransferOptions(compression=0)
        kw.setdefault("target", self.target())
        return FileReplicator(paths=paths, options=options, excludes_file=self.excludes_file,
                              work_dir=self.home / "work", on_progress=self.progress.append,
                              on_child=self.children.append, **kw)

    def writing(self, paths: List[str], n: int, link: Optional[int] = None) -> None:
        """What the control plane records when it queues cycle ``n``."""
        self.entry.paths = [str(p) for p in paths]
        self.entry.cycle = n
        self.entry.link_cycle = link
        self.tree.prepare_cycle(n)

    def run(self, paths: List[str], n: int, *, link: Optional[int] = None, **kw):
        self.writing(paths, n, link)
        cycle = Cycle(n, f"{n:06d}", f"{link:06d}" if link else None, incremental=n > 1)
        result = self.replicator(paths, **kw).run_cycle(cycle, threading.Event())
        self.tree.commit_cycle(n)
        self.committed.append(n)
        return result

    def image(self, n: int, path: Path) -> Path:
        return self.tree.cycle_dir(n) / str(path).lstrip("/")


@pytest.fixture
def task(daemon: RsyncTargetServer, tmp_path: Path) -> Iterator[Task]:
    t = Task(daemon, tmp_path)
    yield t
    daemon.tasks.entries.pop(t.name, None)
    t.tree.destroy()


def source_manifest(src: Path, excludes_file: Path) -> manifest.Manifest:
    matcher = excludes.Matcher(excludes.load(excludes_file))
    return manifest.build(src, exclude=lambda rel, is_dir: matcher.excluded(os.fsdecode(rel), is_dir))


def assert_same(expected: manifest.Manifest, actual: manifest.Manifest) -> None:
    differences = manifest.diff(expected, actual)
    assert differences == [], "\n".join(differences[:50])


def test_full_then_incremental_cycles_match_source_bit_for_bit(task: Task, tmp_path: Path) -> None:
    src = tree.build(tmp_path / "src")
    # cycle 1: full
    r1 = task.run([str(src)], 1)
    expected1 = source_manifest(src, task.excludes_file)
    image1 = manifest.build(task.image(1, src))
    assert_same(expected1, image1)
    assert r1.passes == 1 and r1.files > 40 and r1.bytes_total > 3 * MiB
    assert not (task.image(1, src) / "tmp" / "scratch").exists()  # shipped excludes
    assert (task.image(1, src) / "tmp").is_dir()
    assert not (task.image(1, src) / "swapfile").exists()
    sparse = os.lstat(os.path.join(os.fsencode(task.image(1, src)), tree.NAMES["sparse"]))
    assert sparse.st_size == tree.SPARSE_SIZE and sparse.st_blocks * 512 < 8 * MiB  # stayed sparse
    assert task.children and task.children[-1] is None and isinstance(task.children[0], int)
    last = task.progress[-1]
    assert last.bytes_done == last.bytes_total == r1.bytes_total and last.paths[0].state == "done"

    # cycle 2: content changes, deletions, additions, renames
    tree.change_content(src)
    tree.delete_some(src)
    tree.add_some(src)
    tree.rename_some(src)
    r2 = task.run([str(src)], 2, link=1)
    assert_same(source_manifest(src, task.excludes_file), manifest.build(task.image(2, src)))
    assert r2.bytes_sent < r1.bytes_sent
    # unchanged files are hard links into cycle 1, changed ones are new inodes
    unchanged = b"docs/odd-size"
    assert os.lstat(os.path.join(os.fsencode(task.image(1, src)), unchanged)).st_ino == \
        os.lstat(os.path.join(os.fsencode(task.image(2, src)), unchanged)).st_ino
    assert os.lstat(os.path.join(os.fsencode(task.image(1, src)), tree.NAMES["small"])).st_ino != \
        os.lstat(os.path.join(os.fsencode(task.image(2, src)), tree.NAMES["small"])).st_ino
    image2 = manifest.build(task.image(2, src))
    assert_same(expected1, manifest.build(task.image(1, src)))  # cycle 1 untouched

    # cycle 3: metadata-only changes (chmod, chown, xattr, ACL, mtime) must not leak into cycle 2
    tree.change_metadata(src)
    task.run([str(src)], 3, link=2)
    assert_same(source_manifest(src, task.excludes_file), manifest.build(task.image(3, src)))
    assert_same(image2, manifest.build(task.image(2, src)))
    assert_same(expected1, manifest.build(task.image(1, src)))

    # retention keeps the newest
    assert task.tree.retain(2, task.committed) == [1]
    assert not task.tree.cycle_dir(1).exists() and task.tree.cycle_dir(3).is_dir()
    assert_same(image2, manifest.build(task.image(2, src)))


def test_nested_and_root_like_paths_land_under_the_cycle_dir(task: Task, tmp_path: Path) -> None:
    a = tmp_path / "srv" / "deep" / "a"
    b = tmp_path / "opt"
    for d, content in ((a, b"a"), (b, b"b")):
        d.mkdir(parents=True)
        (d / "file").write_bytes(content)
    task.run([str(a), str(b)], 1)
    task.run([str(a), str(b)], 2, link=1)
    for d in (a, b):
        assert_same(manifest.build(d), manifest.build(task.image(1, d)))
        assert_same(manifest.build(d), manifest.build(task.image(2, d)))
        assert os.lstat(task.image(1, d) / "file").st_ino == os.lstat(task.image(2, d) / "file").st_ino


def test_exclusions_are_patterns_never_options(task: Task, tmp_path: Path) -> None:
    src = tree.build(tmp_path / "src")
    with open(task.excludes_file, "a") as fh:
        # each of these would be destructive or visible as an rsync option
        fh.write("--remove-source-files\n--delete\n--max-size=1\n--exclude=*\n-rf\n*.swp\n/docs/odd-*\n")
        fh.write("cache/\n")
    (src / "x.swp").write_bytes(b"swap")
    (src / "deep" / "cache").mkdir(parents=True)
    (src / "deep" / "cache" / "c").write_bytes(b"c")
    (src / "deep" / "cache-file").write_bytes(b"kept")
    before = manifest.build(src)
    task.run([str(src)], 1)
    assert_same(before, manifest.build(src))  # --remove-source-files did not act
    image = task.image(1, src)
    assert_same(source_manifest(src, task.excludes_file), manifest.build(image))
    assert not (image / "--delete").exists() and not (image / "-rf").exists()  # excluded literally
    assert not (image / "x.swp").exists() and not (image / "docs" / "odd-size").exists()
    assert not (image / "deep" / "cache").exists() and (image / "deep" / "cache-file").exists()
    assert (image / "data" / "random.bin").stat().st_size == 3 * MiB  # --max-size did not act
    assert (image / "docs" / "small.txt").exists()  # --exclude=* did not act

    with open(task.excludes_file, "a") as fh:
        fh.write("-e sh\n")
    with pytest.raises(excludes.ExcludesError, match=r"line \d+"):
        task.replicator([str(src)]).run_cycle(Cycle(2, "000002", "000001", True), threading.Event())


def test_cancel_mid_transfer_then_rerun_completes(task: Task, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(24 * MiB))
    (src / "small").write_bytes(b"small")
    cancel = threading.Event()
    seen = []

    def on_progress(p: Progress) -> None:
        seen.append(p)
        if p.bytes_done >= 2 * MiB:
            cancel.set()

    rep = task.replicator([str(src)], TransferOptions(bandwidth_mbps=40, compression=0))
    rep.on_progress = on_progress
    task.writing([str(src)], 1)
    started = time.monotonic()
    with pytest.raises(TransferCancelled):
        rep.run_cycle(Cycle(1, "000001", None, False), cancel)
    assert time.monotonic() - started < 20
    assert task.children[0] and task.children[-1] is None
    with pytest.raises(ProcessLookupError):
        os.kill(task.children[0], 0)
    assert any(0 < p.bytes_done < 24 * MiB for p in seen)
    # the interrupted big file was kept (under its own name: --partial) on the target
    partial = task.image(1, src) / "big"
    assert partial.is_file() and 0 < partial.stat().st_size < 24 * MiB
    result = task.run([str(src)], 1)
    assert_same(manifest.build(src), manifest.build(task.image(1, src)))
    assert result.bytes_total == 24 * MiB + 5


def test_bandwidth_limit_limits(task: Task, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob").write_bytes(os.urandom(6 * MiB))
    t0 = time.monotonic()
    task.run([str(src)], 1, options=TransferOptions(bandwidth_mbps=0, compression=0))
    unlimited = time.monotonic() - t0
    t0 = time.monotonic()
    task.run([str(src)], 2, options=TransferOptions(bandwidth_mbps=16, compression=0))  # no link-dest
    limited = time.monotonic() - t0
    # 6 MiB at 16 Mbit/s (2,000,000 B/s) is ~3.1 s; generous margins
    assert limited >= 2.0, (limited, unlimited)
    assert limited > unlimited + 1.0
    assert_same(manifest.build(src), manifest.build(task.image(2, src)))


def test_unreadable_file_is_exit_23_naming_it(task: Task, tmp_path: Path) -> None:
    # As root every file is readable, so the sending rsync runs as root without the capabilities
    # that bypass file permissions (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from
    # the bounding set); a 0000 file is then unreadable. The tunnel it starts runs the same way.
    base = Path(tempfile.mkdtemp(prefix="go2cloud-nobody-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        src = base / "src"
        (src / "ok").mkdir(parents=True)
        (src / "ok" / "fine").write_bytes(b"fine")
        (src / "no access").write_bytes(b"secret")
        os.chmod(src / "no access", 0o000)
        wrapper = base / "rsync-without-dac-override"
        wrapper.write_text(f"""#!/bin/sh
exec /usr/bin/setpriv --bounding-set=-dac_override,-dac_read_search -- {shutil.which("rsync")} "$@"
""")
        wrapper.chmod(0o755)
        task.writing([str(src)], 1)
        rep = task.replicator([str(src)], rsync_path=str(wrapper), version=(3, 5, 0))
        with pytest.raises(RsyncPartialTransferError) as info:
            rep.run_cycle(Cycle(1, "000001", None, False), threading.Event())
        assert "no access" in str(info.value)
        assert not info.value.retryable
        assert (task.image(1, src) / "ok" / "fine").read_bytes() == b"fine"
    finally:
        shutil.rmtree(base)


def test_wrong_password_is_a_clear_retryable_error(task: Task, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    task.writing([str(src)], 1)
    wrong = "wrong-" + secrets.token_hex(8)
    rep = task.replicator([str(src)], target=task.target(password=wrong))
    with pytest.raises(RsyncConnectionError) as info:
        rep.run_cycle(Cycle(1, "000001", None, False), threading.Event())
    assert info.value.retryable
    assert "credentials" in str(info.value) and wrong not in str(info.value)
    assert task.password not in str(info.value)
    assert not (task.image(1, src) / "f").exists()


def test_metadata_only_change_on_a_file_never_touches_previous_image(task: Task, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"content")
    os.setxattr(f, "user.v", b"1")
    task.run([str(src)], 1)
    first = manifest.build(task.image(1, src))
    for step, change in enumerate((
        lambda: os.chmod(f, 0o600),
        lambda: os.chown(f, 1234, 5678),
        lambda: os.setxattr(f, "user.v", b"2"),
        lambda: os.utime(f, ns=(1_500_000_000_000_000_000,) * 2),
    ), start=2):
        previous = manifest.build(task.image(step - 1, src))
        change()
        task.run([str(src)], step, link=step - 1)
        assert_same(manifest.build(src), manifest.build(task.image(step, src)))
        assert_same(previous, manifest.build(task.image(step - 1, src)))
        assert_same(first, manifest.build(task.image(1, src)))
        new_ino = os.lstat(task.image(step, src) / "f").st_ino
        assert new_ino != os.lstat(task.image(step - 1, src) / "f").st_ino


def _logging_rsync(base: Path) -> Tuple[Path, Path]:
    """A wrapper that records each command line of the agent's rsync, then runs the real one."""
    log = base / "rsync-argv.log"
    wrapper = base / "rsync-logged"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {shutil.which("rsync")} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def _runs(log: Path) -> List[str]:
    return [line for line in log.read_text().splitlines() if line.strip() != "--version"]


def test_default_compression_full_and_incremental_match_source(task: Task, tmp_path: Path) -> None:
    """The console's default level (7) end to end: zstd level 1 chosen from the real rsync's
    capabilities, through the tunnel into the real daemon; both cycles equal the source bit for
    bit (issue 16)."""
    rsync_mod._ZSTD_REFUSED.clear()
    src = tree.build(tmp_path / "src")
    wrapper, log = _logging_rsync(tmp_path)
    options = TransferOptions()  # the defaults: compression 7
    assert options.compression == 7
    caps = rsync_mod.rsync_capabilities(str(wrapper))
    task.run([str(src)], 1, options=options, rsync_path=str(wrapper))
    assert_same(source_manifest(src, task.excludes_file), manifest.build(task.image(1, src)))
    tree.change_content(src)
    tree.delete_some(src)
    tree.add_some(src)
    task.run([str(src)], 2, link=1, options=options, rsync_path=str(wrapper))
    assert_same(source_manifest(src, task.excludes_file), manifest.build(task.image(2, src)))
    runs = _runs(log)
    assert len(runs) == 2
    expected = ("--compress-choice=zstd --compress-level=1" if caps.has_zstd
                else "--compress --compress-level=1")
    assert all(expected in run for run in runs), runs


def test_a_target_refusing_zstd_gets_zlib_and_the_same_tree(task: Task, tmp_path: Path, monkeypatch) -> None:
    """The target's rsync daemon refuses --compress-choice (as rsync 3.1.x, which does not know
    it, or a daemon without zstd do): the first run is refused before any data moves, the agent
    runs it again at once with zlib, remembers the target, and the image equals the source."""
    caps = rsync_mod.rsync_capabilities("rsync")
    if not caps.has_zstd:
        pytest.fail(f"this test needs an rsync with zstd (rsync {caps.version} lists {caps.compressors})")
    rsync_mod._ZSTD_REFUSED.clear()
    monkeypatch.setattr(rsyncd, "REFUSED_OPTIONS", (*rsyncd.REFUSED_OPTIONS, "compress-choice"))
    src = tree.build(tmp_path / "src")
    wrapper, log = _logging_rsync(tmp_path)
    try:
        r1 = task.run([str(src)], 1, options=TransferOptions(), rsync_path=str(wrapper))
        assert_same(source_manifest(src, task.excludes_file), manifest.build(task.image(1, src)))
        assert r1.passes == 1
        runs = _runs(log)
        assert len(runs) == 2, runs
        assert "--compress-choice=zstd" in runs[0] and "--compress-choice" not in runs[1]
        assert "--compress --compress-level=1" in runs[1]
        assert task.target().where in rsync_mod._ZSTD_REFUSED
        # the next cycle starts with zlib: one run
        tree.change_content(src)
        task.run([str(src)], 2, link=1, options=TransferOptions(), rsync_path=str(wrapper))
        assert_same(source_manifest(src, task.excludes_file), manifest.build(task.image(2, src)))
        assert len(_runs(log)) == 3 and "--compress-choice" not in _runs(log)[2]
    finally:
        rsync_mod._ZSTD_REFUSED.clear()
