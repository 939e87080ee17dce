"""Exclusion patterns for file-level replication (``Excludes/rsync_excludes_linux.txt``).

File format (see the shipped default for the operator-facing description): one pattern per
line, ``#`` comments and blank lines ignored, patterns relative to the transfer root (the
migrated mount point), a leading ``/`` anchors, a trailing ``/`` means "directories only",
rsync wildcards (``*``, ``**``, ``?``, ``[...]``).

Safety: the patterns reach rsync only through a filter file (``--filter=merge FILE``) in which
every pattern is written as ``- PATTERN``; rsync takes everything after ``- `` as the pattern, so
no line can ever become an rsync option or another kind of filter rule. Lines the operator
probably meant as rsync filter syntax (``- /x``, ``+ /x``, ``merge f``, ``-e sh``, ``!``) are refused
with an error naming the line, rather than silently meaning something else; so are lines with
NUL or other control characters.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from go2cloud_client.atomicfile import atomic_write
from go2cloud_client.errors import ConfigError

LOG = logging.getLogger(__name__)

#: File name of the exclusion list inside ``<home>/Excludes/``.
EXCLUDES_NAME = "rsync_excludes_linux.txt"

#: The default list shipped with the agent.
DEFAULT_EXCLUDES = Path(__file__).resolve().parent.parent / "data" / "Excludes" / EXCLUDES_NAME

# rsync filter rules: short form ("-", "+", ".", ":", "H", "S", "P", "R", "!" with optional
# modifiers, then a space, an underscore or the end of the line) and long form ("exclude", "merge"...).
_SHORT_RULE = re.compile(r"^[-+.:HSPR!][/!Csrpxewn,]*(?:[ _]|$)")
_LONG_RULE = re.compile(
    r"^(?:exclude|include|merge|dir-merge|hide|show|protect|risk|clear)(?:,\S*)?(?:[ _]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATTERN_BYTES = 4096


class ExcludesError(ConfigError):
    """The exclusion file is unreadable or has an invalid line (the message names the line)."""

    code = "excludes_invalid"
    summary = "the exclusion list (Excludes/rsync_excludes_linux.txt) has an invalid line"


@dataclass(frozen=True)
class Rule:
    """One exclusion pattern. ``line`` is its 1-based line number in the source file (0 if none)."""

    pattern: str
    line: int = 0

    @property
    def dir_only(self) -> bool:
        return self.pattern.endswith("/")

    @property
    def anchored(self) -> bool:
        return self.pattern.startswith("/")


def parse_line(text: str, lineno: int = 0, source: str = "excludes") -> Optional[Rule]:
    """Parse one line; None for blank and comment lines; ExcludesError for a refused line."""
    where = f"{source}, line {lineno}" if lineno else source
    if "\x00" in text:
        raise ExcludesError(f"{where}: contains a NUL byte; remove it")
    text = text.rstrip("\r\n")
    stripped = text.strip(" \t")
    if not stripped or stripped.startswith("#"):
        return None
    if _CONTROL.search(stripped):
        raise ExcludesError(f"{where}: contains a control character; use '?' to match it in a name")
    if _SHORT_RULE.match(stripped) or _LONG_RULE.match(stripped):
        raise ExcludesError(
            f"{where}: {stripped!r} looks like an rsync filter rule; write only the path pattern "
            "(for example '/var/cache/*'; use '[-] name' for a name that starts with '- ')"
        )
    if len(stripped.encode("utf-8", "surrogateescape")) > MAX_PATTERN_BYTES:
        raise ExcludesError(f"{where}: pattern longer than {MAX_PATTERN_BYTES} bytes")
    if stripped in ("/", "//"):
        raise ExcludesError(f"{where}: '/' would exclude the whole transfer root")
    return Rule(stripped, lineno)


def parse(text: str, source: str = "excludes") -> List[Rule]:
    rules: List[Rule] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        rule = parse_line(line, lineno, source)
        if rule is not None:
            rules.append(rule)
    return rules


def load(path: Union[str, Path]) -> List[Rule]:
    """Read and validate an exclusion file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExcludesError(f"cannot read the exclusion list {path}: {exc.strerror}") from exc
    return parse(data.decode("utf-8", "surrogateescape"), source=str(path))


def write_filter_file(rules: Sequence[Rule], path: Union[str, Path]) -> Path:
    """Write ``rules`` as an rsync filter file (``- PATTERN`` per line), atomically, mode 0600.

    Rules are validated again here, so a Rule built by hand cannot smuggle filter syntax either.
    """
    path = Path(path)
    lines = []
    for rule in rules:
        checked = parse_line(rule.pattern, rule.line, "exclusion rule")
        if checked is None or checked.pattern != rule.pattern:
            raise ExcludesError(f"exclusion rule {rule.pattern!r} is not a valid pattern")
        lines.append(f"- {rule.pattern}\n")
    data = "".join(lines).encode("utf-8", "surrogateescape")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, 0o600)
    return path


def ensure_home_excludes(home: Path) -> Path:
    """Return ``<home>/Excludes/rsync_excludes_linux.txt``, copying the shipped default there
    first if it is missing (directory 0700, file 0600). An existing file is never overwritten."""
    directory = Path(home) / "Excludes"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    target = directory / EXCLUDES_NAME
    if not target.exists():
        atomic_write(target, Path(DEFAULT_EXCLUDES).read_bytes(), 0o600)
        LOG.info("installed the default exclusion list at %s", target)
    return target


# --- approximate matcher (used only to estimate totals before rsync reports them) -------------

def _glob_to_regex(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
                continue
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class Matcher:
    """Approximation of rsync's exclude matching, for size estimates only (never for safety)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._compiled = []
        for rule in rules:
            pat = rule.pattern
            dir_only = pat.endswith("/")
            pat = pat.rstrip("/")
            if pat.startswith("/"):
                rx = "^" + _glob_to_regex(pat.lstrip("/")) + "$"
            elif "/" in pat or "**" in pat:
                rx = "(?:^|/)" + _glob_to_regex(pat) + "$"
            else:
                rx = "(?:^|/)" + _glob_to_regex(pat) + "$"
            self._compiled.append((re.compile(rx, re.DOTALL), dir_only))

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        """``relpath`` is relative to the transfer root, without a leading '/'."""
        for rx, dir_only in self._compiled:
            if dir_only and not is_dir:
                continue
            if rx.search(relpath):
                return True
        return False
