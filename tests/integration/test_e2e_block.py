"""Block-level migrations end to end: the real server (with its block receiver), the real agent
(block engine + snapshot driver) in their own processes, real ext4 and xfs filesystems in image
files written through loop mounts.

After every cycle the generation image on the target must equal the source image bit for bit
(sha256), older generations must stay as they were, and interruptions (pause, kill -9 of the
agent) must not change the result. Needs root (loop devices, mount, fsfreeze).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.support.blockimages import generation_sha256, write_generation
from tests.support.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.shared_server]  # one server

MIB = 1 << 20

if os.geteuid() != 0:  # pragma: no cover - CI runs these as root (scripts/setup.sh)
    pytest.skip("block e2e tests need root (loop devices, mount)", allow_module_level=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


@contextmanager
def mounted(image: Path, where: Path, *opts: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", ",".join(("loop",) + opts), "--", str(image), str(where))
    try:
        yield where
    finally:
        subprocess.run(["sync"], check=False)
        run("umount", "--", str(where))


def make_fs(image: Path, fstype: str, size_mib: int = 96) -> None:
    if fstype == "xfs":
        size_mib = max(size_mib, 320)  # mkfs.xfs refuses filesystems under 300 MB (the image is sparse)
    with open(image, "wb") as fh:
        fh.truncate(size_mib * MIB)
    if fstype == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    else:
        run("mkfs.xfs", "-q", "-f", str(image))


def fill(root: Path, seed: int, data_mib: int = 40) -> None:
    """Real data: random binaries, text, a sparse file, nested directories, a hard link."""
    rnd = random.Random(seed)
    (root / "bin").mkdir(exist_ok=True)
    for i in range(data_mib // 4):
        (root / "bin" / f"blob{i:02d}.bin").write_bytes(rnd.randbytes(4 * MIB))
    text = root / "etc" / "deep" / "er"
    text.mkdir(parents=True, exist_ok=True)
    for i in range(200):
        (text / f"conf{i}.txt").write_text("".join(f"key{j} = value {rnd.random()}\n" for j in range(50)))
    with open(root / "sparse.img", "wb") as fh:
        fh.seek(8 * MIB)
        fh.write(b"end")
    os.link(root / "bin" / "blob00.bin", root / "hardlink.bin")


def change_some(root: Path, seed: int, fraction: float = 0.05) -> None:
    """Overwrite about ``fraction`` of the data in place and add a file."""
    rnd = random.Random(seed)
    blobs = sorted((root / "bin").iterdir())
    budget = int(sum(b.stat().st_size for b in blobs) * fraction)
    while budget > 0:
        blob = rnd.choice(blobs)
        n = min(budget, 256 * 1024)
        with open(blob, "r+b") as fh:
            fh.seek(rnd.randrange(0, blob.stat().st_size - n))
            fh.write(rnd.randbytes(n))
        budget -= n
    (root / f"new-{seed}.txt").write_text(f"added in round {seed}\n")


def image_with_data(tmp_path: Path, fstype: str, name: str = "disk.img", seed: int = 1) -> Path:
    image = tmp_path / name
    make_fs(image, fstype)
    with mounted(image, tmp_path / f"mnt-{name}") as mnt:
        fill(mnt, seed)
    return image


def task(server, sid: str) -> Dict[str, Any]:
    return server.source_migration(sid)["tasks"][0]


def artifacts_by_cycle(server, sid: str) -> Dict[int, Dict[str, Any]]:
    return {a["cycle"]: a for a in server.artifacts(sid)}


def wait_cycle(server, sid: str, n: int, timeout: float = 180) -> Dict[str, Any]:
    def done() -> bool:
        t = task(server, sid)
        if t["status"] == "failed":
            raise AssertionError(f"cycle {n} failed: {t['error']}")
        return n in artifacts_by_cycle(server, sid)

    wait_for(done, timeout, f"artifact of cycle {n}", interval=0.5)
    server.wait_task(sid, "pending", timeout=60)
    return wait_verified(server, sid, n)


def wait_verified(server, sid: str, n: int, timeout: float = 180) -> Dict[str, Any]:
    """The artifact of cycle ``n`` once the server's background verifier has filled in its
    sha256 and check (the acknowledgement of the cycle records it ``pending``)."""
    def verified() -> bool:
        state = artifacts_by_cycle(server, sid)[n]["report"]["state"]
        assert state in ("pending", "verified"), artifacts_by_cycle(server, sid)[n]
        return state == "verified"

    wait_for(verified, timeout, f"verification of the artifact of cycle {n}", interval=0.5)
    return artifacts_by_cycle(server, sid)[n]


def assert_generation_equals(art: Dict[str, Any], image: Path) -> None:
    want = sha256(image)
    assert art["sha256"] == want, f"generation {art['cycle']} recorded sha256 differs from the source"
    assert generation_sha256(art) == want, f"generation {art['cycle']} differs from the source"
    assert art["report"]["check"]["ok"], art["report"]


def mid_pass(server, sid: str) -> bool:
    p = task(server, sid).get("progress") or {}
    disks = p.get("disks") or []
    return bool(disks) and 0 < (disks[0].get("bytes_done") or 0) < (disks[0].get("bytes_total") or 0)


def import_agent(server, agents, name: str):
    server.j("workgroup", "create", f"wg-{name}")
    agent = agents(name).start(code=server.new_code(f"wg-{name}", uses=1))
    return agent, agent.wait_imported()


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_full_incremental_and_final_sync_equal_the_source(server, agents, tmp_path, fstype):
    image = image_with_data(tmp_path, fstype)
    agent, sid = import_agent(server, agents, fstype)
    out = server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(image),
                   "--snapshot", "live", "--keep-images", "5")
    assert len(out["started"]) == 1
    art1 = wait_cycle(server, sid, 1)
    assert art1["disk"] == "disk.img" and art1["report"]["fs"] == fstype
    assert_generation_equals(art1, image)
    gen1 = sha256(Path(art1["path"]))

    with mounted(image, tmp_path / "mnt") as mnt:
        change_some(mnt, seed=2)
    server.j("migration", "sync", "--source", sid)
    art2 = wait_cycle(server, sid, 2)
    assert_generation_equals(art2, image)
    assert sha256(Path(art1["path"])) == gen1, "cycle 2 changed the generation of cycle 1"
    t = task(server, sid)
    assert t["mode"] == "block" and t["disks"] == [{"name": "disk.img", "path": str(image)}]

    # final sync while the filesystem is mounted and in use: live -> fsfreeze for the pass
    with mounted(image, tmp_path / "mnt") as mnt:
        (mnt / "final.txt").write_text("written before the final sync\n")
        subprocess.run(["sync"], check=True)
        server.j("migration", "complete", "--source", sid, "--final-sync")
        server.wait_task(sid, "completed", timeout=180)
        (mnt / "after.txt").write_text("the filesystem is writable again (thawed)\n")
    art3 = wait_verified(server, sid, 3)
    # a frozen ext4 has its journal flushed: clean as it is; a frozen xfs keeps a log to replay,
    # which xfs_repair -n cannot judge: the target checks a copy whose log it replayed
    assert art3["report"]["check"]["ok"], art3["report"]
    if fstype == "xfs":
        assert art3["report"]["check"].get("log") == "replayed on a copy", art3["report"]
    copy = tmp_path / "gen3-copy.img"
    write_generation(art3, copy)
    with mounted(copy, tmp_path / "gen3") as g:
        assert (g / "final.txt").read_text() == "written before the final sync\n"
        assert (g / "new-2.txt").exists() and not (g / "after.txt").exists()
        assert (g / "hardlink.bin").stat().st_ino == (g / "bin" / "blob00.bin").stat().st_ino
    log = (agent.home / "Logs" / "go2cloud_client.log").read_text()
    assert "backend fsfreeze" in log
    wait_for(lambda: not (agent.home / "state" / "snapshots.json").exists(), 30,
             "the agent to purge the snapshot work directories of the finished task")
    assert sha256(Path(art1["path"])) == gen1 and generation_sha256(art2) == art2["sha256"]
    assert "Traceback" not in agent.output()


def test_pause_resume_and_kill_mid_pass_give_the_same_image(server, agents, tmp_path):
    image = image_with_data(tmp_path, "ext4")
    agent, sid = import_agent(server, agents, "interrupt")
    # about 5 MB/s: a pass of ~45 MiB of data takes long enough to interrupt it
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(image),
             "--snapshot", "live", "--bandwidth-mbps", "40", "--compression", "0")
    wait_for(lambda: mid_pass(server, sid), 60, "the full pass to be under way", interval=0.3)
    # the disk's progress says how its data goes (compression 0: off), in JSON and for people
    assert task(server, sid)["progress"]["disks"][0]["compression"] == "off"
    shown = server.cli("migration", "show", "--source", sid, json_out=False).stdout
    assert "(off)" in shown.split("Disks of", 1)[1], shown
    server.j("migration", "pause", "--source", sid)
    server.wait_task(sid, "paused", timeout=30)
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    server.j("migration", "resume", "--source", sid)
    assert_generation_equals(wait_cycle(server, sid, 1), image)

    with mounted(image, tmp_path / "mnt") as mnt:
        change_some(mnt, seed=3, fraction=0.3)
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "40")
    server.j("migration", "sync", "--source", sid)
    wait_for(lambda: mid_pass(server, sid), 60, "the incremental pass to be under way", interval=0.3)
    agent.kill()  # kill -9 mid-pass
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    agent.start()  # same home: resumes the interrupted cycle by itself
    art2 = wait_cycle(server, sid, 2)
    assert_generation_equals(art2, image)
    assert "Traceback" not in agent.output()


def test_bad_disks_are_refused_and_nothing_is_written(server, agents, tmp_path):
    agent, sid = import_agent(server, agents, "bad")
    r = server.cli("migration", "start", "--source", sid, "--mode", "block", check=False)
    assert r.returncode == 2 and "--disk" in r.stderr
    r = server.cli("migration", "start", "--source", sid, "--disk", "/dev/vdb", check=False)
    assert r.returncode == 2 and "--mode block" in r.stderr
    r = server.cli("migration", "start", "--source", sid, "--mode", "block", "--disk", "/x",
                   "--path", "/srv", check=False)
    assert r.returncode == 2 and "--path" in r.stderr
    assert server.source_migration(sid)["tasks"] == []

    for bad, words in ((tmp_path / "missing.img", "not an existing block device or image file"),
                       (tmp_path, "not an existing block device or image file")):
        # --no-drill: the agent's own check of the start command (the drill would stop it first)
        server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(bad), "--no-drill")
        t = server.wait_task(sid, "failed", timeout=60)
        assert t["error"]["code"] == "command_rejected" and words in t["error"]["message"], t["error"]
        assert str(bad) in t["error"]["message"]
        assert server.artifacts(sid) == []
        block_dir = server.data_dir / "tasks" / t["task_id"] / "block"
        assert not block_dir.exists() or not any(block_dir.rglob("gen-*"))
        server.j("migration", "cancel", "--source", sid)
        server.wait_task(sid, "cancelled", timeout=30)
    assert "Traceback" not in agent.output()


@pytest.fixture
def reflink_xfs(tmp_path: Path) -> Iterator[Path]:
    if not shutil.which("mkfs.xfs"):
        pytest.fail("mkfs.xfs is not installed: run ./scripts/setup.sh as root")
    outer = tmp_path / "outer-xfs.img"
    with open(outer, "wb") as fh:
        fh.truncate(600 * MIB)
    run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(outer))
    with mounted(outer, tmp_path / "reflink-fs") as mnt:
        yield mnt


def test_reflink_backend_incremental_and_cancel_releases_snapshots(server, agents, tmp_path, reflink_xfs):
    image = reflink_xfs / "vm-disk.img"
    make_fs(image, "ext4")
    with mounted(image, tmp_path / "mnt") as mnt:
        fill(mnt, seed=5)
    agent, sid = import_agent(server, agents, "reflink")
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(image),
             "--snapshot", "reflink")
    assert_generation_equals(wait_cycle(server, sid, 1), image)

    # the image keeps changing while it is mounted; each cycle reads its reflink clone
    with mounted(image, tmp_path / "mnt") as mnt:
        change_some(mnt, seed=6)
    server.j("migration", "sync", "--source", sid)
    art2 = wait_cycle(server, sid, 2)
    assert_generation_equals(art2, image)

    with mounted(image, tmp_path / "mnt") as mnt:
        change_some(mnt, seed=7, fraction=0.5)
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "20")
    server.j("migration", "sync", "--source", sid)
    wait_for(lambda: mid_pass(server, sid), 60, "the pass to be under way", interval=0.3)
    server.j("migration", "cancel", "--source", sid)
    server.wait_task(sid, "cancelled", timeout=30)

    def released() -> bool:
        listed = agent.home / "state" / "snapshots.json"
        leftovers = [p for p in reflink_xfs.rglob("*") if p.is_file() and p != image]
        workdirs = [p for p in (agent.home / "state" / "snapshots").rglob("*") if p.is_file()]
        return not listed.exists() and not leftovers and not workdirs

    wait_for(released, 60, "the agent to release its snapshots and their bases")
    assert sorted(artifacts_by_cycle(server, sid)) == [1, 2]  # committed generations are kept
    assert generation_sha256(art2) == art2["sha256"]
    assert "Traceback" not in agent.output()
