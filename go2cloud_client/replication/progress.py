"""Parsing of rsync's ``--info=progress2`` lines and ``--stats`` summary.

A progress2 line looks like (rsync 3.1+, ``LC_ALL=C``)::

       1,234,567  45%   12.34MB/s    0:00:05 (xfr#3, to-chk=10/20)

The byte count may be printed without separators (old or ``--no-h`` rsync) or with a suffix
(``-hh``: ``1.23M``); the rate unit is ``kB/s``, ``MB/s`` or ``GB/s`` in powers of 1024 (that is
how rsync computes it); the time is ``H:MM:SS`` (or ``??:??:??`` when unknown); the bracket is
``xfr#N, to-chk=A/B`` or ``xfr#N, ir-chk=A/B`` (incremental recursion still scanning) and is
missing on most lines. Anything else (file names with ``-v``, warnings) yields ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

_NUM = r"[0-9][0-9,.']*[KMGTP]?"
_PROGRESS = re.compile(
    r"^\s*(?P<bytes>" + _NUM + r")\s+(?P<pct>\d{1,3})%\s+"
    r"(?P<rate>[0-9][0-9.,']*)(?P<unit>[kKMGT]?B)/s\s+"
    r"(?P<eta>(?:\d+:)?\d+:\d{2}:\d{2}|\?+:\?+:\?+|\d+:\d{2})"
    r"(?:\s+\((?:xfr#(?P<xfr>\d+),\s*)?(?P<chk>to-chk|ir-chk)=(?P<left>\d+)/(?P<total>\d+)\))?\s*$"
)
_UNITS = {"B": 1, "kB": 1024, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}
_SUFFIX = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4, "P": 1024 ** 5}


@dataclass(frozen=True)
class ProgressLine:
    bytes_done: int
    percent: int
    rate_bps: float
    eta_s: Optional[float]
    xfr: Optional[int] = None
    to_check: Optional[int] = None
    total_files: Optional[int] = None
    incremental_scan: bool = False  # ir-chk: rsync is still building the file list


def _number(text: str) -> float:
    """'1,234,567' -> 1234567; '1.23M' -> 1.23 * 2**20; '12.34' -> 12.34."""
    suffix = ""
    if text and text[-1] in _SUFFIX and text[-1] != "":
        suffix, text = text[-1], text[:-1]
    text = text.replace(",", "").replace("'", "")
    if suffix == "" and text.count(".") > 1:  # some locales group with '.'
        text = text.replace(".", "")
    return float(text) * _SUFFIX[suffix]


def _eta(text: str) -> Optional[float]:
    if "?" in text:
        return None
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    # rsync prints D:HH:MM:SS only as hours > 99 -> H:MM:SS already covers hours; 4 parts = days
    if text.count(":") == 3:
        d, h, m, s = (int(p) for p in text.split(":"))
        seconds = ((d * 24 + h) * 60 + m) * 60 + s
    return float(seconds)


def parse_progress(line: str) -> Optional[ProgressLine]:
    """Parse one progress2 line; None if the line is not one."""
    m = _PROGRESS.match(line)
    if not m:
        return None
    try:
        done = int(_number(m.group("bytes")))
        rate = _number(m.group("rate")) * _UNITS[m.group("unit")]
        eta = _eta(m.group("eta"))
    except (ValueError, KeyError):
        return None
    pct = int(m.group("pct"))
    if pct > 100:
        return None
    return ProgressLine(
        bytes_done=done,
        percent=pct,
        rate_bps=rate,
        eta_s=eta,
        xfr=int(m.group("xfr")) if m.group("xfr") else None,
        to_check=int(m.group("left")) if m.group("left") else None,
        total_files=int(m.group("total")) if m.group("total") else None,
        incremental_scan=m.group("chk") == "ir-chk",
    )


@dataclass
class Stats:
    """The interesting part of rsync's ``--stats`` output (all None if not seen)."""

    files: Optional[int] = None                 # Number of files (all kinds)
    regular_files: Optional[int] = None         # the "reg: N" part of "Number of files"
    files_transferred: Optional[int] = None     # Number of regular files transferred
    total_file_size: Optional[int] = None       # Total file size (bytes)
    transferred_file_size: Optional[int] = None  # Total transferred file size
    literal_data: Optional[int] = None
    matched_data: Optional[int] = None
    bytes_sent: Optional[int] = None            # Total bytes sent (wire)
    bytes_received: Optional[int] = None

    @property
    def complete(self) -> bool:
        return self.total_file_size is not None and self.bytes_sent is not None


_STATS_FIELDS: Dict[str, str] = {
    "number of files": "files",
    "number of regular files transferred": "files_transferred",
    "number of files transferred": "files_transferred",  # rsync < 3.1
    "total file size": "total_file_size",
    "total transferred file size": "transferred_file_size",
    "literal data": "literal_data",
    "matched data": "matched_data",
    "total bytes sent": "bytes_sent",
    "total bytes received": "bytes_received",
}
_STATS_LINE = re.compile(r"^\s*(?P<key>[A-Za-z ]+?):\s+(?P<value>" + _NUM + r")(?:\s+bytes)?(?P<rest>.*)$")
_REG = re.compile(r"\breg:\s*(" + _NUM + r")")


class StatsParser:
    """Feed it every output line; non-stats lines are ignored."""

    def __init__(self) -> None:
        self.stats = Stats()

    def feed(self, line: str) -> bool:
        m = _STATS_LINE.match(line)
        if not m:
            return False
        field = _STATS_FIELDS.get(m.group("key").strip().lower())
        if field is None:
            return False
        try:
            setattr(self.stats, field, int(_number(m.group("value"))))
            if field == "files":
                reg = _REG.search(m.group("rest"))
                if reg:
                    self.stats.regular_files = int(_number(reg.group(1)))
        except ValueError:
            return False
        return True


def parse_stats(text: str) -> Stats:
    parser = StatsParser()
    for line in text.splitlines():
        parser.feed(line)
    return parser.stats
