"""A live Linux source, end to end (issue 14, item 2): a Debian 12 VM under qemu migrates itself.

Nothing is simulated on the source side: the VM (tests/support/vm.py) boots its own kernel from
its own disk, the agent is installed inside it by the Linux one-liner exactly as ``code create``
printed it (downloaded from the reference server's ``/download/``, installed as a systemd
service, imported), and the operator drives everything with the operator CLI. The VM and the
server have addresses only in the network namespace this test creates.

Steps: a file-level migration of the VM's local mount points with the default excludes; a change
and a second marker, synced while the VM is rebooted in the middle of the cycle (systemd brings
the agent back and the cycle completes); a final sync after a service in the VM is stopped; then
``image export`` builds a bootable disk from the final cycle, which boots under qemu to a login
prompt and holds the markers (checked by mounting it after the boot). Each committed image is
compared with the VM's own files (sha256 of every marker and of files written in the VM).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.support import vm
from tests.support.harness import Server, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.root]

TARBALL = "go2cloud_client_linux_x86_64.tar.gz"
WG = "wg-live-vm"
#: a small service in the VM whose files must be quiet for the final sync
DEMO_UNIT = """[Unit]
Description=go2cloud test service that writes a counter

[Service]
ExecStart=/bin/sh -c 'i=0; while :; do i=$((i+1)); echo $i > /var/lib/g2c-demo/counter; sleep 1; done'

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def image() -> Path:
    why = vm.available()
    if why:
        pytest.fail(f"the VM tests cannot run here: {why}")
    return vm.ensure_image()


