"""Each drill check against files and conditions prepared here (no process, no network unless a
test says so). Conditions that need root (a full filesystem, a noexec mount, a skewed server)
are in tests/integration/test_drill.py."""

from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click.testing
import pytest

from go2cloud_client.drill import checks, initramfs
from go2cloud_client.drill.checks import Context, Target
from go2cloud_client.drill.model import CRITICAL, INFO, WARNING, Item, Report, format_report
from go2cloud_client.drill.runner import parse_host_port, run_drill


def ctx(tmp_path: Path, **kw) -> Context:
    """A context that looks only at tmp_path unless told otherwise."""
    base = dict(home=tmp_path, tmp_dir=str(tmp_path), fstab=tmp_path / "fstab", boot_dir=tmp_path / "boot",
                modules_dir=tmp_path / "modules", selinux_dir=tmp_path / "selinux",
                apparmor_file=tmp_path / "apparmor", env={}, process_names=lambda: [],
                snapshot_probe=lambda volume: {"live": (True, "live: reads in place")},
                os_release={"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian 12"},
                kernel="6.1.0-18-amd64", arch="x86_64", boot_mode="bios", os_name="linux", is_root=True)
    base.update(kw)
    return Context(**base)  # type: ignore[arg-type]


def sev(items: List[Item]) -> List[str]:
    return [i.severity for i in items]


# -- os -----------------------------------------------------------------------------------------


def test_os_supported_unknown_distro_old_kernel_and_arch(tmp_path):
    assert sev(checks.check_os(ctx(tmp_path))) == [INFO]
    unknown = checks.check_os(ctx(tmp_path, os_release={"ID": "plan9", "PRETTY_NAME": "Plan 9"}))
    assert sev(unknown) == [WARNING] and "Plan 9" in unknown[0].finding
    assert sev(checks.check_os(ctx(tmp_path, kernel="3.2.0-4-amd64"))) == [WARNING]
    old = checks.check_os(ctx(tmp_path, kernel="2.6.18-419.el5"))
    assert sev(old) == [CRITICAL] and "2.6.18" in old[0].finding
    assert sev(checks.check_os(ctx(tmp_path, arch="ppc64le"))) == [CRITICAL]


def test_privileges(tmp_path):
    assert sev(checks.check_privileges(ctx(tmp_path))) == [INFO]
    assert sev(checks.check_privileges(ctx(tmp_path, is_root=False))) == [WARNING]


def test_sources_missing_path_and_disk(tmp_path):
    (tmp_path / "srv").mkdir()
    assert sev(checks.check_sources(ctx(tmp_path, paths=[str(tmp_path / "srv")]))) == [INFO]
    missing = checks.check_sources(ctx(tmp_path, paths=[str(tmp_path / "srv"), "/nonexistent/data"]))
    assert sev(missing) == [CRITICAL] and "/nonexistent/data" in missing[0].finding
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    assert sev(checks.check_sources(ctx(tmp_path, mode="block", disks=[str(image)]))) == [INFO]
    bad = checks.check_sources(ctx(tmp_path, mode="block", disks=[str(image), "/dev/nope"]))
    assert sev(bad) == [CRITICAL] and "/dev/nope" in bad[0].finding


# -- rsync --------------------------------------------------------------------------------------


