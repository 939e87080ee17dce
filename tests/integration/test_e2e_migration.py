"""A whole file-level migration through the real server, real agent and real rsync daemon.

The source is the nasty tree of tests/support/tree.py (hard links, symlinks incl. dangling,
sparse files, xattrs, ACLs, empty dirs, odd modes and owners, names with spaces, newlines, a
leading '-', non-UTF-8 bytes). After every cycle the artifact must equal the source by a full
manifest, and older artifacts must stay exactly as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from go2cloud_server.manifest import build, diff
from tests.support import tree
from tests.support.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.shared_server]  # one server for the module

EXCLUDED = (b"cache", b"--remove-source-files", b"--max-size=1")


def _excluded(rel: bytes, is_dir: bool) -> bool:
    """What must be missing on the target, written out independently of the agent's matcher: the
    operator's lines above plus the shipped defaults the tree exercises (/tmp/*, /var/tmp/*,
    /swapfile)."""
    if rel.split(b"/")[0] in EXCLUDED or rel == b"swapfile":
        return True
    return rel.startswith(b"tmp/") or rel.startswith(b"var/tmp/")


def _image(artifact: dict, src: Path) -> Path:
    return Path(artifact["path"]) / str(src).lstrip("/")


def test_full_incremental_final_sync_equal_the_source(server, agents, tmp_path):
    src = tree.build(tmp_path / "source tree")
    # things the operator excludes, one of them named like rsync options
    for name in EXCLUDED:
        d = Path(os.fsdecode(os.path.join(os.fsencode(src), name)))
        d.mkdir()
        (d / "junk.bin").write_bytes(os.urandom(4096))

    server.j("workgroup", "create", "wg-e2e")
    code = server.new_code("wg-e2e", uses=1)
    agent = agents("e2e")
    # the operator's exclusion lines go into the agent home before the migration starts
    agent.start(code=code)
    sid = agent.wait_imported()
    excludes = agent.home / "Excludes" / "rsync_excludes_linux.txt"
    wait_for(excludes.exists, 10, "default exclusions installed in the home")
    with open(excludes, "a") as fh:
        fh.write("\n# operator lines\n/cache/\n--remove-source-files\n/--max-size=1\n")

    m_src0 = build(src)
    result = server.j("migration", "start", "--workgroup", "wg-e2e", "--path", str(src), "--keep-images", "5")
    assert [s["source_id"] for s in result["started"]] == [sid]
    server.wait_task(sid, "pending", timeout=120)
    arts = server.artifacts(sid)
    assert [a["cycle"] for a in arts] == [1]
    image1 = _image(arts[0], src)
    assert diff(m_src0, build(src)) == [], "the migration changed the source"
    m_src1 = build(src, exclude=_excluded)
    assert diff(m_src1, build(image1)) == []
    for name in EXCLUDED + (b"swapfile", b"tmp/scratch"):
        assert not os.path.lexists(os.path.join(os.fsencode(image1), name))
    assert (image1 / "tmp").is_dir(), "/tmp/* excludes the contents, not the directory"

    tree.change_everything(src)
    server.j("migration", "sync", "--source", sid)
    wait_for(lambda: len(server.artifacts(sid)) == 2, 120, "the second artifact")
    server.wait_task(sid, "pending", timeout=60)
    image2 = _image(server.artifacts(sid)[-1], src)
    assert diff(build(src, exclude=_excluded), build(image2)) == []
    assert diff(m_src1, build(image1)) == [], "cycle 2 changed the image of cycle 1"

    m_src2 = build(src, exclude=_excluded)
    (src / "after-cycle-2.txt").write_text("final change\n")
    tree.change_content(src)
    server.j("migration", "complete", "--source", sid, "--final-sync")
    server.wait_task(sid, "completed", timeout=120)
    arts = server.artifacts(sid)
    assert [a["cycle"] for a in arts] == [1, 2, 3]
    assert diff(build(src, exclude=_excluded), build(_image(arts[-1], src))) == []
    assert diff(m_src2, build(image2)) == []
    assert diff(m_src1, build(image1)) == []

    # after completion no more syncs
    r = server.cli("migration", "sync", "--source", sid, check=False)
    assert r.returncode != 0 or "completed" in r.stdout
    assert len(server.artifacts(sid)) == 3
    assert "Traceback" not in agent.output()


def test_retention_keeps_the_newest_images(server, agents, tmp_path):
    src = tmp_path / "small"
    src.mkdir()
    (src / "a.txt").write_text("v0\n")
    server.j("workgroup", "create", "wg-keep")
    agent = agents("keep").start(code=server.new_code("wg-keep", uses=1))
    sid = agent.wait_imported()
    server.j("migration", "start", "--source", sid, "--path", str(src), "--keep-images", "2")
    server.wait_task(sid, "pending", timeout=60)
    for i in range(1, 4):
        (src / "a.txt").write_text(f"v{i}\n")
        server.j("migration", "sync", "--source", sid)
        wait_for(lambda i=i: max(a["cycle"] for a in server.artifacts(sid)) == i + 1, 60, f"cycle {i + 1}")
        server.wait_task(sid, "pending", timeout=60)
    arts = server.artifacts(sid)
    assert [a["cycle"] for a in arts] == [3, 4]
    assert (_image(arts[-1], src) / "a.txt").read_text() == "v3\n"
    assert (_image(arts[0], src) / "a.txt").read_text() == "v2\n"
    tree_root = Path(arts[0]["path"]).parent
    assert not (tree_root / "000001").exists() and not (tree_root / "000002").exists()
