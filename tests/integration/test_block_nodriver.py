"""Block mode on a host where the vendor's snapshot driver cannot be installed (issue 12, item 2).

Nothing is faked: the agent is imported with ``--yes`` and ``snapshot_driver: ask``, so it runs the
real package manager to install the elastio-snap driver; on this machine that fails (the vendor's
package repository is not configured: ``Unable to locate package``), as on most servers. Block
mode must stay available: an image file migrated with ``--snapshot live`` and a loop-mounted ext4
migrated with ``--snapshot fsfreeze`` arrive equal, and ``--snapshot auto`` on a disk with no
point-in-time backend stops at the drill (``drill_abnormal``) naming the explicit alternatives.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest

from tests.integration.test_e2e_block import (
    assert_generation_equals,
    image_with_data,
    make_fs,
    mounted,
    sha256,
    wait_cycle,
)

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


def _vendor_repo_missing() -> bool:
    """True when the package manager cannot find the driver (what this test is about)."""
    if shutil.which("apt-get") is None:
        return False
    r = subprocess.run(["apt-get", "-s", "install", "elastio-snap-dkms"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    return r.returncode != 0 and "Unable to locate package" in r.stderr


def manifest(root: Path) -> Dict[str, Tuple[str, str]]:
    """Every entry under ``root``: kind and sha256 (files), target (links) or mode (dirs)."""
    out: Dict[str, Tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel == "lost+found" or rel.startswith("lost+found/"):
                continue
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", oct(p.stat().st_mode))
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _loop_of(image: Path) -> str:
    r = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True)
    return r.stdout.split(":", 1)[0]


def test_block_mode_without_the_vendor_driver(server, agents, tmp_path, monkeypatch):
    if not _vendor_repo_missing():
        pytest.skip("the elastio-snap package is installable here: this test needs a host without the "
                    "vendor repository (it would install a kernel module)")
    monkeypatch.setenv("GO2CLOUD_SNAPSHOT_DRIVER", "ask")  # the harness skips the step by default
    server.j("workgroup", "create", "wg-nodriver")
    agent = agents("nodriver").start(code=server.new_code("wg-nodriver", uses=1))
    sid = agent.wait_imported(timeout=180)
    out = agent.output()
    assert "Installing the snapshot driver: apt-get -y install" in out
    assert "Snapshot driver not installed: installing it failed" in out and "Unable to locate package" in out
    assert "Block replication stays available" in out
    block = server.show_source(sid)["inventory"]["capabilities"]["block"]
    assert block["available"] is True and block["driver"]["installed"] is False
    assert "repository may not be configured" in block["driver"]["reason"]
    assert block["volumes"], block  # what was found per volume is recorded

    # 1. --snapshot auto on a mounted ext4 (fsfreeze and live usable, nothing point in time): the
    # drill stops the task, naming the explicit alternatives and their cost
    fs_image = tmp_path / "fs.img"
    make_fs(fs_image, "ext4", 64)
    with mounted(fs_image, tmp_path / "mnt") as mnt:
        (mnt / "data").mkdir()
        (mnt / "data" / "a.bin").write_bytes(os.urandom(3 << 20))
        (mnt / "data" / "b.txt").write_text("written before the sync\n" * 1000)
        os.symlink("a.bin", mnt / "data" / "link")
        subprocess.run(["sync"], check=True)
        loop = _loop_of(fs_image)
        server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", loop,
                 "--snapshot", "auto")
        server.wait_task(sid, "drill_abnormal", timeout=120)
        report = server.drill(sid)["report"]
        (item,) = [i for i in report["items"] if i["check"] == "snapshot"]
        assert item["severity"] == "critical", item
        assert "no point-in-time snapshot backend is usable" in item["finding"]
        assert "--snapshot fsfreeze (consistent, but every writer of the filesystem stalls during each " \
               "pass)" in item["fix"]
        assert "--snapshot live (crash-inconsistent during the passes; consistent only for a final sync " \
               "with the services stopped)" in item["fix"]
        assert set(item["data"]["alternatives"]) == {"fsfreeze", "live"}
        # nothing else can start on this source now: migration start exits with its own code
        r = server.cli("migration", "start", "--workgroup", "wg-nodriver", "--mode", "block", "--disk", loop,
                       "--snapshot", "fsfreeze", check=False, json_out=False)
        assert r.returncode == 6, (r.returncode, r.stdout, r.stderr)
        assert "already has migration task" in r.stdout and "no migration started" in r.stderr
        server.j("migration", "cancel", "--source", sid)
        server.wait_task(sid, "cancelled", timeout=60)

        # 2. --snapshot fsfreeze on the mounted ext4 (the loop device): the operator's choice,
        # recorded; the generation holds exactly the files that were there
        server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", loop, "--snapshot",
                 "fsfreeze")
        art = wait_cycle(server, sid, 1)
        t = server.source_migration(sid)["tasks"][0]
        choice = t["history"][0]["snapshot_choice"]
        assert choice["backend"] == "fsfreeze" and "@" in choice["by"] and choice["at"]
        drill = server.drill(sid)["report"]
        assert drill["snapshot_choice"] == choice
        assert any(i["check"] == "snapshot_choice" and choice["by"] in i["finding"] for i in drill["items"])
        want = manifest(mnt)
        (mnt / "after.txt").write_text("written after the snapshot: thawed\n")
    assert art["report"]["check"]["ok"], art["report"]
    copy = tmp_path / "gen-fsfreeze.img"
    shutil.copyfile(art["path"], copy)
    assert sha256(copy) == art["sha256"]
    with mounted(copy, tmp_path / "gen", "ro", "noload") as g:
        assert manifest(g) == want and not (g / "after.txt").exists()
    server.j("migration", "complete", "--source", sid)
    server.wait_task(sid, "completed", timeout=60)

    # 3. --snapshot live on an image file: bit for bit
    image = image_with_data(tmp_path, "ext4", name="disk.img", seed=5)
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(image),
             "--snapshot", "live")
    art = wait_cycle(server, sid, 1)
    assert_generation_equals(art, image)
    assert server.source_migration(sid)["tasks"][0]["history"][0]["snapshot_choice"]["backend"] == "live"
    shown = server.cli("migration", "show", "--source", sid, json_out=False).stdout
    assert "chosen explicitly by" in shown
    server.j("migration", "complete", "--source", sid)
    server.wait_task(sid, "completed", timeout=60)
    assert "Traceback" not in agent.output()