def _fake_rsync(tmp_path: Path, version: str) -> str:
    exe = tmp_path / f"rsync-{version}"
    exe.write_text(f"#!/bin/sh\necho 'rsync  version {version}  protocol version 31'\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.allow_subprocess
@pytest.mark.parametrize("version, expected", [("3.0.9", CRITICAL), ("3.1.3", WARNING), ("3.2.7", INFO)])
def test_rsync_version(tmp_path, version, expected):
    items = checks.check_rsync(ctx(tmp_path, rsync_path=_fake_rsync(tmp_path, version)))
    assert sev(items) == [expected] and version in items[0].finding


def test_rsync_missing_and_block_mode(tmp_path, monkeypatch):
    from go2cloud_client.replication import rsync

    monkeypatch.setattr(rsync, "find_rsync", lambda: None)
    missing = checks.check_rsync(ctx(tmp_path))
    assert sev(missing) == [CRITICAL] and "apt-get -y install rsync" in missing[0].fix
    assert sev(checks.check_rsync(ctx(tmp_path, mode="block"))) == [INFO]


# -- SELinux / AppArmor --------------------------------------------------------------------------


def test_selinux_enforcing_permissive_absent_and_apparmor(tmp_path):
    assert [i.finding for i in checks.check_security_modules(ctx(tmp_path))] == ["SELinux is not active"]
    (tmp_path / "selinux").mkdir()
    (tmp_path / "selinux" / "enforce").write_text("1")
    (tmp_path / "apparmor").write_text("Y\n")
    items = checks.check_security_modules(ctx(tmp_path))
    assert sev(items) == [WARNING, INFO]
    assert "enforcing" in items[0].finding and "AppArmor" in items[1].finding
    (tmp_path / "selinux" / "enforce").write_text("0")
    assert sev(checks.check_security_modules(ctx(tmp_path))) == [INFO, INFO]


# -- free space ---------------------------------------------------------------------------------


class _Statvfs:
    def __init__(self, blocks: int, bfree: int, bavail: int, files: int, ffree: int) -> None:
        self.f_blocks, self.f_bfree, self.f_bavail = blocks, bfree, bavail
        self.f_files, self.f_ffree, self.f_favail = files, ffree, ffree
        self.f_frsize = 4096
        self.f_flag = 0


@pytest.mark.parametrize("stat, expected", [
    (_Statvfs(1000, 500, 450, 1000, 900), [INFO]),
    (_Statvfs(1000, 50, 50, 1000, 900), [WARNING]),       # 95% used
    (_Statvfs(1000, 5, 5, 1000, 900), [CRITICAL]),        # 99.5% used
    (_Statvfs(1000, 500, 500, 1000, 5), [CRITICAL]),      # inodes 99.5% used
    (_Statvfs(1000, 50, 0, 1000, 900), [CRITICAL]),       # only the reserved blocks left: full
])
def test_free_space_thresholds(tmp_path, monkeypatch, stat, expected):
    monkeypatch.setattr(checks.os, "statvfs", lambda path: stat)
    items = checks.check_free_space(ctx(tmp_path, paths=[str(tmp_path)]))
    assert sev(items) == expected
    assert str(tmp_path) in items[0].finding


def test_free_space_real_filesystem_names_each_path_once(tmp_path):
    items = checks.check_free_space(ctx(tmp_path, paths=[str(tmp_path), str(tmp_path / "missing")]))
    # both paths are reported; the home and tmp dir are on the same filesystem: not repeated
    assert [i.data["path"] for i in items] == [str(tmp_path), str(tmp_path / "missing")]
    assert all(0 <= i.data["used_pct"] <= 100 for i in items)


# -- control plane, clock, targets ---------------------------------------------------------------


def test_control_plane_and_clock_thresholds(tmp_path):
    now = 1_800_000_000.0

    def at(offset: float) -> Context:
        return ctx(tmp_path, server_url="https://cp.example:8443", server_time=lambda: now - offset,
                   clock=lambda: now)

    assert sev(checks.check_clock(at(2))) == [INFO]
    assert sev(checks.check_clock(at(-120))) == [WARNING]
    skewed = at(600)
    items = checks.check_clock(skewed)
    assert sev(items) == [CRITICAL] and "600 s ahead of" in items[0].finding
    assert items[0].data["skew_s"] == 600
    assert sev(checks.check_control_plane(skewed)) == [INFO]

    def down() -> float:
        raise ConnectionRefusedError("connection refused")

    broken = ctx(tmp_path, server_url="https://cp.example:8443", server_time=down)
    assert sev(checks.check_control_plane(broken)) == [CRITICAL]
    assert sev(checks.check_clock(broken)) == [INFO]
    none = ctx(tmp_path)
    assert sev(checks.check_control_plane(none)) == [INFO] and sev(checks.check_clock(none)) == [INFO]


@pytest.mark.allow_network
def test_target_ports_open_and_closed(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        items = checks.check_targets(ctx(tmp_path, targets=[
            Target("rsync target", "127.0.0.1", listener.getsockname()[1]),
            Target("block receiver", "127.0.0.1", closed.getsockname()[1]),
        ]))
    finally:
        listener.close()
        closed.close()
    assert sev(items) == [INFO, CRITICAL]
    assert f"127.0.0.1:{items[1].data['port']}" in items[1].finding and "firewall" in items[1].fix
    assert sev(checks.check_targets(ctx(tmp_path))) == [INFO]


# -- proxy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("no_proxy, bypassed", [
    ("", False), ("cp.example", True), (".example", True), ("example", True), ("other.org,*", True),
    ("10.0.0.0/8", False), ("xample", False),
])
def test_no_proxy_matching(no_proxy, bypassed):
    assert checks.bypasses_proxy("cp.example", no_proxy) is bypassed


