"""Block generations that share unchanged data, end to end: the real server with its images on a
real ext4 filesystem (no reflink: deltas) or a real XFS with reflink (clones), the real agent, a
block migration of several cycles with changes, retention dropping the older ones, and
``go2cloud_server image export`` of every kept generation equal (sha256) to the source disk as it
was at that cycle. Needs root (loop devices, mount)."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import pytest

from tests.integration.conftest import AgentFactory
from tests.integration.test_e2e_block import (
    artifacts_by_cycle,
    change_some,
    image_with_data,
    import_agent,
    mounted,
    run,
    sha256,
    wait_cycle,
)
from tests.support.harness import Server

pytestmark = [pytest.mark.integration, pytest.mark.root]

MIB = 1 << 20

if os.geteuid() != 0:  # pragma: no cover - CI runs these as root (scripts/setup.sh)
    pytest.skip("block generation tests need root (loop devices, mount)", allow_module_level=True)


@contextmanager
def target_fs(tmp_path: Path, kind: str) -> Iterator[Path]:
    """A filesystem of its own for the server's images: ext4 (no reflink) or XFS with reflink."""
    outer = tmp_path / f"target-{kind}.img"
    with open(outer, "wb") as fh:
        fh.truncate(700 * MIB)
    if kind == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(outer))
    else:
        if not shutil.which("mkfs.xfs"):
            pytest.fail("mkfs.xfs is not installed: run ./scripts/setup.sh as root")
        run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(outer))
    with mounted(outer, tmp_path / f"target-{kind}") as mnt:
        yield mnt


def export(server: Server, sid: str, cycle: int, out: Path) -> Dict:
    return server.j("image", "export", "--source", sid, "--cycle", str(cycle), "--out", str(out), "--force")


@pytest.mark.parametrize("kind", ["ext4", "xfs-reflink"])
def test_kept_generations_export_bit_for_bit_after_retention(tmp_path, kind):
    with target_fs(tmp_path, kind) as images:
        server = Server(tmp_path / "server", extra_args=["--target-dir", str(images)]).start()
        agents = AgentFactory(tmp_path, server)
        try:
            _migrate_and_export(server, agents, tmp_path, images, kind)
        finally:
            agents.close()
            server.stop()


def _migrate_and_export(server: Server, agents: AgentFactory, tmp_path: Path, images: Path,
                        kind: str) -> None:
    disk = image_with_data(tmp_path, "ext4")
    agent, sid = import_agent(server, agents, f"gens-{kind}")
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
             "--snapshot", "live", "--keep-images", "2")
    at: Dict[int, str] = {}
    out = tmp_path / "exported.img"
    for cycle in range(1, 6):
        if cycle > 1:
            with mounted(disk, tmp_path / "mnt") as mnt:
                change_some(mnt, seed=10 + cycle)
            server.j("migration", "sync", "--source", sid)
        at[cycle] = sha256(disk)  # the source is not mounted while the cycle reads it
        art = wait_cycle(server, sid, cycle)
        assert art["sha256"] == at[cycle], f"cycle {cycle}: the verified sha256 is not the source's"
        assert art["report"]["check"]["ok"], art["report"]
        kept = sorted(artifacts_by_cycle(server, sid))
        assert kept == list(range(max(1, cycle - 1), cycle + 1))
        for c in kept:
            res = export(server, sid, c, out)
            assert res["cycle"] == c and res["disk"] == "disk.img" and res["bytes"] == disk.stat().st_size
            assert sha256(out) == at[c], f"generation {c} exported after cycle {cycle} is not the source's"
    arts = artifacts_by_cycle(server, sid)
    task_dir = next(images.glob("tasks/*/block/disk.img"))
    if kind == "ext4":
        # the oldest kept generation became a full image (its base folded into it), the newest is a
        # delta of what changed in its cycle; the artifact rows say so and point at the files
        assert arts[4]["report"]["kind"] == "full" and arts[4]["path"] == str(task_dir / "gen-000004.img")
        assert arts[5]["report"]["kind"] == "delta" and arts[5]["path"] == str(task_dir / "gen-000005.delta")
        assert arts[5]["report"]["image"] is False
        full = (task_dir / "gen-000004.img").stat().st_blocks
        delta = (task_dir / "gen-000005.delta").stat().st_blocks
        assert delta * 3 < full, f"the delta allocates {delta * 512} bytes, the full image {full * 512}"
    else:
        assert all(a["report"]["kind"] == "full" and a["report"]["copy"] == "reflink"
                   for a in arts.values())
    newest = ("img",) if kind != "ext4" else ("delta", "chunks")
    assert sorted(p.name for p in task_dir.iterdir() if p.name.startswith("gen-")) == sorted(
        [f"gen-000004.{e}" for e in ("img", "hashes", "json")]
        + [f"gen-000005.{e}" for e in newest + ("hashes", "json")])

    # the default is the newest cycle; errors are clear and write nothing
    assert export(server, sid, 5, out)["cycle"] == 5 and server.j(
        "image", "export", "--source", sid, "--out", str(tmp_path / "newest.img"))["cycle"] == 5
    assert sha256(tmp_path / "newest.img") == at[5]
    r = server.cli("image", "export", "--source", sid, "--out", str(out), check=False)
    assert r.returncode == 4 and "--force" in r.stderr
    r = server.cli("image", "export", "--source", sid, "--cycle", "2", "--out", str(tmp_path / "x.img"),
                   check=False)
    assert r.returncode == 3 and "committed cycles: 4, 5" in r.stderr
    r = server.cli("image", "export", "--source", sid, "--disk", "vdz", "--out", str(tmp_path / "x.img"),
                   check=False)
    assert r.returncode == 3 and "its disks: disk.img" in r.stderr
    r = server.cli("image", "export", "--source", "s-nope", "--out", str(tmp_path / "x.img"), check=False)
    assert r.returncode == 3 and "unknown" in r.stderr
    r = server.cli("image", "export", "--source", sid, "--format", "qcow2", "--out", str(tmp_path / "x.img"),
                   check=False)
    assert r.returncode == 2 and "raw" in r.stderr
    assert not (tmp_path / "x.img").exists() and not list(tmp_path.glob(".*export-tmp"))
    subprocess.run(["sync"], check=False)
    assert "Traceback" not in agent.output()
