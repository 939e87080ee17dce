"""``image export --boot-check``: boot an exported disk under qemu and wait for a login prompt.

The disk boots as it is (``-snapshot``: every write goes to a temporary file, so the image is
not changed), without a network, with its first serial port written to a file next to the image
(``<image>.boot-console.log``). The check passes when that console shows ``login:``; it fails
when qemu exits first or the time runs out, with the console's last lines in the message.

What it needs: ``qemu-system-x86_64`` (Debian package qemu-system-x86) on the target host, and an
image whose system uses the serial console (``console=ttyS0`` on the kernel's command line, as
cloud images have: systemd then starts a login prompt there). An image that only uses the
screen fails the check with that explanation. qemu uses software emulation (TCG), minutes on a
small machine, unless ``GO2CLOUD_BOOT_CHECK_ACCEL=kvm`` (where ``/dev/kvm`` really runs guests;
on some virtual machines it opens and then hangs the guest).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from go2cloud_server.errors import ServerError

QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT_S = 900.0
_LOGIN = re.compile(rb"login:")


class BootCheckFailed(ServerError):
    """The exported disk did not boot to a login prompt (the message says what the console showed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="boot_check_failed")


@dataclass
class BootCheck:
    seconds: float
    accel: str
    console: str


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except FileNotFoundError:
        return "(nothing)"
    kept = [ln for ln in text.replace("\r", "").splitlines() if ln.strip()]
    return "\n".join(kept[-lines:]) or "(nothing)"


def boot_check(image: Path, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mib: int = 1024,
               accel: Optional[str] = None) -> BootCheck:
    """Boot ``image`` (raw) and wait for the login prompt on its serial console."""
    from go2cloud_server import proc

    if shutil.which(QEMU, path=proc.child_env()["PATH"]) is None:
        raise BootCheckFailed(f"{QEMU} is not installed on this host (Debian package qemu-system-x86; "
                              "scripts/setup.sh installs it): the boot check cannot run")
    accel = accel or os.environ.get("GO2CLOUD_BOOT_CHECK_ACCEL", "tcg")
    console = image.with_name(image.name + ".boot-console.log")
    console.unlink(missing_ok=True)
    argv = [QEMU, "-accel", accel, "-machine", "pc", "-m", str(memory_mib), "-smp", "2", "-nodefaults",
            "-no-user-config", "-display", "none", "-snapshot", "-no-reboot", "-nic", "none",
            "-drive", f"file={image},format=raw,if=virtio", "-serial", f"file:{console}", "-monitor", "none"]
    started = time.monotonic()
    child = proc.spawn(argv, stdin=proc.DEVNULL, stdout=proc.DEVNULL, stderr=proc.PIPE)
    try:
        while time.monotonic() - started < timeout_s:
            if child.poll() is not None:
                err = (child.stderr.read() if child.stderr else b"").decode("utf-8", "replace").strip()
                raise BootCheckFailed(f"qemu stopped before a login prompt (exit {child.returncode}"
                                      f"{': ' + err[-300:] if err else ''}); the console's last lines:\n"
                                      f"{_tail(console)}")
            try:
                if _LOGIN.search(console.read_bytes()):
                    return BootCheck(round(time.monotonic() - started, 1), accel, str(console))
            except FileNotFoundError:
                pass
            time.sleep(1)
        raise BootCheckFailed(
            f"no login prompt on the serial console within {timeout_s:.0f} s (a system that shows its "
            "login only on the screen needs console=ttyS0 on its kernel command line for this check); "
            f"the console's last lines:\n{_tail(console)}")
    finally:
        proc.kill(child)
        proc.reap(child)
