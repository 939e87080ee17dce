"""Typed commands from the control plane and their parameter validation.

The control plane decides *what* runs; this module makes sure a command's parameters are what
docs/protocol.md allows before anything acts on them (typed values, ranges, enums, absolute
normalised existing paths, well-formed targets). A violation raises
:class:`~go2cloud_client.errors.CommandRejectedError` whose message names the field; the agent
acknowledges such a command ``rejected`` and never runs it.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import SplitResult, urlsplit

from go2cloud_client import bwschedule
from go2cloud_client.errors import CommandRejectedError
from go2cloud_client.tlspin import is_canonical_fingerprint

KNOWN_TYPES = ("drill", "start", "sync", "finalize", "pause", "resume", "modify", "abort")
#: Types this agent version implements (the rest are answered ``unsupported``).
SUPPORTED_TYPES = ("drill", "start", "sync", "finalize", "pause", "resume", "modify", "abort")

_TASK_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CYCLE_DIR_RE = re.compile(r"^[0-9]{6}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
MAX_BANDWIDTH_MBPS = 100000
MAX_PATHS = 64
MAX_DISKS = 16
MODES = ("file", "block")
#: ``snapshot: auto`` picks the first usable of these point-in-time backends (by probe()); with
#: none usable it fails (drill: critical item) and never falls back to ``fsfreeze`` or ``live``
AUTO_SNAPSHOT_ORDER = ("reflink", "btrfs", "elastio-snap", "dattobd", "lvm")
#: The backends that are not point-in-time for the whole pass, or stall writers, and what they
#: cost: an operator chooses one of them explicitly (``--snapshot fsfreeze|live``)
NON_PIT_ALTERNATIVES = {
    "fsfreeze": "consistent, but every writer of the filesystem stalls during each pass",
    "live": "crash-inconsistent during the passes; consistent only for a final sync with the "
            "services stopped",
}


def alternatives_text() -> str:
    """The explicit choices left when no point-in-time backend is usable, with their cost."""
    return "; ".join(f"--snapshot {name} ({cost})" for name, cost in NON_PIT_ALTERNATIVES.items())

#: Backends that give a crash-consistent copy of a running server's disks without stalling its
#: writers for the whole copy (``live`` is not point-in-time; ``fsfreeze`` stalls writers, and
#: ``auto`` uses it only for the final sync of a mounted filesystem)
CONSISTENT_SNAPSHOT_BACKENDS = ("elastio-snap", "dattobd", "lvm", "btrfs", "reflink", "vss")
_DISK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CycleSpec:
    number: int
    dest: str
    link_dest: Optional[str]

    def to_dict(self) -> Dict[str, Any]:
        return {"number": self.number, "dest": self.dest, "link_dest": self.link_dest}


@dataclass(frozen=True)
class TargetSpec:
    """The task's rsync module: reached through the control plane's HTTPS port (``url``,
    ``https://HOST:PORT/rsync/v1/tasks/<task>``, certificate ``fingerprint`` pinned)."""

    url: str
    fingerprint: str
    module: str
    user: str
    password: str = field(repr=False)
    #: the agent's session epoch, sent with the rsync session (set by the task runner)
    epoch: int = 0

    def __repr__(self) -> str:  # never show the password
        return f"TargetSpec(url={self.url!r}, module={self.module!r}, user={self.user!r})"


@dataclass(frozen=True)
class BlockTargetSpec:
    """The block receiver of the task: its URL, the per-task token and the pinned certificate."""

    url: str
    token: str = field(repr=False)
    fingerprint: str = ""
    #: the agent's session epoch, sent with every request (set by the task runner)
    epoch: int = 0

    def __repr__(self) -> str:  # never show the token
        return f"BlockTargetSpec(url={self.url!r}, fingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class DiskSpec:
    name: str
    path: str

    def to_dict(self) -> Dict[str, str]:
        return {"name": self.name, "path": self.path}


AnyTarget = Union[TargetSpec, BlockTargetSpec]


@dataclass(frozen=True)
class DrillSpec:
    """What the ``drill`` command asks to check. Paths and disks are checked for syntax only:
    whether they exist is one of the drill's findings, not a reason to refuse the command.
    ``targets`` are (label, host, port) of the target ports to try."""

    mode: str
    paths: Tuple[str, ...] = ()
    disks: Tuple[str, ...] = ()
    snapshot: Optional[str] = None
    targets: Tuple[Tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class Options:
    bandwidth_mbps: int = 0
    compression: int = 7
    checksum: bool = False
    #: bandwidth windows (go2cloud_client.bwschedule syntax, normalised); None: the limit above always
    bandwidth_schedule: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"bandwidth_mbps": self.bandwidth_mbps, "compression": self.compression,
                "checksum": self.checksum, "bandwidth_schedule": self.bandwidth_schedule}


@dataclass(frozen=True)
class Command:
    id: str
    type: str
    task_id: Optional[str] = None
    mode: Optional[str] = None
    paths: Tuple[str, ...] = ()
    options: Optional[Options] = None
    #: modify: only the options that were given
    changes: Dict[str, Any] = field(default_factory=dict)
    target: Optional[AnyTarget] = None
    cycle: Optional[CycleSpec] = None
    #: mode block: the disks and the snapshot backend name (or "auto")
    disks: Tuple[DiskSpec, ...] = ()
    snapshot: Optional[str] = None
    #: drill: what to check
    drill: Optional[DrillSpec] = None


def _reject(name: str, why: str) -> CommandRejectedError:
    return CommandRejectedError(f"invalid parameter {name!r}: {why}")


def _get(params: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
    if name not in params:
        if required:
            raise _reject(name, "missing")
        return None
    return params[name]


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _reject(name, f"must be an integer {lo}-{hi}")
    if not lo <= value <= hi:
        raise _reject(name, f"must be {lo}-{hi}, got {value}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _reject(name, "must be true or false")
    return value


def _task_id(params: Mapping[str, Any]) -> str:
    value = _get(params, "task_id")
    if not isinstance(value, str) or not _TASK_ID_RE.match(value):
        raise _reject("task_id", "must match [A-Za-z0-9._-]{1,64}")
    return value


def _absolute_path(value: Any, name: str) -> str:
    """The syntax shared by source paths and disk paths: a single-line, absolute, normalised path."""
    if not isinstance(value, str) or not value:
        raise _reject(name, "must be a non-empty string")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise _reject(name, "must not contain NUL or newline characters")
    if not value.startswith("/"):
        raise _reject(name, f"must be an absolute path, got {value!r}")
    if ".." in value.split("/"):
        raise _reject(name, f"must not contain '..', got {value!r}")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise _reject(name, f"must be normalised (no '.', '//' or trailing '/'), got {value!r}")
    return value


def validate_path(value: Any, name: str, isdir: Callable[[str], bool] = os.path.isdir) -> str:
    _absolute_path(value, name)
    if not isdir(value):
        raise _reject(name, f"{value!r} is not an existing directory on this host")
    return value


def _paths(params: Mapping[str, Any], isdir: Callable[[str], bool]) -> Tuple[str, ...]:
    value = _get(params, "paths")
    if not isinstance(value, list) or not value:
        raise _reject("paths", "must be a non-empty list of absolute paths")
    if len(value) > MAX_PATHS:
        raise _reject("paths", f"at most {MAX_PATHS} paths")
    out = [validate_path(p, f"paths[{i}]", isdir) for i, p in enumerate(value)]
    if len(set(out)) != len(out):
        raise _reject("paths", "contains a path twice")
    return tuple(out)


def is_disk(path: str) -> bool:
    """An existing block device or regular file (an image), following symlinks (/dev/mapper/x)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISBLK(mode) or stat.S_ISREG(mode)


def snapshot_backends() -> Tuple[str, ...]:
    """The snapshot backends this agent has (``snapshot_driver.registry.names()``), or () when the
    snapshot driver is not installed."""
    try:
        from snapshot_driver import registry
    except ImportError:
        return ()
    return tuple(registry.names())


def validate_disk_path(value: Any, name: str, isdisk: Callable[[str], bool] = is_disk) -> str:
    _absolute_path(value, name)
    if not isdisk(value):
        raise _reject(name, f"{value!r} is not an existing block device or image file on this host")
    return value


def _disks(params: Mapping[str, Any], isdisk: Callable[[str], bool]) -> Tuple[DiskSpec, ...]:
    value = _get(params, "disks")
    if not isinstance(value, list) or not value:
        raise _reject("disks", "must be a non-empty list of {name, path} objects")
    if len(value) > MAX_DISKS:
        raise _reject("disks", f"at most {MAX_DISKS} disks")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _reject(f"disks[{i}]", "must be an object with name and path")
        dname = item.get("name")
        if not isinstance(dname, str) or not _DISK_NAME_RE.match(dname):
            raise _reject(f"disks[{i}].name", "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
        out.append(DiskSpec(dname, validate_disk_path(item.get("path"), f"disks[{i}].path", isdisk)))
    if len({d.name for d in out}) != len(out):
        raise _reject("disks", "contains a name twice")
    if len({d.path for d in out}) != len(out):
        raise _reject("disks", "contains a path twice")
    return tuple(out)


def _snapshot(params: Mapping[str, Any], backends: Callable[[], Tuple[str, ...]]) -> str:
    value = _get(params, "snapshot")
    known = backends()
    if not known:
        raise _reject("snapshot", "the snapshot driver is not installed with this agent: "
                                  "block-level migration is not available")
    if not isinstance(value, str) or (value != "auto" and value not in known):
        raise _reject("snapshot", f"must be 'auto' or one of {', '.join(sorted(known))}, got {value!r}")
    return value


def _https_url(url: Any, name: str) -> SplitResult:
    """An https:// URL with a host name (single line, at most 2048 characters), split."""
    if not isinstance(url, str) or len(url) > 2048 or any(c in url for c in "\x00\n\r "):
        raise _reject(name, "must be an https:// URL")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise _reject(name, "must be an https:// URL")
    return parts


def validate_block_target(value: Any, name: str = "target") -> BlockTargetSpec:
    if not isinstance(value, dict):
        raise _reject(name, "must be an object")
    if value.get("kind") != "block":
        raise _reject(f"{name}.kind", "must be 'block' for mode 'block'")
    url = value.get("url")
    _https_url(url, f"{name}.url")
    token = value.get("token")
    if not isinstance(token, str) or not token or len(token) > 1024 or any(c in token for c in "\x00\n\r"):
        raise _reject(f"{name}.token", "must be a non-empty single-line string")
    fingerprint = _fingerprint(value.get("fingerprint"), f"{name}.fingerprint")
    return BlockTargetSpec(str(url), token, fingerprint)


def _fingerprint(value: Any, name: str) -> str:
    if not is_canonical_fingerprint(value):
        raise _reject(name, "must be sha256: followed by 64 lowercase hex digits")
    return value


def _cycle(value: Any, name: str = "cycle") -> CycleSpec:
    if not isinstance(value, dict):
        raise _reject(name, "must be an object with number, dest and link_dest")
    if "number" not in value:
        raise _reject(f"{name}.number", "missing")
    number = _int(value["number"], f"{name}.number", 1, 999999)
    dest = value.get("dest")
    if not isinstance(dest, str) or not _CYCLE_DIR_RE.match(dest):
        raise _reject(f"{name}.dest", "must be six digits")
    link_dest = value.get("link_dest")
    if link_dest is not None and (not isinstance(link_dest, str) or not _CYCLE_DIR_RE.match(link_dest)):
        raise _reject(f"{name}.link_dest", "must be six digits or null")
    if link_dest == dest:
        raise _reject(f"{name}.link_dest", "must differ from dest")
    return CycleSpec(number, dest, link_dest)


def validate_host(value: Any, name: str = "target.host") -> str:
    if not isinstance(value, str) or not value:
        raise _reject(name, "must be a host name or IP address")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if value.startswith("-") or not _HOSTNAME_RE.match(value):
        raise _reject(name, "must be a host name or IP address")
    return value


def validate_target(value: Any, name: str = "target") -> TargetSpec:
    if not isinstance(value, dict):
        raise _reject(name, "must be an object")
    if value.get("kind") != "rsync":
        raise _reject(f"{name}.kind", "must be 'rsync' for mode 'file'")
    url = value.get("url")
    parts = _https_url(url, f"{name}.url")
    if parts.query or parts.fragment or not re.match(r"^/rsync/v1/tasks/[A-Za-z0-9._-]{1,64}$", parts.path):
        raise _reject(f"{name}.url", "must be https://HOST:PORT/rsync/v1/tasks/<task>")
    fingerprint = _fingerprint(value.get("fingerprint"), f"{name}.fingerprint")
    for key in ("module", "user"):
        if not isinstance(value.get(key), str) or not _NAME_RE.match(value[key]):
            raise _reject(f"{name}.{key}", "must match [A-Za-z0-9._-]{1,64}")
    password = value.get("password")
    if not isinstance(password, str) or not password or len(password) > 1024 or any(
        c in password for c in "\x00\n\r"
    ):
        raise _reject(f"{name}.password", "must be a non-empty single-line string")
    return TargetSpec(str(url), fingerprint, value["module"], value["user"], password)


def validate_options(params: Mapping[str, Any], *, partial: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, check in (
        ("bandwidth_mbps", lambda v: _int(v, "bandwidth_mbps", 0, MAX_BANDWIDTH_MBPS)),
        ("compression", lambda v: _int(v, "compression", 0, 10)),
        ("checksum", lambda v: _bool(v, "checksum")),
    ):
        if name in params and (params[name] is not None or not partial):
            out[name] = check(params[name])
        elif not partial:
            raise _reject(name, "missing")
    # optional on start (a control plane without windows omits it); on modify null removes it
    if "bandwidth_schedule" in params:
        out["bandwidth_schedule"] = _schedule(params["bandwidth_schedule"])
    return out


def _schedule(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _reject("bandwidth_schedule", "must be a string or null")
    try:
        return bwschedule.parse(value).text
    except bwschedule.ScheduleError as exc:
        raise _reject("bandwidth_schedule", str(exc)) from None


def _drill_target(value: Any) -> Tuple[Tuple[str, str, int], ...]:
    """The target of a drill: only where it is (no password or token is needed to check a port)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _reject("target", "must be an object")
    kind = value.get("kind")
    if kind in ("rsync", "block"):
        parts = _https_url(value.get("url"), "target.url")
        try:
            port = parts.port or 443
        except ValueError:
            raise _reject("target.url", "has an invalid port") from None
        label = "rsync target" if kind == "rsync" else "block receiver"
        return ((label, validate_host(parts.hostname, "target.url"), port),)
    raise _reject("target.kind", "must be 'rsync' or 'block'")


def _parse_drill(cid: str, params: Mapping[str, Any]) -> Command:
    task_id = _task_id(params)
    mode = params.get("mode")
    if mode not in MODES:
        raise _reject("mode", f"must be one of {', '.join(MODES)}")
    paths: Tuple[str, ...] = ()
    disks: Tuple[str, ...] = ()
    snapshot = None
    if mode == "block":
        value = _get(params, "disks")
        if not isinstance(value, list) or not value or len(value) > MAX_DISKS:
            raise _reject("disks", f"must be a list of 1-{MAX_DISKS} {{name, path}} objects")
        disks = tuple(_absolute_path(d.get("path") if isinstance(d, dict) else None, f"disks[{i}].path")
                      for i, d in enumerate(value))
        snapshot = params.get("snapshot")
        if snapshot is not None and (not isinstance(snapshot, str) or not _NAME_RE.match(snapshot)):
            raise _reject("snapshot", "must be a backend name or 'auto'")
    else:
        value = _get(params, "paths")
        if not isinstance(value, list) or not value or len(value) > MAX_PATHS:
            raise _reject("paths", f"must be a list of 1-{MAX_PATHS} absolute paths")
        paths = tuple(_absolute_path(p, f"paths[{i}]") for i, p in enumerate(value))
    spec = DrillSpec(mode, paths, disks, snapshot, _drill_target(params.get("target")))
    return Command(cid, "drill", task_id, mode, paths, drill=spec)


def parse_command(raw: Mapping[str, Any], isdir: Callable[[str], bool] = os.path.isdir,
                  isdisk: Callable[[str], bool] = is_disk,
                  backends: Callable[[], Tuple[str, ...]] = snapshot_backends) -> Command:
    """Validate a command of a supported type into a :class:`Command`."""
    cid = raw["id"]
    ctype = raw["type"]
    params = raw.get("params")
    if not isinstance(params, dict):
        raise _reject("params", "must be an object")
    if ctype == "start":
        task_id = _task_id(params)
        mode = params.get("mode")
        if mode not in MODES:
            raise _reject("mode", f"must be one of {', '.join(MODES)}")
        if mode == "block":
            disks = _disks(params, isdisk)
            snapshot = _snapshot(params, backends)
            options = Options(**validate_options(params, partial=False))
            block_target = validate_block_target(_get(params, "target"))
            cycle = _cycle(_get(params, "cycle"))
            return Command(cid, ctype, task_id, "block", (), options, target=block_target, cycle=cycle,
                           disks=disks, snapshot=snapshot)
        paths = _paths(params, isdir)
        options = Options(**validate_options(params, partial=False))
        target = validate_target(_get(params, "target"))
        cycle = _cycle(_get(params, "cycle"))
        return Command(cid, ctype, task_id, "file", paths, options, target=target, cycle=cycle)
    if ctype == "drill":
        return _parse_drill(cid, params)
    if ctype == "sync":
        return Command(cid, ctype, _task_id(params), cycle=_cycle(_get(params, "cycle")))
    if ctype == "finalize":
        task_id = _task_id(params)
        if "cycle" not in params:
            raise _reject("cycle", "missing (null means: finish without a final sync)")
        final_cycle = None if params["cycle"] is None else _cycle(params["cycle"])
        return Command(cid, ctype, task_id, cycle=final_cycle)
    if ctype == "modify":
        changes = validate_options(params, partial=True)
        return Command(cid, ctype, _task_id(params), changes=changes)
    if ctype in ("pause", "resume", "abort"):
        return Command(cid, ctype, _task_id(params))
    raise CommandRejectedError(f"command type {ctype!r} is not supported")


def parse_task(
    doc: Mapping[str, Any], isdir: Callable[[str], bool] = os.path.isdir
) -> Tuple[Tuple[str, ...], Options, AnyTarget]:
    """Validate a task document from ``GET /tasks/{id}`` into (paths, options, target). For a
    block task ``paths`` is empty and the target is a :class:`BlockTargetSpec` (the disks and the
    snapshot backend were validated with the ``start`` command and are kept in the task file)."""
    options = Options(**validate_options(doc, partial=False))
    if doc.get("mode") == "block":
        return (), options, validate_block_target(_get(doc, "target"))
    paths = _paths(doc, isdir)
    return paths, options, validate_target(_get(doc, "target"))
