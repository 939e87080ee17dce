"""A bootable disk image built from a file-level image (issue 14): the tree of a committed cycle
laid out again as the source's disk, from the source's inventory.

What it does, in order (each step is listed in the conversion report, :class:`Report`):

1. **Layout** (:func:`plan`): the disk that held the source's ``/``, with its partition table
   type (``dos`` or ``gpt``) and the partitions that held a migrated file system, at the source's
   numbers and starts. A partition whose data in the tree needs more room than it had is grown
   (and the ones after it move), never shrunk; the disk grows with it.
2. **File systems**: made with the source's types, UUIDs and labels (ext2/3/4, xfs, vfat, swap),
   so that the source's own ``/etc/fstab`` holds.
3. **Data**: the tree copied with rsync and every attribute (owners, modes, ACLs, xattrs, hard
   links, sparse files, device nodes: ``-aHAXS --numeric-ids``), each partition mounted where
   the source had it.
4. **Boot fixes**: the boot-time mount points (/dev, /proc, /sys, /run, /tmp) made where the
   tree has none (a file-level migration's excludes); fstab entries that name a disk by its
   kernel name or an id that the new machine will not have are rewritten to ``UUID=``; the
   network configuration of ifupdown is reset to DHCP on the first interface; udev's persistent
   network names are removed.
5. **Boot loader** for the source's boot mode: BIOS with extlinux/syslinux (the source's
   ``extlinux.conf`` kept, the loader installed into the new file system and syslinux's MBR code
   written). Sources that boot with GRUB or UEFI are refused with a clear message for now.

Everything runs on the target host, as root, on loop devices of the output file; the output is
written to a temporary name and renamed when complete. The tools it needs (sfdisk, mkfs.*,
rsync, extlinux and syslinux's MBR code) are named in the error when one is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from go2cloud_server.errors import Conflict, InvalidInput, ServerError

MIB = 1 << 20
#: a partition is grown when its data needs more than its size less this share (metadata,
#: journals, room to boot and log); it then gets this share plus GROW_MIN_FREE beyond its data
GROW_MARGIN = 0.20
GROW_MIN_FREE = 64 * MIB
MBR_CODE = {"dos": Path("/usr/lib/syslinux/mbr/mbr.bin"), "gpt": Path("/usr/lib/syslinux/mbr/gptmbr.bin")}
_MKFS = {"ext2": "mkfs.ext2", "ext3": "mkfs.ext3", "ext4": "mkfs.ext4", "xfs": "mkfs.xfs",
         "vfat": "mkfs.vfat", "swap": "mkswap"}


class BuildError(ServerError):
    """The disk could not be built (the message says why and what to do)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="image_build_failed")


@dataclass
class PartPlan:
    number: int
    start_bytes: int
    size_bytes: int
    fs_type: str
    fs_uuid: Optional[str]
    fs_label: Optional[str]
    part_type: Optional[str]
    mountpoint: Optional[str]
    grown_from: Optional[int] = None


@dataclass
class DiskPlan:
    name: str
    table: str
    size_bytes: int
    boot_mode: str
    parts: List[PartPlan]


@dataclass
class Report:
    """The conversion report: what was built and every change made to the copy of the source."""

    disk: Dict[str, Any] = field(default_factory=dict)
    changes: List[Dict[str, str]] = field(default_factory=list)

    def change(self, kind: str, path: str, detail: str) -> None:
        self.changes.append({"kind": kind, "path": path, "detail": detail})

    def as_dict(self) -> Dict[str, Any]:
        return {"disk": self.disk, "changes": list(self.changes)}

    def text(self) -> str:
        d = self.disk
        lines = [f"Disk {d.get('name')}: {d.get('table')} partition table, {d.get('size_bytes')} bytes, "
                 f"boot {d.get('boot_mode')} ({d.get('loader')})"]
        for p in d.get("partitions", []):
            grown = f", grown from {p['grown_from']} bytes" if p.get("grown_from") else ""
            lines.append(f"  partition {p['number']}: {p['fs_type']} UUID {p.get('fs_uuid') or '-'} label "
                         f"{p.get('fs_label') or '-'} at {p['start_bytes']}, {p['size_bytes']} bytes, "
                         f"mounted at {p.get('mountpoint') or '-'}{grown}")
        lines.append("Changes to the copy of the source:" if self.changes else "No changes to the copy.")
        lines += [f"  {c['kind']}: {c['path']}: {c['detail']}" for c in self.changes]
        return "\n".join(lines) + "\n"