@pytest.fixture(scope="module")
def packages(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packages")
    for name in os.listdir(dist):
        shutil.copy2(dist / name, out / name)
    assert (out / TARBALL).is_file() and (out / "SHA256SUMS").is_file()
    return out


@pytest.fixture
def net() -> Iterator[vm.VmNet]:
    with vm.VmNet("e2e") as n:
        yield n


@pytest.fixture
def server(tmp_path: Path, net: vm.VmNet, packages: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server", listen=f"{vm.HOST_IP}:0", argv_prefix=net.prefix(),
                 extra_args=["--packages", str(packages)]).start()
    yield srv
    srv.stop()


@pytest.fixture
def machine(tmp_path: Path, net: vm.VmNet, image: Path) -> Iterator[vm.Vm]:
    box = vm.Vm(net, tmp_path, image)
    box.start()
    try:
        box.wait_login(900)
        box.wait_ssh(300)
        yield box
    finally:
        box.kill()


def _vm_sha256(box: vm.Vm, paths: List[str]) -> Dict[str, str]:
    out = box.ssh("sha256sum " + " ".join(paths)).stdout
    return {line.split(None, 1)[1].strip(): line.split(None, 1)[0] for line in out.splitlines()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _newest_image(server: Server, sid: str) -> Path:
    return Path(server.artifacts(sid)[-1]["path"])


def test_live_vm_migrates_itself_through_a_reboot(server: Server, machine: vm.Vm) -> None:
    server.j("workgroup", "create", WG)
    code = server.new_code(WG, uses=2)
    oneliner = code["commands"]["linux"]

    # the one-liner, exactly as printed, pasted into a root shell of the VM (no terminal: no
    # questions); the code must never be in a process's arguments, so it goes in on stdin
    run = machine.ssh("bash -s", input=oneliner + "\n", timeout=900)
    out = run.stdout + run.stderr
    assert "Import Source Server [" in out, out
    sid = out.split("Import Source Server [", 1)[1].split("] Successfully!", 1)[0]
    assert machine.ssh("systemctl is-enabled go2cloud_client.service").stdout.strip() == "enabled"
    assert machine.ssh("systemctl is-active go2cloud_client.service").stdout.strip() == "active"
    argv_all = machine.ssh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '", check=False).stdout
    assert "go2cloud_client" in argv_all and code["token_code"] not in argv_all
    wait_for(lambda: server.show_source(sid)["status"] == "online", 120, "the VM's agent online")

    # data written in the VM, and a service that keeps writing until it is stopped
    machine.ssh("mkdir -p /srv/app /var/lib/g2c-demo && head -c 3000000 /dev/urandom > /srv/app/blob.bin"
                " && echo marker-one > /root/marker1.txt && cp -a /usr/share/doc/sudo /srv/app/doc")
    machine.ssh(f"cat > /etc/systemd/system/g2c-demo.service <<'EOF'\n{DEMO_UNIT}EOF\n"
                "systemctl daemon-reload && systemctl enable --now g2c-demo.service")

    # 1. the full pass: the VM's local mount points, the default excludes
    server.j("migration", "start", "--source", sid)
    server.wait_task(sid, "pending", timeout=1200)
    first = _newest_image(server, sid)
    files = ["/root/marker1.txt", "/srv/app/blob.bin", "/etc/fstab", "/usr/bin/sudo"]
    want = _vm_sha256(machine, files)
    for f in files:
        assert _sha256(first / f.lstrip("/")) == want[f], f
    proc_dir = first / "proc"
    assert not proc_dir.exists() or not any(proc_dir.iterdir()), "/proc was copied: excludes not applied"

    # 2. a change, then a sync with the VM rebooted in the middle of the cycle
    machine.ssh("echo marker-two > /root/marker2.txt && head -c 20000000 /dev/urandom > /srv/app/big.bin")
    want2 = _vm_sha256(machine, ["/root/marker2.txt", "/srv/app/big.bin"])
    server.j("migration", "sync", "--source", sid)
    wait_for(lambda: server.task_status(sid) == "syncing", 300, "the second cycle syncing")
    machine.ssh("systemctl reboot", check=False, timeout=60)
    machine.wait_login(900)
    machine.wait_ssh(300)
    wait_for(lambda: len(server.artifacts(sid)) >= 2 and server.task_status(sid) == "pending", 1200,
             "the cycle interrupted by the reboot to complete")
    assert machine.ssh("systemctl is-active go2cloud_client.service").stdout.strip() == "active"
    second = _newest_image(server, sid)
    assert second != first
    for f, digest in want2.items():
        assert _sha256(second / f.lstrip("/")) == digest, f

    # 3. the final sync after the application is stopped: its last state is in the image
    machine.ssh("systemctl stop g2c-demo.service")
    counter = machine.ssh("cat /var/lib/g2c-demo/counter").stdout
    server.j("migration", "complete", "--source", sid, "--final-sync")
    server.wait_task(sid, "completed", timeout=900)
    final = _newest_image(server, sid)
    assert final not in (first, second)
    assert (final / "var/lib/g2c-demo/counter").read_text() == counter
    assert (final / "root/marker1.txt").read_text() == "marker-one\n"

    # 4. the migrated system as a machine: image export builds a bootable disk from the final
    # cycle's tree and the VM's inventory; it boots to a login prompt and holds the markers
    machine.kill()
    out = server.data_dir.parent / "vm.img"
    built = server.j("image", "export", "--source", sid, "--out", str(out), "--boot-check", timeout=1500)
    assert built["kind"] == "converted" and built["disk"] == "vda"
    console = Path(built["boot_check"]["console"]).read_text(errors="replace")
    assert built["boot_check"]["login_after_s"] > 0 and "g2c-vm login:" in console
    report = json.loads(out.with_name(out.name + ".conversion.json").read_text())
    assert any(c["kind"] == "network" for c in report["changes"]), report
    start = report["disk"]["partitions"][0]["start_bytes"]
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(start),
                           str(out)],
                          check=True, capture_output=True, text=True).stdout.strip()
    mnt = out.parent / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True)
        try:
            for f, digest in want2.items():
                assert _sha256(mnt / f.lstrip("/")) == digest, f
            assert (mnt / "var/lib/g2c-demo/counter").read_text() == counter
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_a_disk_built_from_the_vm_tree_boots_to_a_login_prompt(tmp_path: Path, image: Path) -> None:
    """The bootable-disk builder (go2cloud_server.imagebuild) on the VM image's root file system,
    as a file-level image holds it: the boot check of ``image export`` (go2cloud_server.bootcheck)
    sees it boot under qemu to the serial login prompt."""
    from go2cloud_server.bootcheck import boot_check
    from go2cloud_server.imagebuild import build, plan
    from tests.integration.test_imagebuild import vm_inventory

    meta = json.loads((image / "meta.json").read_text())
    root = tmp_path / "root"
    root.mkdir()
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset",
                           str(meta["part_start_mib"] << 20), str(image / "disk.img")],
                          check=True, capture_output=True, text=True).stdout.strip()
    built = tmp_path / "built"
    built.mkdir()
    try:
        subprocess.run(["mount", "-o", "ro", loop, str(root)], check=True)
        try:
            build(root, plan(vm_inventory(image), root), built / "disk.img")
        finally:
            subprocess.run(["umount", str(root)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    checked = boot_check(built / "disk.img", timeout_s=900)
    assert "g2c-vm login:" in Path(checked.console).read_text(errors="replace")