@pytest.mark.allow_network
def test_proxy_items(tmp_path):
    """No proxy: one info. A proxy that does not answer: critical, naming it (never its password).
    A listening proxy: reachable, and per host whether it goes through it or is in no_proxy."""
    assert sev(checks.check_proxy(ctx(tmp_path, server_url="https://10.1.2.3:8443"))) == [INFO]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    env = {"HTTPS_PROXY": f"http://u:secret@127.0.0.1:{port}", "NO_PROXY": "10.0.0.0/8"}
    items = checks.check_proxy(ctx(tmp_path, env=env, server_url="https://10.1.2.3:8443"))
    assert sev(items) == [CRITICAL] and f"http://127.0.0.1:{port}" in items[0].finding
    assert "secret" not in items[0].finding and "the proxy runs" in items[0].fix
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        env = {"https_proxy": f"http://127.0.0.1:{port}", "no_proxy": "10.0.0.0/8"}
        items = checks.check_proxy(ctx(tmp_path, env=env, server_url="https://10.1.2.3:8443",
                                       targets=[Target("rsync target", "192.168.1.9", 8443)]))
    assert sev(items) == [INFO, INFO, INFO]
    assert "is reachable" in items[0].finding
    assert "10.1.2.3 is reached directly" in items[1].finding
    assert "192.168.1.9 is reached through the proxy" in items[2].finding


# -- tmp, boot, fstab ------------------------------------------------------------------------------


def test_tmp_noexec_flag(tmp_path, monkeypatch):
    assert sev(checks.check_tmp(ctx(tmp_path))) == [INFO]
    real = os.statvfs

    class NoExec:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return getattr(self._st, name)

        f_flag = os.ST_NOEXEC

    monkeypatch.setattr(checks.os, "statvfs", lambda p: NoExec(real(p)))
    items = checks.check_tmp(ctx(tmp_path))
    assert sev(items) == [WARNING] and "noexec" in items[0].finding and "remount,exec" in items[0].fix


def test_boot_loader_found_or_not(tmp_path):
    boot = tmp_path / "boot"
    assert sev(checks.check_boot(ctx(tmp_path))) == [WARNING]
    (boot / "grub").mkdir(parents=True)
    (boot / "grub" / "grub.cfg").write_text("menuentry")
    items = checks.check_boot(ctx(tmp_path))
    assert sev(items) == [INFO] and "grub.cfg" in items[0].finding
    assert sev(checks.check_boot(ctx(tmp_path, boot_mode="uefi"))) == [INFO]  # grub.cfg counts
    (boot / "grub" / "grub.cfg").unlink()
    assert sev(checks.check_boot(ctx(tmp_path, boot_mode="uefi"))) == [WARNING]
    (boot / "efi" / "EFI" / "debian").mkdir(parents=True)
    (boot / "efi" / "EFI" / "debian" / "shimx64.efi").write_bytes(b"MZ")
    items = checks.check_boot(ctx(tmp_path, boot_mode="uefi"))
    assert sev(items) == [INFO] and "shimx64.efi" in items[0].finding


def test_fstab_device_names_are_named_with_their_lines(tmp_path):
    fstab = tmp_path / "fstab"
    assert sev(checks.check_fstab(ctx(tmp_path))) == [INFO]  # no fstab at all
    fstab.write_text(
        "# /etc/fstab\n"
        "UUID=0a1b2c3d-0000-4000-8000-000000000001 / ext4 defaults 0 1\n"
        "/dev/sda1 /boot ext4 defaults 0 2\n"
        "LABEL=data /data xfs defaults 0 0\n"
        "/dev/mapper/vg-home /home ext4 defaults 0 2\n"
        "/dev/disk/by-uuid/0a1b /srv ext4 defaults 0 2\n"
        "/dev/vdb /var/lib/mysql xfs defaults 0 0\n"
        "  # /dev/sdc1 /old ext4 defaults 0 0\n"
        "/dev/nvme0n1p3 none swap sw 0 0\n"
        "tmpfs /tmp tmpfs defaults 0 0\n"
    )
    items = checks.check_fstab(ctx(tmp_path))
    assert sev(items) == [WARNING]
    assert items[0].data["lines"] == [3, 7, 9]
    assert items[0].data["devices"] == ["/dev/sda1", "/dev/vdb", "/dev/nvme0n1p3"]
    assert "line 3: /dev/sda1 on /boot" in items[0].finding and "blkid /dev/sda1" in items[0].fix
    fstab.write_text("UUID=x / ext4 defaults 0 1\n")
    assert sev(checks.check_fstab(ctx(tmp_path))) == [INFO]


