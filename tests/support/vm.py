"""A live Debian 12 virtual machine for the end-to-end tests (issue 14), under qemu.

The disk image is built once with ``debootstrap`` from the Debian mirror this machine's apt uses
(:mod:`tests.support.debian_rootfs`), and cached under ``/var/cache/go2cloud-tests/`` with the SSH
key that logs into it; a test boots a copy-on-write overlay of it, so the cached image never
changes. The image is what a small cloud server has: one MBR disk, one ext4 root partition
mounted by UUID, extlinux as the BIOS boot loader, Debian's cloud kernel (as cloud servers run)
and an initramfs with the virtio drivers, systemd, a serial console on ttyS0, openssh-server,
sudo, curl and rsync (the VM has no way to a package mirror, so the agent's host preparation
finds rsync already there).

The network is a namespace the test creates (:class:`VmNet`): a tap device for the VM and
nothing else. The VM is ``10.77.0.2``, the namespace's end of the tap ``10.77.0.1``; the
reference server runs inside the namespace on that address, and so do the operator commands and
the SSH client that drives the VM. Nothing in the namespace reaches any other network.

qemu uses software emulation (TCG) unless ``GO2CLOUD_VM_ACCEL=kvm`` (see :func:`accelerator`);
under TCG on two cores a boot to the login prompt takes a minute or more, so the waits are
generous.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Optional

from tests.support import debian_rootfs

SUITE = "bookworm"
PACKAGES = ("linux-image-cloud-amd64", "systemd-sysv", "udev", "ifupdown", "iproute2", "curl",
            "ca-certificates", "sudo", "rsync", "procps", "kmod", "e2fsprogs", "openssh-server",
            "util-linux")
#: bump when the recipe changes, so an old cached image is not reused
RECIPE = 2
DISK_MIB = 3072
PART_START_MIB = 1
VM_IP = "10.77.0.2"
HOST_IP = "10.77.0.1"
PREFIX = 24
ROOT_LABEL = "g2c-root"
MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")


def available() -> Optional[str]:
    """None when the VM tests can run here, else why not (CI installs everything and is root)."""
    if os.geteuid() != 0:
        return "needs root (loop devices, network namespaces, tap devices)"
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "extlinux", "sfdisk", "ssh", "ip"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (scripts/setup.sh installs the VM tools)"
    if not MBR.is_file():
        return f"{MBR} is missing (Debian package syslinux-common)"
    return None


def image_dir() -> Path:
    return debian_rootfs.cache_dir() / f"debian-{SUITE}-vm-r{RECIPE}"


def _run(argv: List[str], timeout: float = 600, input: Optional[str] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc


def _configure(root: Path, root_uuid: str, pubkey: str) -> None:
    """What the image needs beyond debootstrap: identity, mounts, network, boot, login."""
    (root / "etc/hostname").write_text("g2c-vm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 g2c-vm\n")
    (root / "etc/fstab").write_text(f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\n\n"
        f"auto eth0\niface eth0 inet static\n    address {VM_IP}/{PREFIX}\n    gateway {HOST_IP}\n")
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey)
    os.chmod(ssh / "authorized_keys", 0o600)
    # the host keys debootstrap made are per image: fine for a test VM (the client ignores them)
    (root / "etc/ssh/sshd_config.d/go2cloud-test.conf").write_text(
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError("the image has no kernel or initramfs in /boot")
    ext = root / "boot/extlinux"
    ext.mkdir(exist_ok=True)
    (ext / "extlinux.conf").write_text(
        "DEFAULT debian\nTIMEOUT 1\nPROMPT 0\n\nLABEL debian\n"
        f"    LINUX /boot/{kernels[-1].name}\n    INITRD /boot/{initrds[-1].name}\n"
        f"    APPEND root=UUID={root_uuid} ro console=ttyS0,115200 net.ifnames=0 quiet\n")
    # what debootstrap leaves behind and a small server would not carry (the downloaded packages
    # and the package lists: 240 MiB the migration would copy for nothing)
    _run(["chroot", str(root), "apt-get", "clean"])
    for lists in (root / "var/lib/apt/lists").glob("*_*"):
        lists.unlink()
    # no password for root (login with the key only); the serial getty still shows "login:"
    _run(["chroot", str(root), "passwd", "-l", "root"])
    _run(["chroot", str(root), "systemctl", "enable", "ssh"])


def _build(out_dir: Path) -> None:
    mirror = debian_rootfs.debian_mirror()
    if mirror is None:
        raise RuntimeError("no Debian mirror in /etc/apt/sources.list{,.d}: cannot run debootstrap")
    work = Path(tempfile.mkdtemp(prefix="go2cloud-vm-", dir=str(out_dir.parent)))
    loop = ""
    mnt = work / "mnt"
    try:
        root = work / "root"
        debian_rootfs.debootstrap(SUITE, PACKAGES, root, mirror)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "go2cloud-test-vm",
              "-f", str(work / "id_ed25519")])
        root_uuid = str(uuid.uuid4())
        _configure(root, root_uuid, (work / "id_ed25519.pub").read_text())
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_MIB << 20)
        _run(["sfdisk", "--quiet", str(disk)],
             input=f"label: dos\nstart={PART_START_MIB}MiB, type=83, bootable\n")
        part_bytes = (DISK_MIB - PART_START_MIB) << 20
        loop = _run(["losetup", "--find", "--show", "--offset", str(PART_START_MIB << 20),
                     "--sizelimit", str(part_bytes), str(disk)]).stdout.strip()
        _run(["mkfs.ext4", "-q", "-U", root_uuid, "-L", ROOT_LABEL, loop])
        mnt.mkdir()
        _run(["mount", loop, str(mnt)])
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(work / "root.tar"), "."])
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(mnt), "-xpf", str(work / "root.tar")])
        _run(["extlinux", "--install", str(mnt / "boot/extlinux")])
        _run(["umount", str(mnt)])
        _run(["losetup", "-d", loop])
        loop = ""
        with open(MBR, "rb") as src, open(disk, "r+b") as dst:
            dst.write(src.read(440))
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("disk.img", "id_ed25519", "id_ed25519.pub"):
            os.replace(work / name, tmp / name)
        (tmp / "meta.json").write_text(json.dumps({"suite": SUITE, "recipe": RECIPE, "root_uuid": root_uuid,
                                                   "part_start_mib": PART_START_MIB}) + "\n")
        os.replace(tmp, out_dir)
    finally:
        if mnt.is_dir():
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def ensure_image() -> Path:
    """The cached image directory (``disk.img``, ``id_ed25519``, ``meta.json``), built if missing."""
    out = image_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock-vm", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "meta.json").is_file():
            _build(out)
    return out


class VmNet:
    """A network namespace holding only a tap device: the VM's end and the namespace's end."""

    def __init__(self, tag: str) -> None:
        self.ns = f"g2cvm-{tag}-{os.getpid()}"[:32]
        self.tap = "g2ctap0"

    def __enter__(self) -> VmNet:
        _run(["ip", "netns", "add", self.ns])
        try:
            self.exec_run(["ip", "link", "set", "lo", "up"])
            self.exec_run(["ip", "tuntap", "add", "dev", self.tap, "mode", "tap"])
            self.exec_run(["ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", self.tap])
            self.exec_run(["ip", "link", "set", self.tap, "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefix(self) -> List[str]:
        return ["ip", "netns", "exec", self.ns]

    def exec_run(self, argv: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(self.prefix() + argv, timeout=timeout)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


def accelerator() -> str:
    """``GO2CLOUD_VM_ACCEL`` (kvm or tcg), else tcg: on this project's machines ``/dev/kvm`` exists
    and qemu opens it, but a guest under KVM never gets past the BIOS (it hangs without output),
    so KVM is used only when asked for."""
    return os.environ.get("GO2CLOUD_VM_ACCEL", "tcg")


class Vm:
    """One boot of an overlay of the cached image in ``net``; ``console`` collects the serial log."""

    def __init__(self, net: VmNet, workdir: Path, image: Path, memory_mib: int = 1024) -> None:
        self.net = net
        self.workdir = workdir
        self.image = image
        self.memory_mib = memory_mib
        self.overlay = workdir / "vm-overlay.qcow2"
        self.console = workdir / "vm-console.log"
        self.key = workdir / "vm_id_ed25519"
        self.proc: Optional[subprocess.Popen] = None
        self.boots = 0

    def start(self, accel: Optional[str] = None) -> Vm:
        if not self.overlay.exists():
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image / "disk.img"),
                  str(self.overlay)])
            shutil.copy2(self.image / "id_ed25519", self.key)
            os.chmod(self.key, 0o600)
        accel = accel or accelerator()
        self.proc = subprocess.Popen(
            self.net.prefix() + [
                "qemu-system-x86_64", "-accel", accel, "-machine", "pc", "-m", str(self.memory_mib),
                "-smp", "2", "-nodefaults", "-display", "none", "-no-user-config",
                "-drive", f"file={self.overlay},format=qcow2,if=virtio,cache=unsafe",
                "-netdev", f"tap,id=n0,ifname={self.net.tap},script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02",
                "-serial", f"file:{self.console}", "-monitor", "none"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.boots += 1
        return self

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_login(self, timeout: float = 600) -> float:
        """Seconds until the serial console shows a login prompt (after this boot's start)."""
        start = time.monotonic()
        seen = self.console_text().count("login:")
        while time.monotonic() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise AssertionError(f"qemu exited {self.proc.returncode}: {out[-2000:]}\n"
                                     f"console:\n{self.console_text()[-3000:]}")
            if self.console_text().count("login:") > seen:
                return time.monotonic() - start
            time.sleep(1)
        raise AssertionError(f"no login prompt within {timeout:.0f} s; console:\n"
                             f"{self.console_text()[-3000:]}")

    def ssh_argv(self, command: str) -> List[str]:
        return self.net.prefix() + [
            "ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-o", "BatchMode=yes",
            f"root@{VM_IP}", command]

    def ssh(self, command: str, timeout: float = 300, check: bool = True,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run ``command`` as root in the VM; ``input`` is its standard input (e.g. ``bash -s`` with
        a line as an operator pastes it into a shell: the line is in no process's arguments)."""
        proc = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the VM: {command!r} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def wait_ssh(self, timeout: float = 300) -> None:
        start = time.monotonic()
        last = ""
        while time.monotonic() - start < timeout:
            proc = self.ssh("true", timeout=30, check=False)
            if proc.returncode == 0:
                return
            last = proc.stderr
            time.sleep(2)
        raise AssertionError(f"no SSH into the VM within {timeout:.0f} s: {last}")

    def stop(self, timeout: float = 120) -> None:
        """Power off cleanly (systemd stops the services), or kill qemu after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.ssh("systemctl poweroff", timeout=30, check=False)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
