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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from go2cloud_client.errors import CommandRejectedError

KNOWN_TYPES = ("drill", "start", "sync", "finalize", "pause", "resume", "modify", "abort")
#: Types this agent version implements (the rest are answered ``unsupported``).
SUPPORTED_TYPES = ("start", "sync", "finalize", "pause", "resume", "modify", "abort")

_TASK_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CYCLE_DIR_RE = re.compile(r"^[0-9]{6}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
MAX_BANDWIDTH_MBPS = 100000
MAX_PATHS = 64


@dataclass(frozen=True)
class CycleSpec:
    number: int
    dest: str
    link_dest: Optional[str]

    def to_dict(self) -> Dict[str, Any]:
        return {"number": self.number, "dest": self.dest, "link_dest": self.link_dest}


@dataclass(frozen=True)
class TargetSpec:
    host: str
    port: int
    module: str
    user: str
    password: str = field(repr=False)

    def __repr__(self) -> str:  # never show the password
        return f"TargetSpec(host={self.host!r}, port={self.port}, module={self.module!r}, user={self.user!r})"


@dataclass(frozen=True)
class Options:
    bandwidth_mbps: int = 0
    compression: int = 7
    checksum: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"bandwidth_mbps": self.bandwidth_mbps, "compression": self.compression,
                "checksum": self.checksum}


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
    target: Optional[TargetSpec] = None
    cycle: Optional[CycleSpec] = None


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


def validate_path(value: Any, name: str, isdir: Callable[[str], bool] = os.path.isdir) -> str:
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
    host = validate_host(value.get("host"), f"{name}.host")
    port = _int(value.get("port"), f"{name}.port", 1, 65535)
    for key in ("module", "user"):
        if not isinstance(value.get(key), str) or not _NAME_RE.match(value[key]):
            raise _reject(f"{name}.{key}", "must match [A-Za-z0-9._-]{1,64}")
    password = value.get("password")
    if not isinstance(password, str) or not password or len(password) > 1024 or any(
        c in password for c in "\x00\n\r"
    ):
        raise _reject(f"{name}.password", "must be a non-empty single-line string")
    return TargetSpec(host, port, value["module"], value["user"], password)


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
    return out


def parse_command(raw: Mapping[str, Any], isdir: Callable[[str], bool] = os.path.isdir) -> Command:
    """Validate a command of a supported type into a :class:`Command`."""
    cid = raw["id"]
    ctype = raw["type"]
    params = raw.get("params")
    if not isinstance(params, dict):
        raise _reject("params", "must be an object")
    if ctype == "start":
        task_id = _task_id(params)
        if params.get("mode") != "file":
            raise _reject("mode", "must be 'file' (block mode is not supported by this agent yet)")
        paths = _paths(params, isdir)
        options = Options(**validate_options(params, partial=False))
        target = validate_target(_get(params, "target"))
        cycle = _cycle(_get(params, "cycle"))
        return Command(cid, ctype, task_id, "file", paths, options, target=target, cycle=cycle)
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
) -> Tuple[Tuple[str, ...], Options, TargetSpec]:
    """Validate a task document from ``GET /tasks/{id}`` into (paths, options, target)."""
    paths = _paths(doc, isdir)
    options = Options(**validate_options(doc, partial=False))
    return paths, options, validate_target(_get(doc, "target"))
