"""Host inventory sent at import (docs/protocol.md, Import): identity of the machine, OS, CPU,
memory, disks and partitions, mounts with usage, NICs. OS-specific reading is in
:mod:`go2cloud_client.platform`; this module only assembles it."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Dict, List, Optional

import psutil

from go2cloud_client import platform
from go2cloud_client.home import Home

LOG = logging.getLogger(__name__)

#: Pseudo file systems that are not data worth listing as mounts.
_PSEUDO_FS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup", "cgroup2", "securityfs", "pstore",
    "debugfs", "tracefs", "configfs", "mqueue", "hugetlbfs", "fusectl", "bpf", "autofs", "overlay",
    "squashfs", "nsfs", "binfmt_misc", "efivarfs", "rpc_pipefs", "ramfs",
})


def machine_id(home: Home) -> str:
    """The OS machine id, or an id generated once and kept in the home."""
    found = platform.read_machine_id()
    if found:
        return found
    saved = home.read_text(home.machine_id_file)
    if saved and saved.strip():
        return saved.strip()
    generated = uuid.uuid4().hex
    home.write_bytes(home.machine_id_file, (generated + "\n").encode())
    LOG.info("this host has no machine id; generated %s", generated)
    return generated


def os_info() -> Dict[str, Any]:
    release = platform.os_release()
    return {
        "family": platform.NAME,
        "id": release.get("ID", "unknown"),
        "version_id": release.get("VERSION_ID", ""),
        "pretty_name": release.get("PRETTY_NAME", release.get("NAME", "")),
    }


def mounts() -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    seen = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _PSEUDO_FS or part.mountpoint in seen:
            continue
        seen.add(part.mountpoint)
        try:
            usage = psutil.disk_usage(part.mountpoint)
            size, used = int(usage.total), int(usage.used)
        except OSError:
            size = used = 0
        out.append({"mountpoint": part.mountpoint, "device": part.device, "fstype": part.fstype,
                    "size_bytes": size, "used_bytes": used})
    return out


def disks(mount_list: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by_device = {os.path.basename(m["device"]): m for m in mount_list}
    out = []
    for disk in platform.block_devices():
        parts = []
        for part in disk.get("partitions", []):
            mount = by_device.get(part["name"], {})
            parts.append({**part, "fstype": mount.get("fstype") or part.get("fs_type"),
                          "mountpoint": mount.get("mountpoint")})
        entry = {k: v for k, v in disk.items() if k != "partitions"}
        entry["partitions"] = parts
        whole = by_device.get(disk["name"])
        if whole:  # a file system directly on the disk
            entry["fstype"] = whole["fstype"]
            entry["mountpoint"] = whole["mountpoint"]
        out.append(entry)
    return out


def nics() -> List[Dict[str, Any]]:
    out = []
    link_families = {getattr(psutil, "AF_LINK", None), getattr(socket, "AF_PACKET", None)} - {None}
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name == "lo":
            continue
        mac = None
        addresses = []
        for addr in addrs:
            if addr.family in link_families:
                mac = addr.address
            elif addr.family in (socket.AF_INET, socket.AF_INET6):
                prefix = _prefix_len(addr.netmask)
                ip = addr.address.split("%")[0]
                addresses.append(f"{ip}/{prefix}" if prefix is not None else ip)
        out.append({"name": name, "mac": mac, "addresses": addresses})
    return out


def _prefix_len(netmask: Any) -> Any:
    if not netmask:
        return None
    import ipaddress

    try:
        if ":" in netmask:
            return bin(int(ipaddress.IPv6Address(netmask))).count("1")
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return None


def collect(home: Home, capabilities: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The inventory document for the import request. ``capabilities`` comes from host
    preparation (:mod:`go2cloud_client.host.prep`): ``{"block": {"available": bool, "reason":
    str or None, "backends": [names]}}``; without it the key is left out (the control plane then
    treats block mode as available, as for older agents)."""
    mount_list = mounts()
    doc: Dict[str, Any] = {
        "hostname": socket.gethostname(),
        "machine_id": machine_id(home),
        "agent_home": str(home.root),
        "os": os_info(),
        "kernel": platform.kernel(),
        "arch": platform.arch(),
        "boot_mode": platform.boot_mode(),
        "cpus": psutil.cpu_count(logical=True) or 1,
        "memory_bytes": int(psutil.virtual_memory().total),
        "disks": disks(mount_list),
        "mounts": mount_list,
        "nics": nics(),
    }
    if capabilities:
        doc["capabilities"] = capabilities
    return doc