# -- the layout ------------------------------------------------------------------------------------
def _disk_of(inventory: Mapping[str, Any], device: str) -> Optional[Mapping[str, Any]]:
    name = os.path.basename(device)
    for disk in inventory.get("disks") or []:
        if disk.get("name") == name or any(p.get("name") == name for p in disk.get("partitions") or []):
            return disk
    return None


def tree_bytes(path: Path) -> int:
    """Bytes the files under ``path`` occupy (allocated blocks), on this file system only."""
    total = 0
    dev = path.lstat().st_dev
    stack = [path]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False) and st.st_dev == dev:
                    stack.append(Path(entry.path))
    return total


def plan(inventory: Mapping[str, Any], tree: Path) -> DiskPlan:
    """The disk to build for the source whose ``inventory`` this is, from the tree of one of its
    cycles (see the module docstring). InvalidInput when the inventory cannot say it."""
    mounts = [m for m in inventory.get("mounts") or [] if m.get("mountpoint")]
    root = next((m for m in mounts if m["mountpoint"] == "/"), None)
    if root is None:
        raise InvalidInput("the source's inventory has no mount for '/': a bootable disk needs the root "
                           "file system's device (an agent older than this server? import it again)")
    disk = _disk_of(inventory, root["device"])
    if disk is None:
        raise InvalidInput(f"the source's root file system is on {root['device']}, which is not one of the "
                           "disks in its inventory (a logical volume or RAID: not supported yet)")
    table = disk.get("table")
    if table not in ("dos", "gpt"):
        raise InvalidInput(f"disk {disk.get('name')} of the source has no partition table the inventory "
                           "knows (dos or gpt); its agent may predate the layout facts: upgrade and "
                           "import it again")
    by_part = {os.path.basename(m["device"]): m for m in mounts}
    parts: List[PartPlan] = []
    for p in sorted(disk.get("partitions") or [], key=lambda q: int(q.get("start_bytes") or 0)):
        mount = by_part.get(p.get("name"))
        fs_type = p.get("fs_type") or (mount or {}).get("fstype")
        if mount is None and fs_type != "swap":
            continue  # neither mounted nor swap: nothing of it is in the tree
        if fs_type not in _MKFS:
            raise InvalidInput(f"partition {p.get('name')} of the source holds {fs_type!r}: not supported "
                               f"for a bootable disk yet (supported: {', '.join(sorted(_MKFS))})")
        if "number" not in p or "start_bytes" not in p:
            raise InvalidInput(f"the inventory does not give the number and start of partition "
                               f"{p.get('name')}: upgrade the agent and import the source again")
        parts.append(PartPlan(number=int(p["number"]), start_bytes=int(p["start_bytes"]),
                              size_bytes=int(p["size_bytes"]), fs_type=fs_type, fs_uuid=p.get("fs_uuid"),
                              fs_label=p.get("fs_label"), part_type=p.get("part_type"),
                              mountpoint=(mount or {}).get("mountpoint")))
    if not any(p.mountpoint == "/" for p in parts):
        raise InvalidInput("the source's root file system is not on a partition of its disk (a file system "
                           "on the whole disk is not supported yet)")
    nested = sorted((p.mountpoint for p in parts if p.mountpoint and p.mountpoint != "/"), key=len)
    shift = 0
    for p in parts:
        p.start_bytes += shift
        if p.mountpoint is None:
            continue
        here = tree / p.mountpoint.lstrip("/")
        data = tree_bytes(here) if here.is_dir() else 0
        if p.mountpoint == "/":  # the nested mounts' data goes to their own partitions
            subs = [tree / n.lstrip("/") for n in nested]
            data -= sum(tree_bytes(sub) for sub in subs if sub.is_dir())
        if data * (1 + GROW_MARGIN) > p.size_bytes:  # the data fits only without headroom, or not
            grown = -(-(int(data * (1 + GROW_MARGIN)) + GROW_MIN_FREE) // MIB) * MIB
            p.grown_from, shift = p.size_bytes, shift + grown - p.size_bytes
            p.size_bytes = grown
    end = max(p.start_bytes + p.size_bytes for p in parts)
    size = max(int(disk["size_bytes"]) + shift, end + (MIB if table == "gpt" else 0))
    return DiskPlan(name=str(disk["name"]), table=table, size_bytes=-(-size // MIB) * MIB,
                    boot_mode=str(inventory.get("boot_mode") or "bios"), parts=parts)


# -- building -------------------------------------------------------------------------------------
def _run(argv: Sequence[str], what: str, input: Optional[str] = None, timeout: float = 3600) -> str:
    from go2cloud_server import proc

    tool = argv[0]
    if shutil.which(tool, path=proc.child_env()["PATH"]) is None:
        raise BuildError(f"{tool} is not installed on this host: it is needed to {what} "
                         "(scripts/setup.sh installs it; docs/operator-guide.md lists the tools)")
    try:
        rc, out = proc.run(list(argv), timeout=timeout, input=input.encode() if input is not None else None)
    except proc.TimeoutExpired:
        raise BuildError(f"cannot {what}: {tool} did not finish within {timeout:.0f} s") from None
    text = out.decode("utf-8", "replace")
    if rc != 0:
        raise BuildError(f"cannot {what}: {' '.join(argv)} exited {rc}: {text.strip()[-500:]}")
    return text


def _quiet(argv: Sequence[str]) -> None:
    """A clean-up step whose failure changes nothing (the error being reported is the first)."""
    from go2cloud_server import proc

    try:
        proc.run(list(argv), timeout=120)
    except (OSError, proc.TimeoutExpired):
        pass


def _sfdisk_script(p: DiskPlan, boot_part: int) -> str:
    lines = [f"label: {p.table}"]
    for part in p.parts:
        typ = part.part_type or ""
        if p.table == "dos":
            typ = typ[2:] if typ.startswith("0x") else (typ or ("82" if part.fs_type == "swap" else "83"))
        entry = f"{part.number} : start={part.start_bytes // 512}, size={part.size_bytes // 512}"
        if typ:
            entry += f", type={typ}"
        if p.table == "dos" and part.number == boot_part:
            entry += ", bootable"
        lines.append(entry)
    return "\n".join(lines) + "\n"


def _mkfs(part: PartPlan, dev: str) -> None:
    t = part.fs_type
    argv: List[str] = [_MKFS[t]]
    if t.startswith("ext"):
        argv += ["-q", "-F"] + (["-U", part.fs_uuid] if part.fs_uuid else []) + (["-L", part.fs_label]
                                                                                   if part.fs_label else [])
    elif t == "xfs":
        argv += ["-q", "-f"] + (["-m", f"uuid={part.fs_uuid}"] if part.fs_uuid else []) + \
            (["-L", part.fs_label] if part.fs_label else [])
    elif t == "vfat":
        argv += (["-i", part.fs_uuid.replace("-", "")] if part.fs_uuid else []) + \
            (["-n", part.fs_label] if part.fs_label else [])
    elif t == "swap":
        argv += (["-U", part.fs_uuid] if part.fs_uuid else []) + \
            (["-L", part.fs_label] if part.fs_label else [])
    _run(argv + [dev], f"make the {t} file system of partition {part.number}")


_FSTAB_DEV = re.compile(
    r"^(/dev/(?:[sv]d[a-z]+|xvd[a-z]+|nvme\d+n\d+p?|hd[a-z]+)(\d+)|/dev/disk/by-(?:id|path)/\S+)$")


def fix_fstab(root: Path, plan_: DiskPlan, report: Report) -> None:
    """Entries naming a partition by kernel name or by id/path (which the new machine will not
    have) are rewritten to ``UUID=`` of the partition mounted at the same place."""
    path = root / "etc/fstab"
    try:
        text = path.read_text()
    except FileNotFoundError:
        report.change("fstab", "/etc/fstab", "missing in the image: nothing rewritten")
        return
    by_mount = {p.mountpoint: p for p in plan_.parts if p.mountpoint}
    swaps = [p for p in plan_.parts if p.fs_type == "swap"]
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not line.lstrip().startswith("#") and _FSTAB_DEV.match(fields[0]):
            target = by_mount.get(fields[1]) or (swaps[0] if fields[2:3] == ["swap"] and swaps else None)
            if target is not None and target.fs_uuid:
                report.change("fstab", "/etc/fstab", f"{fields[0]} -> UUID={target.fs_uuid} ({fields[1]})")
                line = line.replace(fields[0], f"UUID={target.fs_uuid}", 1)
        out.append(line)
    new = "\n".join(out) + ("\n" if text.endswith("\n") else "")
    if new != text:
        path.write_text(new)


def reset_network(root: Path, report: Report) -> None:
    """ifupdown's configuration reset to DHCP on the first interface (the new machine's addresses
    are not the source's); udev's persistent names of the old NICs removed."""
    interfaces = root / "etc/network/interfaces"
    if interfaces.is_file():
        old = interfaces.read_text()
        static = [ln.split()[1] for ln in old.splitlines() if ln.split()[:1] == ["iface"]
                  and len(ln.split()) >= 4 and ln.split()[1] != "lo" and ln.split()[3] != "dhcp"]
        if static:
            keep = ("# written by go2cloud image export: the source's addresses are in "
                    "interfaces.go2cloud-orig\n")
            (interfaces.parent / "interfaces.go2cloud-orig").write_text(old)
            first = static[0]
            interfaces.write_text(keep + "auto lo\niface lo inet loopback\n\n"
                                  f"allow-hotplug {first}\niface {first} inet dhcp\n"
                                  "source-directory /etc/network/interfaces.d\n")
            report.change("network", "/etc/network/interfaces",
                          f"{', '.join(static)} static -> {first} DHCP (the old file kept as "
                          "interfaces.go2cloud-orig)")
    rules = root / "etc/udev/rules.d/70-persistent-net.rules"
    if rules.is_file():
        rules.unlink()
        report.change("machine state", "/" + str(rules.relative_to(root)), "removed (the old NICs' names)")


#: directories the system mounts its own file systems on at boot: a file-level migration's default
#: excludes leave some out (their contents are the running system's, not data)
MOUNT_POINTS = (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777))


def ensure_mount_points(root: Path, report: Report) -> None:
    """The boot-time mount points the tree lacks, made with their usual modes."""
    for name, mode in MOUNT_POINTS:
        path = root / name
        if not path.exists() and not path.is_symlink():
            path.mkdir()
            os.chmod(path, mode)
            report.change("mount point", f"/{name}", f"created (mode {mode:o}): the tree had none")


def _extlinux_dir(root: Path) -> Optional[Path]:
    for rel in ("boot/extlinux/extlinux.conf", "boot/syslinux/syslinux.cfg", "boot/extlinux.conf",
                "extlinux.conf"):
        if (root / rel).is_file():
            return (root / rel).parent
    return None


def build(tree: Path, plan_: DiskPlan, out: Path, force: bool = False) -> Report:
    """Build ``out`` (a sparse raw disk image) from ``tree`` as ``plan_`` says; the report."""
    if os.geteuid() != 0:
        raise BuildError("building a bootable disk needs root (loop devices, mkfs, mount)")
    if plan_.boot_mode != "bios":
        raise BuildError(f"the source boots in {plan_.boot_mode} mode: only BIOS sources with extlinux are "
                         "converted in this version")
    loader_dir = _extlinux_dir(tree)
    if loader_dir is None:
        raise BuildError("the source boots with a loader this version cannot install (GRUB?): only extlinux/"
                         "syslinux sources are converted yet; export the block image instead")
    if out.exists() and not force:
        raise Conflict(f"{out} exists: give --force to replace it, or another --out")
    report = Report()
    boot_mount = "/boot" if any(p.mountpoint == "/boot" for p in plan_.parts) else "/"
    boot_part = next(p.number for p in plan_.parts if p.mountpoint == boot_mount)
    tmp = out.with_name(f".{out.name}.building")
    work = Path(tempfile.mkdtemp(prefix="go2cloud-imagebuild-"))
    loops: Dict[int, str] = {}
    mounted: List[Path] = []
    try:
        with open(tmp, "wb") as f:
            f.truncate(plan_.size_bytes)
        _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(tmp)], "write the partition table",
             input=_sfdisk_script(plan_, boot_part))
        for part in plan_.parts:
            loops[part.number] = _run(["losetup", "--find", "--show", "--offset", str(part.start_bytes),
                                       "--sizelimit", str(part.size_bytes), str(tmp)],
                                      f"attach partition {part.number}").strip()
            _mkfs(part, loops[part.number])
        mnt = work / "root"
        for part in sorted((p for p in plan_.parts if p.mountpoint), key=lambda q: len(q.mountpoint or "")):
            where = mnt / (part.mountpoint or "/").lstrip("/")
            where.mkdir(parents=True, exist_ok=True)
            _run(["mount", loops[part.number], str(where)], f"mount partition {part.number}")
            mounted.append(where)
        _run(["rsync", "-aHAXS", "--numeric-ids", f"{tree}/", f"{mnt}/"], "copy the tree into the disk")
        ensure_mount_points(mnt, report)
        fix_fstab(mnt, plan_, report)
        reset_network(mnt, report)
        loader = _extlinux_dir(mnt)
        assert loader is not None
        _run(["extlinux", "--install", str(loader)], "install extlinux")
        report.change("boot loader", "/" + str(loader.relative_to(mnt)), "extlinux installed (ldlinux.sys), "
                      "the source's configuration kept")
        for where in reversed(mounted):
            _run(["umount", str(where)], f"unmount {where}")
        mounted.clear()
        for dev in loops.values():
            _run(["losetup", "-d", dev], "detach a loop device")
        loops.clear()
        code = MBR_CODE[plan_.table]
        if not code.is_file():
            raise BuildError(f"{code} is missing (Debian package syslinux-common)")
        with open(code, "rb") as src, open(tmp, "r+b") as dst:
            dst.write(src.read(440))
        report.change("boot loader", "MBR", f"syslinux's {code.name} written (boot code only, the partition "
                      "table kept)")
        os.replace(tmp, out)
    finally:
        for where in reversed(mounted):
            _quiet(["umount", "-l", str(where)])
        for dev in loops.values():
            _quiet(["losetup", "-d", dev])
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    report.disk = {"name": plan_.name, "table": plan_.table, "size_bytes": plan_.size_bytes,
                   "boot_mode": plan_.boot_mode, "loader": "extlinux", "boot_partition": boot_part,
                   "partitions": [asdict(p) for p in plan_.parts]}
    return report


def write_report(report: Report, out: Path) -> List[Path]:
    """The report next to the image: ``<out>.conversion.json`` and ``.txt``."""
    js = out.with_name(out.name + ".conversion.json")
    txt = out.with_name(out.name + ".conversion.txt")
    js.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    txt.write_text(report.text())
    return [js, txt]
