"""Agent packages and install scripts under ``/download/`` (no authentication).

A fresh source has nothing but curl (or PowerShell) and the one-liner: it fetches
``install.sh`` / ``install.ps1``, then ``SHA256SUMS`` and the package, all with the server's key
pinned. What is served:

- ``GET /download/``: JSON index of the packages (name, size, sha256, url) and the scripts;
- ``GET /download/SHA256SUMS``: the packages directory's ``SHA256SUMS`` as is;
- ``GET /download/<name>``: a file whose name is listed in ``SHA256SUMS``;
- ``GET /download/install.sh`` and ``/download/install.ps1``: the scripts shipped inside this
  package (``go2cloud_server/data/``), with this server's SPKI pin and certificate fingerprint
  filled into their ``SERVED_SPKI_PIN=''`` / ``SERVED_FINGERPRINT=''`` (``$ServedFingerprint = ''``)
  lines. The one-liner downloads the script over a connection pinned to the server's key, so the
  script learns the pin for its own downloads from the server it already authenticated, and it
  refuses a ``--server-fingerprint`` that is not this server's.

Nothing else: a name that is not listed (or not a plain file name, or not a regular file) is a
404, whatever it looks like. A listed file is checked against its ``SHA256SUMS`` line before it
is served (hashed once, then again only when its size, mtime or inode change); a file that
does not match is refused (409 ``package_mismatch``) and marked with the reason in the index.
Files are streamed from the open descriptor that was checked, never read whole into memory.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Tuple

from go2cloud_server.errors import Conflict, InvalidInput, NotFound

log = logging.getLogger(__name__)

PREFIX = "/download"
SUMS_NAME = "SHA256SUMS"
SCRIPTS_DIR = Path(__file__).resolve().parent / "data"
SCRIPT_NAMES = ("install.sh", "install.ps1")
#: at most this many SHA256SUMS bytes are read (a packages directory holds a few files)
MAX_SUMS_BYTES = 64 * 1024
MAX_SCRIPT_BYTES = 1024 * 1024
#: script line -> the value filled in (``{pin}``, ``{fingerprint}``) when the script is served
_SCRIPT_FILLS = {
    "install.sh": ((b"SERVED_SPKI_PIN=''", "SERVED_SPKI_PIN='{pin}'"),
                   (b"SERVED_FINGERPRINT=''", "SERVED_FINGERPRINT='{fingerprint}'")),
    "install.ps1": ((b"$ServedFingerprint = ''", "$ServedFingerprint = '{fingerprint}'"),),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_CONTENT_TYPES = (
    (".tar.gz", "application/gzip"),
    (".tgz", "application/gzip"),
    (".zip", "application/zip"),
    (".sh", "text/x-shellscript; charset=utf-8"),
    (".ps1", "text/plain; charset=utf-8"),
)


class PackageMismatch(Conflict):
    code = "package_mismatch"
    summary = "a published package does not match its SHA256SUMS line"


@dataclass
class Download:
    """An open file to stream: the descriptor was checked, ``size`` bytes are sent."""

    name: str
    file: IO[bytes]
    size: int
    content_type: str

    def close(self) -> None:
        self.file.close()


def content_type(name: str) -> str:
    for suffix, ctype in _CONTENT_TYPES:
        if name.endswith(suffix):
            return ctype
    return "text/plain; charset=utf-8" if name == SUMS_NAME else "application/octet-stream"


def parse_sums(text: str) -> Dict[str, str]:
    """``name -> sha256`` of a ``sha256sum`` listing; lines that are not a plain file name of
    this directory (``../x``, ``a/b``, ``.hidden``) are skipped."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        found = _SUMS_LINE.match(line.rstrip("\r"))
        if not found:
            continue
        digest, name = found.group(1).lower(), found.group(2)
        if _NAME_RE.match(name) and name != SUMS_NAME and name not in SCRIPT_NAMES:
            out[name] = digest
    return out


