"""Validation rules and limits of the control plane (docs/operator-guide.md, "Limits").

Every function here either returns the validated (normalised) value or raises
:class:`~go2cloud_server.errors.InvalidInput` with a message that names the field. Counting
limits (workgroups per account, sources per workgroup) need the database and are enforced in
``service``; their numbers live here.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Dict, List, Mapping, Optional

from go2cloud_server.errors import InvalidInput

MAX_WORKGROUPS = 50
MAX_SOURCES_PER_WORKGROUP = 50
MAX_TAGS = 20
TAG_KEY_LEN = (1, 128)
TAG_VALUE_LEN = (0, 128)
WORKGROUP_NAME_LEN = (2, 64)
DESCRIPTION_MAX = 256
TASK_NAME_LEN = (1, 128)
CODE_USES = (1, 1000)
CODE_USES_DEFAULT = 200
CODE_DAYS = (1, 90)
CODE_DAYS_DEFAULT = 90
BANDWIDTH_MBPS = (0, 100000)
COMPRESSION = (0, 10)
COMPRESSION_DEFAULT = 7
KEEP_IMAGES = (1, 100)
KEEP_IMAGES_DEFAULT = 3
SYNC_EVERY_S = (60, 30 * 86400)
MAX_PATHS = 64
MAX_DISKS = 16
MODES = ("file", "block")
#: snapshot backends an operator may choose for mode block (the agent refuses one it lacks)
SNAPSHOT_BACKENDS = ("live", "fsfreeze", "reflink", "btrfs", "lvm", "elastio-snap", "dattobd", "auto")
SNAPSHOT_DEFAULT = "auto"
#: Backends that are not point in time for the whole pass (or stall writers): an operator's explicit
#: choice, recorded with who and when in the task history and the drill report; ``auto`` never
#: falls back to them
NON_PIT_SNAPSHOTS = {
    "fsfreeze": "consistent, but every writer of the filesystem stalls during each pass",
    "live": "crash-inconsistent during the passes; consistent only for a final sync with the "
            "services stopped",
}
DISK_NAME_MAX = 64
PATH_MAX = 4096
WAIT_S = (0, 60)
# Defaults of ``serve`` options, here so that ``go2cloud_server`` builds its commands without
# importing the server modules that use them (docs/performance.md, issue 16):
#: the sliding window of failed imports, seconds (throttle.py)
IMPORT_WINDOW_S = 300.0
#: failed imports from one client address in the window; the next ones get 429 (throttle.py)
IMPORT_FAILURES_PER_ADDRESS = 10
#: default size of the database's reserve on a filesystem shared with images, MiB (space.py)
DB_RESERVE_MIB = 64

_NAME_EXTRA = set(":._-")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_OFF = {"off", "none", "never", "0"}


def _is_letter(ch: str) -> bool:
    # str.isalpha() is true for Latin, CJK ideographs, kana, hangul, ...
    return ch.isalpha()


def workgroup_name(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput("name: must be a string")
    lo, hi = WORKGROUP_NAME_LEN
    if not lo <= len(value) <= hi:
        raise InvalidInput(f"name: must be {lo}-{hi} characters long (got {len(value)})")
    if value.lower().startswith(("http://", "https://")):
        raise InvalidInput("name: must not start with http:// or https://")
    if not _is_letter(value[0]):
        raise InvalidInput("name: must start with a letter or a CJK character")
    for ch in value:
        if not (_is_letter(ch) or ch.isdigit() or ch in _NAME_EXTRA):
            raise InvalidInput(f"name: character {ch!r} is not allowed (letters, digits, ':', '.', '_', '-')")
    return value


def text(value: Any, field: str, max_len: int = DESCRIPTION_MAX, min_len: int = 0) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be a string")
    if not min_len <= len(value) <= max_len:
        raise InvalidInput(f"{field}: must be {min_len}-{max_len} characters long (got {len(value)})")
    if any(ord(ch) < 32 and ch not in "\t" for ch in value):
        raise InvalidInput(f"{field}: must not contain control characters")
    return value


def tags(value: Any) -> Dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput("tags: must be an object of key: value strings")
    if len(value) > MAX_TAGS:
        raise InvalidInput(f"tags: at most {MAX_TAGS} tags per workgroup (got {len(value)})")
    out: Dict[str, str] = {}
    for k, v in value.items():
        text(k, "tags: key", TAG_KEY_LEN[1], TAG_KEY_LEN[0])
        text(v, f"tags: value of {k!r}", TAG_VALUE_LEN[1], TAG_VALUE_LEN[0])
        out[k] = v
    return out


def parse_tag(item: str) -> tuple:
    """``K=V`` from the command line -> (K, V)."""
    if "=" not in item:
        raise InvalidInput(f"--tag {item!r}: expected KEY=VALUE")
    k, v = item.split("=", 1)
    return k, v


def integer(value: Any, field: str, bounds: tuple, default: Optional[int] = None) -> int:
    if value is None:
        if default is None:
            raise InvalidInput(f"{field}: is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field}: must be an integer")
    lo, hi = bounds
    if not lo <= value <= hi:
        raise InvalidInput(f"{field}: must be between {lo} and {hi} (got {value})")
    return value


def boolean(value: Any, field: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{field}: must be true or false")
    return value


def sync_every(value: Any) -> Optional[int]:
    """Seconds between automatic incremental syncs, or None (off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("sync_every_s: must be an integer number of seconds or null")
    if value == 0:
        return None
    lo, hi = SYNC_EVERY_S
    if not lo <= value <= hi:
        raise InvalidInput(
            f"sync_every_s: must be between {lo} s and {hi // 86400} days, or null (got {value})"
        )
    return value


def parse_duration(value: str) -> Optional[int]:
    """``30s``, ``15m``, ``2h``, ``1d`` or plain seconds -> seconds; ``off`` -> None."""
    if value.strip().lower() in _OFF:
        return None
    m = _DURATION.match(value)
    if not m:
        raise InvalidInput(f"--sync-every {value!r}: expected a duration like 30m, 2h, 1d, or 'off'")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_duration(seconds: Optional[int]) -> str:
    if not seconds:
        return "off"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def source_path(value: Any, field: str = "paths") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{field}: each path must be a non-empty string")
    if len(value) > PATH_MAX:
        raise InvalidInput(f"{field}: path longer than {PATH_MAX} characters")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise InvalidInput(f"{field}: path {value!r} contains NUL or a line break")
    if not value.startswith("/"):
        raise InvalidInput(f"{field}: path {value!r} must be absolute")
    if ".." in value.split("/"):
        raise InvalidInput(f"{field}: path {value!r} must not contain '..'")
    if posixpath.normpath(value) != value and not (value == "/"):
        raise InvalidInput(f"{field}: path {value!r} is not normalised (use {posixpath.normpath(value)!r})")
    if value.startswith("//"):
        raise InvalidInput(f"{field}: path {value!r} is not normalised")
    return value


def paths(value: Any) -> Optional[List[str]]:
    """A list of source paths, or None when not given (the server picks the defaults)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise InvalidInput("paths: must be a non-empty list of absolute paths")
    if len(value) > MAX_PATHS:
        raise InvalidInput(f"paths: at most {MAX_PATHS} paths")
    out: List[str] = []
    for p in value:
        p = source_path(p)
        if p not in out:
            out.append(p)
    return out


def mode(value: Any) -> str:
    if value is None:
        return "file"
    if value not in MODES:
        raise InvalidInput(f"mode: must be one of {', '.join(MODES)} (got {value!r})")
    return str(value)


def snapshot(value: Any) -> str:
    if value is None:
        return SNAPSHOT_DEFAULT
    if value not in SNAPSHOT_BACKENDS:
        raise InvalidInput(f"snapshot: must be one of {', '.join(SNAPSHOT_BACKENDS)} (got {value!r})")
    return str(value)


def disks(value: Any) -> Optional[List[str]]:
    """Block devices or image files of a block-mode task (absolute paths), or None when not given."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise InvalidInput("disks: must be a non-empty list of absolute device or image paths")
    if len(value) > MAX_DISKS:
        raise InvalidInput(f"disks: at most {MAX_DISKS} disks per task")
    out: List[str] = []
    for p in value:
        p = source_path(p, "disks")
        if p == "/":
            raise InvalidInput("disks: '/' is a directory, not a disk (give a device such as /dev/vdb)")
        if p in out:
            raise InvalidInput(f"disks: {p!r} is given twice")
        out.append(p)
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def disk_names(paths: List[str]) -> List[Dict[str, str]]:
    """``[{"name", "path"}]``: a safe, unique name per disk derived from its path (``/dev/vdb`` ->
    ``vdb``, ``/dev/mapper/vg-root`` -> ``vg-root``, ``/srv/img/a b.img`` -> ``a_b.img``)."""
    out: List[Dict[str, str]] = []
    used: set = set()
    for p in paths:
        base = _UNSAFE.sub("_", posixpath.basename(p)).strip("._-") or "disk"
        base = base[: DISK_NAME_MAX - 4]
        name, n = base, 2
        while name in used:
            name = f"{base}-{n}"
            n += 1
        used.add(name)
        out.append({"name": name, "path": p})
    return out


def require_object(body: Any, what: str = "body") -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidInput(f"{what}: must be a JSON object")
    return body


def require_str(body: Mapping[str, Any], field: str, max_len: int = 4096) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{field}: is required and must be a non-empty string")
    if len(value) > max_len:
        raise InvalidInput(f"{field}: longer than {max_len} characters")
    return value


def limits_table() -> str:
    """The limits as a Markdown table (docs/operator-guide.md, "Limits")."""
    rows = [
        ("workgroups per server", f"{MAX_WORKGROUPS}"),
        (
            "workgroup name",
            f"{WORKGROUP_NAME_LEN[0]}-{WORKGROUP_NAME_LEN[1]} characters; starts with a letter "
            "or CJK character; letters, digits, `:` `.` `_` `-`; not `http://` / `https://`",
        ),
        ("workgroup / task description", f"0-{DESCRIPTION_MAX} characters"),
        (
            "tags per workgroup",
            f"{MAX_TAGS}; key {TAG_KEY_LEN[0]}-{TAG_KEY_LEN[1]}, value "
            f"{TAG_VALUE_LEN[0]}-{TAG_VALUE_LEN[1]} characters",
        ),
        ("sources per workgroup", f"{MAX_SOURCES_PER_WORKGROUP} (a source is in at most one workgroup)"),
        ("activation code uses", f"{CODE_USES[0]}-{CODE_USES[1]}, default {CODE_USES_DEFAULT}"),
        ("activation code validity", f"{CODE_DAYS[0]}-{CODE_DAYS[1]} days, default {CODE_DAYS_DEFAULT}"),
        ("bandwidth limit", f"{BANDWIDTH_MBPS[0]}-{BANDWIDTH_MBPS[1]} Mbit/s, 0 = unlimited (default)"),
        ("compression level", f"{COMPRESSION[0]}-{COMPRESSION[1]}, default {COMPRESSION_DEFAULT}, 0 = off"),
        ("images kept per task", f"{KEEP_IMAGES[0]}-{KEEP_IMAGES[1]}, default {KEEP_IMAGES_DEFAULT}"),
        (
            "automatic sync interval",
            f"{SYNC_EVERY_S[0]} s - {SYNC_EVERY_S[1] // 86400} days, or off (default)",
        ),
        ("paths per task", f"1-{MAX_PATHS} absolute, normalised paths"),
        ("disks per task (mode block)", f"1-{MAX_DISKS} absolute paths of block devices or image files"),
        ("task name", f"{TASK_NAME_LEN[0]}-{TASK_NAME_LEN[1]} characters"),
        ("request body", "1 MiB"),
    ]
    lines = ["| what | limit |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


# bandwidth windows --------------------------------------------------------------------------
#: the agent parses the same syntax (go2cloud_client/bwschedule.py; a test checks both agree)
SCHEDULE_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
SCHEDULE_MAX_ENTRIES = 32
SCHEDULE_MAX_LEN = 1024
SCHEDULE_EXAMPLE = '"Mon-Fri 08:00-20:00=50,*=0"'
_SCHED_TIME = re.compile(r"^(\d{2}):(\d{2})$")


def _sched_day(text: str, field: str, part: str) -> str:
    for name in SCHEDULE_DAYS:
        if text.lower() == name.lower():
            return name
    raise InvalidInput(f"{field}: {part!r}: unknown day {text!r} (use Mon, Tue, Wed, Thu, Fri, Sat, Sun)")


def _sched_minutes(text: str, field: str, part: str, *, end: bool) -> int:
    m = _SCHED_TIME.match(text)
    if not m:
        raise InvalidInput(f"{field}: {part!r}: {text!r} is not a time HH:MM")
    h, mi = int(m.group(1)), int(m.group(2))
    if end and (h, mi) == (24, 0):
        return 1440
    if h > 23 or mi > 59:
        raise InvalidInput(f"{field}: {part!r}: {text!r} is not a time of day (00:00-23:59; 24:00 as an end)")
    return h * 60 + mi


def bandwidth_schedule(value: Any, field: str = "bandwidth_schedule") -> Optional[str]:
    """Bandwidth windows, normalised: ``[DAYS] HH:MM-HH:MM=MBPS``, ``DAYS=MBPS`` or ``*=MBPS``
    entries separated by commas (docs/operator-guide.md, "Bandwidth windows"). None, ``""``,
    ``none`` or ``off`` remove the schedule (None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be a string like {SCHEDULE_EXAMPLE}")
    if value.strip().lower() in ("", "none", "off"):
        return None
    if len(value) > SCHEDULE_MAX_LEN:
        raise InvalidInput(f"{field}: longer than {SCHEDULE_MAX_LEN} characters")
    parts = [p.strip() for p in value.split(",")]
    if len(parts) > SCHEDULE_MAX_ENTRIES:
        raise InvalidInput(f"{field}: more than {SCHEDULE_MAX_ENTRIES} entries")
    out: List[str] = []
    seen_default = False
    for part in parts:
        if not part:
            raise InvalidInput(f"{field}: an entry is empty (two commas, or a comma at an end)")
        if part.count("=") != 1:
            raise InvalidInput(f"{field}: {part!r}: an entry is WHEN=MBPS "
                               "(e.g. Mon-Fri 08:00-20:00=50 or *=0)")
        when, _, mbps_text = (s.strip() for s in part.partition("="))
        if not mbps_text.isdigit():
            raise InvalidInput(f"{field}: {part!r}: the limit {mbps_text!r} is not a whole number of Mbit/s")
        mbps = int(mbps_text)
        if mbps > BANDWIDTH_MBPS[1]:
            raise InvalidInput(f"{field}: {part!r}: the limit {mbps} is above {BANDWIDTH_MBPS[1]} Mbit/s")
        if when == "*":
            if seen_default:
                raise InvalidInput(f"{field}: {part!r}: a second '*' entry (give the default once)")
            seen_default = True
            out.append(f"*={mbps}")
            continue
        fields = when.split()
        if len(fields) == 2:
            days, span = fields
        elif len(fields) == 1 and any(c.isdigit() for c in fields[0]):
            days, span = "Mon-Sun", fields[0]
        elif len(fields) == 1:
            days, span = fields[0], "00:00-24:00"
        else:
            raise InvalidInput(f"{field}: {part!r}: expected [DAYS] HH:MM-HH:MM=MBPS, DAYS=MBPS or *=MBPS")
        days = "-".join(_sched_day(d, field, part) for d in days.split("-", 1))
        a, sep, b = span.partition("-")
        if not sep:
            raise InvalidInput(f"{field}: {part!r}: {span!r} is not a time range HH:MM-HH:MM")
        start, end = _sched_minutes(a, field, part, end=False), _sched_minutes(b, field, part, end=True)
        if start == end:
            raise InvalidInput(f"{field}: {part!r}: the window is empty (start and end are both {a})")
        out.append(f"{days} {span}={mbps}")
    return ",".join(out)