# -- virtio ---------------------------------------------------------------------------------------


def _newc(names: List[str]) -> bytes:
    """A cpio newc archive holding empty regular files ``names`` (and the trailer)."""
    out = b""
    for i, name in enumerate(names + ["TRAILER!!!"]):
        raw = name.encode() + b"\0"
        fields = [i + 1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(raw), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + raw
        out += b"\0" * ((4 - len(out) % 4) % 4)
    return out


def test_initramfs_reader_microcode_plus_gzip_tail():
    early = _newc(["kernel/x86/microcode/GenuineIntel.bin"])
    main = _newc(["usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko.xz", "init"])
    data = early + b"\0" * 512 + gzip.compress(main)
    assert initramfs.list_names(data) == [
        "kernel/x86/microcode/GenuineIntel.bin",
        "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko.xz",
        "init",
    ]
    with pytest.raises(initramfs.InitramfsUnreadable):
        initramfs.list_names(b"LZ4 data here")


def test_virtio_builtin_initramfs_and_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(initramfs, "list_with_tool", lambda path: None)  # use the reader
    kernel = "6.1.0-18-amd64"
    c = ctx(tmp_path, kernel=kernel)
    unknown = checks.check_virtio(c)
    assert sev(unknown) == [INFO] and "cannot tell" in unknown[0].finding
    mods = tmp_path / "modules" / kernel
    mods.mkdir(parents=True)
    (mods / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / f"initrd.img-{kernel}").write_bytes(gzip.compress(_newc([
        f"usr/lib/modules/{kernel}/kernel/drivers/scsi/virtio_scsi.ko.zst"])))
    items = checks.check_virtio(c)
    assert sev(items) == [WARNING] and items[0].data["missing"] == ["virtio_net"]
    assert "update-initramfs" in items[0].fix
    (mods / "modules.builtin").write_text(
        "kernel/drivers/block/virtio_blk.ko\nkernel/drivers/net/virtio_net.ko\n")
    assert sev(checks.check_virtio(c)) == [INFO]
    (boot / f"initrd.img-{kernel}").write_bytes(b"\x04\x22\x4d\x18 lz4 legacy")
    (mods / "modules.builtin").write_text("")
    broken = checks.check_virtio(c)
    assert sev(broken) == [INFO] and "cannot be read" in broken[0].finding


# -- live data, snapshot ------------------------------------------------------------------------


def test_databases_and_containers(tmp_path):
    procs = ctx(tmp_path, process_names=lambda: ["bash", "mysqld", "dockerd", "sshd"])
    items = checks.check_live_data(procs)
    assert sev(items) == [WARNING] and "Docker, MySQL" in items[0].finding and "final sync" in items[0].fix
    procs.mode = "block"
    assert sev(checks.check_live_data(procs)) == [INFO]
    assert sev(checks.check_live_data(ctx(tmp_path))) == [INFO]


def _probe(results: Dict[str, Tuple[bool, str]]):
    return lambda volume: results


def test_snapshot_driver(tmp_path):
    only_live = _probe({"live": (True, "live ok"), "lvm": (False, "no LVM")})
    block = dict(mode="block", disks=["/dev/vdb"])
    assert sev(checks.check_snapshot(ctx(tmp_path, snapshot_probe=only_live))) == [INFO]
    none = _probe({"live": (False, "live: /dev/vdb is not readable"), "lvm": (False, "no LVM")})
    items = checks.check_snapshot(ctx(tmp_path, snapshot_probe=none, **block))
    assert sev(items) == [CRITICAL] and "no LVM" in items[0].finding and "file mode" in items[0].fix
    assert sev(checks.check_snapshot(ctx(tmp_path, snapshot_probe=none))) == [WARNING]
    missing = ctx(tmp_path, snapshot_probe=lambda volume: None, **block)
    assert sev(checks.check_snapshot(missing)) == [CRITICAL]
    named = ctx(tmp_path, snapshot_probe=only_live, snapshot="lvm", **block)
    assert sev(checks.check_snapshot(named)) == [CRITICAL]
    good = _probe({"live": (True, "ok"), "reflink": (True, "reflink ok")})
    assert sev(checks.check_snapshot(ctx(tmp_path, snapshot_probe=good, **block))) == [INFO]


def test_auto_without_a_point_in_time_backend_is_critical_naming_the_alternatives(tmp_path):
    """auto never falls back to fsfreeze or live by itself: the drill stops the task and names
    the explicit choices with their cost."""
    block = dict(mode="block", disks=["/dev/vdb"])
    frozen = _probe({"live": (True, "ok"), "fsfreeze": (True, "can freeze /"), "lvm": (False, "no LVM"),
                     "reflink": (False, "reflink: ext4 cannot clone")})
    for snapshot in (None, "auto"):
        items = checks.check_snapshot(ctx(tmp_path, snapshot_probe=frozen, snapshot=snapshot, **block))
        assert sev(items) == [CRITICAL], items
        assert "no point-in-time snapshot backend" in items[0].finding and "no LVM" in items[0].finding
        fix = items[0].fix
        assert "--snapshot fsfreeze (consistent, but every writer of the filesystem stalls during each " \
               "pass)" in fix
        assert "--snapshot live (crash-inconsistent during the passes; consistent only for a final sync " \
               "with the services stopped)" in fix
        assert items[0].data["alternatives"].keys() == {"fsfreeze", "live"}
    only_live = _probe({"live": (True, "live ok"), "lvm": (False, "no LVM")})
    items = checks.check_snapshot(ctx(tmp_path, snapshot_probe=only_live, **block))
    assert sev(items) == [CRITICAL] and items[0].data["alternatives"].keys() == {"live"}


def test_explicit_non_point_in_time_choice_is_an_informed_info_item(tmp_path):
    block = dict(mode="block", disks=["/dev/vdb"])
    frozen = _probe({"live": (True, "ok"), "fsfreeze": (True, "can freeze /"), "lvm": (False, "no LVM")})
    for backend in ("fsfreeze", "live"):
        items = checks.check_snapshot(ctx(tmp_path, snapshot_probe=frozen, snapshot=backend, **block))
        assert sev(items) == [INFO]
        assert "chosen explicitly by the operator" in items[0].finding
        assert items[0].data["explicit"] is True and items[0].data["backend"] == backend


# -- runner, report, CLI -------------------------------------------------------------------------


def test_runner_turns_a_broken_check_into_a_warning(tmp_path):
    def broken(c: Context) -> List[Item]:
        raise RuntimeError("boom")

    report = run_drill(ctx(tmp_path), checks=[("broken", broken), ("privileges", checks.check_privileges)])
    doc = report.to_dict()
    assert doc["passed"] is True and doc["summary"] == {"critical": 0, "warning": 1, "info": 1}
    assert "boom" in doc["items"][0]["finding"] and doc["items"][0]["check"] == "broken"
    json.dumps(doc)  # plain JSON


def test_format_report_groups_by_severity_with_fixes():
    report = Report("file", [Item("a", INFO, "fine"), Item("b", CRITICAL, "full", "free space"),
                             Item("c", WARNING, "meh", "look")]).to_dict()
    text = format_report(report)
    assert text.splitlines()[0] == "Drill abnormal: 1 critical, 1 warning, 1 info"
    assert text.index("Critical (1):") < text.index("Warning (1):") < text.index("Info (1):")
    assert "      fix: free space" in text


@pytest.mark.parametrize("value, expected", [("127.0.0.1:873", ("127.0.0.1", 873)),
                                             ("[::1]:8443", ("::1", 8443)), ("host", None), ("h:0", None)])
def test_parse_host_port(value: str, expected: Optional[Tuple[str, int]]):
    if expected is None:
        with pytest.raises(ValueError):
            parse_host_port(value)
    else:
        assert parse_host_port(value) == expected


def test_check_command_exit_codes(tmp_path, monkeypatch):
    from go2cloud_client import cli
    from go2cloud_client.drill import command

    def fake_run(c: Context) -> Report:
        assert c.mode == "file" and list(c.paths) == ["/srv"] and c.server_url is None
        return Report("file", [Item("sources", CRITICAL, "path /srv is missing", "fix it")])

    monkeypatch.setattr(command, "run_drill", fake_run)
    assert cli.run(["--home", str(tmp_path / "h"), "check", "--path", "/srv", "--json"]) == 35
    assert cli.run(["--home", str(tmp_path / "h"), "check", "--mode", "block"]) == 2
    runner = click.testing.CliRunner()
    monkeypatch.setattr(command, "run_drill", lambda c: Report("file", [Item("os", INFO, "fine")]))
    out = runner.invoke(cli.cli, ["check", "--home", str(tmp_path / "h"), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["passed"] is True