def _sha256_fd(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    f.seek(0)
    return h.hexdigest()


class Downloads:
    """The ``/download/`` routes over one packages directory."""

    routes: List[Tuple[str, str]] = [("GET", r"^/download/$"), ("GET", r"^/download/([^/]+)$")]

    def __init__(
        self, directory: Path, scripts_dir: Path = SCRIPTS_DIR, *, spki_pin: str = "", fingerprint: str = ""
    ) -> None:
        self.directory = Path(directory)
        self.scripts_dir = Path(scripts_dir)
        self.spki_pin = spki_pin
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        #: name -> ((dev, ino, size, mtime_ns), sha256 computed for that version of the file)
        self._verified: Dict[str, Tuple[Tuple[int, int, int, int], str]] = {}

    @staticmethod
    def owns(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    # -- reading the directory -------------------------------------------------------------------
    def _sums_bytes(self) -> Optional[bytes]:
        try:
            with self._open_regular(self.directory / SUMS_NAME) as f:
                return f.read(MAX_SUMS_BYTES + 1)[:MAX_SUMS_BYTES]
        except FileNotFoundError:
            return None

    def sums(self) -> Dict[str, str]:
        raw = self._sums_bytes()
        return parse_sums(raw.decode("utf-8", "replace")) if raw is not None else {}

    @staticmethod
    def _open_regular(path: Path) -> IO[bytes]:
        """Open a regular file without following a symlink in its last component."""
        try:
            fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):  # symlink or missing: not published
                raise FileNotFoundError(str(path)) from None
            raise
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            raise FileNotFoundError(str(path))
        return f

    def _check(self, name: str, expected: str, f: IO[bytes]) -> Optional[str]:
        """None when the open file matches ``expected``, else the reason it does not."""
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._verified.get(name)
        if known is not None and known[0] == key:
            actual = known[1]
        else:
            actual = _sha256_fd(f)
            with self._lock:
                self._verified[name] = (key, actual)
        if actual == expected:
            return None
        size_note = ""
        if known is not None and known[0][2] != st.st_size:
            size_note = f"; its size changed from {known[0][2]} to {st.st_size} bytes"
        return (
            f"{name} does not match its SHA256SUMS line (sha256 {actual[:16]}..., expected "
            f"{expected[:16]}...){size_note}: publish the package and its SHA256SUMS together"
        )

    def script(self, name: str) -> bytes:
        """The install script ``name`` as served (pin and fingerprint filled in)."""
        with self._open_regular(self.scripts_dir / name) as f:
            data = f.read(MAX_SCRIPT_BYTES)
        for marker, line in _SCRIPT_FILLS.get(name, ()):
            if marker in data:
                value = line.format(pin=self.spki_pin, fingerprint=self.fingerprint).encode("ascii")
                data = data.replace(marker, value, 1)
        return data

    # -- answers -------------------------------------------------------------------------------
    def index(self) -> Dict[str, Any]:
        packages: List[Dict[str, Any]] = []
        doc: Dict[str, Any] = {"packages": packages, "sums_url": f"{PREFIX}/{SUMS_NAME}"}
        raw = self._sums_bytes() if self.directory.is_dir() else None
        if raw is None:
            doc["sums_url"] = None
            doc["message"] = (
                "no packages are published on this server: its packages directory has no SHA256SUMS "
                "(build them with packaging/build.py and copy dist/* into the directory given to "
                "go2cloud_server serve --packages)"
            )
        for name, digest in sorted(parse_sums(raw.decode("utf-8", "replace")).items() if raw else []):
            entry: Dict[str, Any] = {"name": name, "sha256": digest, "size": None,
                                     "url": f"{PREFIX}/{name}", "error": None}
            try:
                with self._open_regular(self.directory / name) as f:
                    entry["size"] = os.fstat(f.fileno()).st_size
                    entry["error"] = self._check(name, digest, f)
            except FileNotFoundError:
                entry["error"] = f"{name} is listed in SHA256SUMS but missing from the packages directory"
            except OSError as exc:
                entry["error"] = f"{name} cannot be read: {exc.strerror or exc}"
            packages.append(entry)
        scripts: List[Dict[str, Any]] = []
        for n in SCRIPT_NAMES:
            try:
                data = self.script(n)
            except FileNotFoundError:
                continue
            scripts.append({"name": n, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "url": f"{PREFIX}/{n}"})
        doc["scripts"] = scripts
        return doc

    def open(self, method: str, path: str) -> Any:
        """The answer to a request under /download: a :class:`Download` to stream or the index
        (a dict). Raises NotFound for anything that is not published."""
        if method != "GET":
            raise InvalidInput(f"method {method} not allowed on {path}")
        if path in (PREFIX, PREFIX + "/"):
            return self.index()
        name = path[len(PREFIX) + 1:]
        if not _NAME_RE.match(name):
            raise NotFound(f"no such download: {name[:80]!r}")
        try:
            if name in SCRIPT_NAMES:
                data = self.script(name)
                return Download(name, io.BytesIO(data), len(data), content_type(name))
            if name == SUMS_NAME:
                f = self._open_regular(self.directory / SUMS_NAME)
            else:
                expected = self.sums().get(name)
                if expected is None:
                    raise NotFound(f"no such download: {name} (see {PREFIX}/ for the published files)")
                f = self._open_regular(self.directory / name)
                problem = self._check(name, expected, f)
                if problem:
                    f.close()
                    log.warning("refusing to serve %s: %s", name, problem)
                    raise PackageMismatch(problem)
        except FileNotFoundError:
            raise NotFound(f"no such download: {name} (see {PREFIX}/ for the published files)") from None
        return Download(name, f, os.fstat(f.fileno()).st_size, content_type(name))

    def describe(self) -> str:
        """One line for the server log at startup."""
        if not self.directory.is_dir():
            return f"no packages directory {self.directory}: /download/ serves only the install scripts"
        names = sorted(self.sums())
        if not names:
            return f"{self.directory} has no SHA256SUMS: /download/ serves only the install scripts"
        return f"serving {len(names)} package(s) from {self.directory}: {', '.join(names)}"
