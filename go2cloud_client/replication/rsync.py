"""File-level replication with real rsync, one rsync run per selected path.

Command line (built by :meth:`FileReplicator.build_args`)::

    rsync -aHAXS --numeric-ids --one-file-system --no-inc-recursive --info=progress2 --stats
          --partial --timeout=N [--delete] [--modify-window=-1]
          [--compress-choice=zstd --compress-level=Z | --compress --compress-level=N]
          [--checksum] [--bwlimit=KIB] [--mkpath]
          --filter='merge FILTER' [--link-dest=REL] -e 'AGENT rsync-tunnel'
          -- /src/path/ USER@go2cloud::MODULE/DEST/src/path/

Choices (see also DESIGN section 5):

* **Transport.** The target has no rsync listener: rsync's remote shell is this agent
  (``go2cloud_client.replication.tunnel``), which carries the rsync daemon protocol inside TLS
  to the control plane's HTTPS port, pinned like the API. Per-run settings (URL, pin, cycle,
  path) reach it in the environment.
* **Timeouts.** ``--timeout=N`` (``rsync_timeout_s``, default 120 s): a connection that stops
  moving data (a stall, a black-holed route) ends the run with exit 30 instead of hanging; the
  tunnel bounds its own connect and TLS handshake (``tunnel.CONNECT_TIMEOUT_S``). ``--contimeout``
  applies to rsync's own daemon sockets only, not to a remote-shell transport like ours.
* **Partial files** stay under their own name (``--partial``): the target refuses
  ``--partial-dir`` (a source could name a directory outside its cycle with it).

* **Totals.** ``--no-inc-recursive`` makes rsync build the whole file list before it transfers,
  so hard links are matched across the whole tree and rsync's own percentage refers to a fixed
  total. ``bytes_total`` of a path is first an estimate from a quick local scan (same file
  system, shipped/operator exclusions approximated) that runs while rsync works, and becomes
  rsync's exact ``Total file size`` when the path finishes. ``bytes_done`` is what rsync reports
  as transferred (changed files only: an incremental cycle over an unchanged tree finishes far
  below its total, then jumps to done). ``bytes_sent`` is the file data sent while running and
  rsync's exact "Total bytes sent" (wire bytes, after compression) once the path is finished.
* **Compression** 0-10 (0: no compression option at all) means what it means in block mode, one
  map for both (:mod:`go2cloud_client.replication.levels`): the default 7 is zstd level 1, which
  compresses text about as well as zstd 3 for half the CPU (rsync's own default for ``-z`` is zstd
  3; the console's 7 passed through as ``--compress-level=7`` made a LAN full pass 2x slower than
  plain rsync over ssh). When the agent's rsync lists zstd in ``rsync --version`` (3.2.0 and later,
  built with libzstd) the arguments are ``--compress-choice=zstd --compress-level=Z`` with ``Z``
  from ``levels.ZSTD_LEVELS`` (negative levels included: zstd's fast levels; rsync(1) of 3.5
  gives zstd's range as -131072..22 and clamps values outside it silently). Otherwise, and when
  the target's rsync refused zstd, ``--compress --compress-level=N`` with ``N`` from
  ``levels.ZLIB_LEVELS`` (1..9, valid for rsync 3.1.x, which has neither zstd nor
  ``--compress-choice``, and for newer rsync, which then negotiates what both sides have).
  The target's rsync is not known before the first run: a run whose target refuses
  ``--compress-choice=zstd`` (a daemon without zstd says "Your --compress-choice value (zstd) was
  refused by the server", one that refuses the option "The server is configured to refuse
  --compress-choice", rsync 3.1.x rejects the option as unknown, naming it) is run again at once
  with the zlib arguments, and the agent remembers that target (its host:port) until it restarts.
  rsync compresses a whole run at one level; the level does not adapt per cycle (see
  docs/performance.md, "Issue 16: file level at rsync speed", for why it is not needed).
* **Bandwidth** Mbit/s -> ``--bwlimit`` in rsync's unit, KiB/s (1024 bytes): 1 Mbit/s =
  125,000 B/s = 122.07 KiB/s; rounded down (at least 1) so the limit is never exceeded.
* **Destination parents.** rsync does not create missing parents of the destination. With
  rsync >= 3.2.3 we pass ``--mkpath``; with older rsync an empty-directory transfer creates the
  parents first.
* **Time stamps.** ``--modify-window=-1`` (rsync >= 3.1.3) makes rsync compare and preserve
  mtimes to the nanosecond. Without it a directory or symlink whose mtime falls in the same second
  in which rsync creates it on the target keeps the target's creation time (seen with 3.5.0).
* **Secrets.** The password reaches rsync and the tunnel only as ``RSYNC_PASSWORD`` in the child
  environment.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

from go2cloud_client import subp
from go2cloud_client.clock import utc_now
from go2cloud_client.errors import ProxyRefusedError, ReplicationError, RsyncMissingError
from go2cloud_client.proxy import ProxyURL
from go2cloud_client.replication import excludes as excludes_mod
from go2cloud_client.replication import levels, tunnel
from go2cloud_client.replication.base import CycleResult, PathProgress, Progress, TransferCancelled
from go2cloud_client.replication.progress import StatsParser, parse_progress

LOG = logging.getLogger(__name__)

#: the host part of rsync's ``USER@HOST::MODULE`` (the tunnel knows the real address)
TUNNEL_HOST = "go2cloud"
PROGRESS_INTERVAL = 0.5
#: progress lines closer together than this are skipped (the totals come from --stats at the end)
PARSE_INTERVAL = 0.1
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CYCLE_DIR_RE = re.compile(r"^[0-9]{6}$")
#: rsync ``--timeout`` by default: no data moved for this long stops the run (exit 30), which
#: is then retried; it works through the remote-shell tunnel (rsync times its own pipe I/O).
DEFAULT_IO_TIMEOUT_S = 120
#: rsync exit codes that mean "network, daemon or authentication trouble": retry later.
RETRYABLE_CODES = {5: "error starting the client-server protocol (wrong password or module?)",
                   10: "error in socket I/O", 12: "error in the rsync protocol data stream",
                   30: "timeout in data send/receive", 35: "timeout waiting for the daemon connection"}


#: what rsync says when the target's rsync will not use ``--compress-choice=zstd`` (real messages:
#: a daemon without zstd, a daemon refusing the option, rsync 3.1.x that does not know it)
_ZSTD_REFUSED_RE = re.compile(r"--compress-choice")
#: targets (``host:port``) whose rsync refused zstd: the agent's later runs there use zlib
_ZSTD_REFUSED: Set[str] = set()


class RsyncPartialTransferError(ReplicationError):
    """rsync exit 23: some files could not be transferred (the message names them)."""

    code = "rsync_partial_transfer"
    summary = "rsync could not transfer some files (unreadable, permissions, I/O errors)"
    retryable = False


class RsyncVanishedError(ReplicationError):
    """rsync exit 24 on every pass: files keep disappearing while they are copied."""

    code = "rsync_files_vanishing"
    summary = "files kept vanishing during every rsync pass"
    retryable = True


class RsyncConnectionError(ReplicationError):
    """rsync exit 5/10/12/30/35: the target could not be reached or refused us."""

    code = "rsync_connection_failed"
    summary = "rsync could not connect to or authenticate with the target"
    retryable = True


#: what rsync (the receiver on the target) or the tunnel says when the target is full: the cycle
#: fails with ``target_full`` (not retried at once: the control plane resumes it when there is room)
_TARGET_FULL_RE = re.compile(r"No space left on device|Disk quota exceeded|\(HTTP 507\)|target_full")


#: the tunnel's line when the target answered the session request with an HTTP error before the
#: upgrade (tunnel.open_stream); rsync then exits with whatever its version makes of a remote
#: shell that died before the greeting (5, 12, 255...), so the line, not the exit code, decides
_REFUSED_RE = re.compile(r"the target refused the rsync session \(HTTP (\d{3})\): ?(.*)")
#: the tunnel's line when the agent's proxy refused CONNECT (go2cloud_client.proxy.refused)
_PROXY_REFUSED_RE = re.compile(r"(the proxy \S+ refused the connection to \S+ \(HTTP (\d{3}).*)")


@dataclass(frozen=True)
class RsyncTarget:
    """The task's rsync module behind the control plane's HTTPS port (``url`` is
    ``https://HOST:PORT/rsync/v1/tasks/<task>``, ``fingerprint`` the pinned certificate)."""

    url: str
    fingerprint: str
    module: str
    user: str
    password: str = field(repr=False)
    #: the agent's session epoch (``X-Go2cloud-Epoch`` of the rsync session; 0: none)
    epoch: int = 0
    #: the agent's proxy for the target's host (None: direct)
    proxy: Optional[ProxyURL] = None

    def __repr__(self) -> str:
        return (f"RsyncTarget(url={self.url!r}, module={self.module!r}, user={self.user!r}, "
                "password='***')")

    @property
    def where(self) -> str:
        return urlsplit(self.url).netloc

    def spec(self, subpath: str = "") -> str:
        """rsync's destination argument for ``subpath`` of the module (through the tunnel)."""
        return f"{self.user}@{TUNNEL_HOST}::{self.module}/{subpath}"


@dataclass(frozen=True)
class TransferOptions:
    bandwidth_mbps: int = 0
    compression: int = 7
    checksum: bool = False


@dataclass(frozen=True)
class Cycle:
    number: int
    dest: str
    link_dest: Optional[str]
    incremental: bool




def find_rsync() -> Optional[str]:
    """Absolute path of rsync on PATH (or in the usual places), None if not installed."""
    found = shutil.which("rsync")
    if found:
        return found
    for candidate in ("/usr/bin/rsync", "/bin/rsync", "/usr/local/bin/rsync"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class RsyncCapabilities:
    """What one rsync binary can do, from ``rsync --version``."""

    version: Tuple[int, int, int]
    #: the "Compress list" (3.2.0 and later; empty for older rsync, which knows only zlib)
    compressors: Tuple[str, ...] = ()

    @property
    def has_compress_choice(self) -> bool:
        return self.version >= (3, 2, 0)

    @property
    def has_zstd(self) -> bool:
        return self.has_compress_choice and "zstd" in self.compressors


_CAPABILITIES: Dict[Tuple[str, int, int], RsyncCapabilities] = {}


def rsync_capabilities(rsync_path: str = "rsync") -> RsyncCapabilities:
    """Version and compressors from ``rsync --version``; RsyncMissingError if it cannot run.
    Remembered per binary (path, inode, mtime): every cycle asks, and an upgraded rsync is a new
    file."""
    resolved = shutil.which(rsync_path) or rsync_path
    try:
        st = os.stat(resolved)
        key: Optional[Tuple[str, int, int]] = (resolved, st.st_ino, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _CAPABILITIES:
        return _CAPABILITIES[key]
    caps = _read_capabilities(rsync_path)
    if key is not None:
        _CAPABILITIES[key] = caps
    return caps


def rsync_version(rsync_path: str = "rsync") -> Tuple[int, int, int]:
    """(major, minor, patch) from ``rsync --version`` (see :func:`rsync_capabilities`)."""
    return rsync_capabilities(rsync_path).version


def _read_capabilities(rsync_path: str) -> RsyncCapabilities:
    try:
        out = subp.run([rsync_path, "--version"], timeout=30).stdout
    except subp.ProcessError as exc:
        raise RsyncMissingError(
            f"rsync is not usable ({exc}): re-run with --yes to install it, or install the "
            "'rsync' package with your package manager") from exc
    return parse_capabilities(out)


def parse_version(text: str) -> Tuple[int, int, int]:
    m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise RsyncMissingError("cannot read the version of rsync from 'rsync --version'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


_COMPRESS_LIST_RE = re.compile(r"^\s*Compress list:[ \t]*\n?[ \t]*([^\n]*)", re.MULTILINE)


def parse_capabilities(text: str) -> RsyncCapabilities:
    """:class:`RsyncCapabilities` from the output of ``rsync --version`` (3.2.0 and later print
    the compressors on the line after ``Compress list:``)."""
    version = parse_version(text)
    m = _COMPRESS_LIST_RE.search(text)
    names = tuple(m.group(1).split()) if m else ()
    return RsyncCapabilities(version, names)


def bwlimit_kib(mbps: int) -> int:
    """Mbit/s -> rsync --bwlimit value in KiB/s (rounded down, at least 1); 0 = unlimited."""
    if mbps <= 0:
        return 0
    return max(1, (mbps * 125_000) // 1024)


def compression_args(level: int, caps: RsyncCapabilities, zstd: bool = True) -> List[str]:
    """rsync's compression options for console ``level`` 0-10 (see the module docstring):
    zstd at ``levels.ZSTD_LEVELS`` when ``caps`` has it and ``zstd`` (the target did not refuse
    it), else zlib at ``levels.ZLIB_LEVELS``; none for 0."""
    if levels.check(level) == 0:
        return []
    if zstd and caps.has_zstd:
        return ["--compress-choice=zstd", f"--compress-level={levels.ZSTD_LEVELS[level]}"]
    return ["--compress", f"--compress-level={levels.ZLIB_LEVELS[level]}"]


def dest_subpath(cycle_dir: str, path: str) -> str:
    """Module-relative destination directory of source ``path`` in cycle ``cycle_dir``."""
    rel = path.strip("/")
    return f"{cycle_dir}/{rel}/" if rel else f"{cycle_dir}/"


def link_dest_arg(cycle: Cycle, path: str) -> Optional[str]:
    """``--link-dest`` value: relative path from the destination dir to the same path under
    ``cycle.link_dest`` (rsync resolves a relative --link-dest against the destination dir)."""
    if not cycle.link_dest:
        return None
    parts = [p for p in path.strip("/").split("/") if p]
    return "/".join([".."] * (len(parts) + 1) + [cycle.link_dest] + parts)


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def failed_paths(stderr: str) -> List[str]:
    """Paths named in rsync's per-file error messages, in order, without duplicates."""
    out: List[str] = []
    for line in stderr.splitlines():
        low = line.lower()
        if not (low.startswith("rsync:") or low.startswith("file has vanished") or "failed" in low):
            continue
        if low.startswith("rsync error:"):
            continue
        m = _QUOTED.search(line)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def _check_path(path: str) -> str:
    if not path.startswith("/") or "\x00" in path or "\n" in path:
        raise ValueError(f"invalid source path {path!r}: must be absolute without NUL or newline")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm != path.rstrip("/") and not (path == "/" and norm == "/"):
        raise ValueError(f"invalid source path {path!r}: not normalised")
    if ".." in norm.split("/"):
        raise ValueError(f"invalid source path {path!r}: contains '..'")
    return norm


class _PathRun:
    """Live state of one rsync run (shared between the reader thread and the caller)."""

    def __init__(self, progress: PathProgress) -> None:
        self.progress = progress
        self.stats = StatsParser()
        self.parsed_at = 0.0  # when a progress line was last parsed (monotonic)


class FileReplicator:
    """Replicates ``paths`` into an rsync daemon module, one cycle at a time.

    Not thread-safe: one :meth:`run_cycle` at a time. ``on_progress`` is called from the rsync
    output reader thread (at most every ~0.5 s) and on every path transition.
    """

    def __init__(
        self,
        *,
        target: RsyncTarget,
        paths: Sequence[str],
        options: TransferOptions,
        excludes_file: Path,
        work_dir: Path,
        rsync_path: str = "rsync",
        on_progress: Callable[[Progress], None] = lambda p: None,
        max_passes: int = 5,
        on_child: Callable[[Optional[int]], None] = lambda pid: None,
        version: Optional[Tuple[int, int, int]] = None,
        capabilities: Optional[RsyncCapabilities] = None,
        estimate_totals: bool = True,
        tunnel_executable: Optional[str] = None,
        io_timeout_s: int = DEFAULT_IO_TIMEOUT_S,
    ) -> None:
        for kind, value in (("module", target.module), ("user", target.user)):
            if not _NAME_RE.match(value):
                raise ValueError(f"invalid rsync {kind} {value!r}")
        try:
            tunnel.check_url(target.url)
        except tunnel.TunnelError as exc:
            raise ValueError(str(exc)) from None
        levels.check(options.compression)
        if options.bandwidth_mbps < 0:
            raise ValueError("bandwidth_mbps must be >= 0")
        if not paths:
            raise ValueError("no paths to replicate")
        self.target = target
        self.paths = [_check_path(p) for p in paths]
        self.options = options
        self.excludes_file = Path(excludes_file)
        self.work_dir = Path(work_dir)
        self.rsync_path = rsync_path
        self.on_progress = on_progress
        self.max_passes = max(1, max_passes)
        self.on_child = on_child
        # a version without capabilities (tests, callers that know only the version): no zstd
        if capabilities is None and version is not None:
            capabilities = RsyncCapabilities(version)
        self._caps = capabilities
        self.estimate_totals = estimate_totals
        self.tunnel_executable = tunnel_executable
        if io_timeout_s < 1:
            raise ValueError("io_timeout_s must be >= 1")
        self.io_timeout_s = int(io_timeout_s)
        self._lock = threading.Lock()
        self._last_emit = 0.0
        self._progress: List[PathProgress] = []
        self._exact: Set[int] = set()  # id() of the paths' progress whose total rsync knows

    # -- arguments -------------------------------------------------------------------------------
    @property
    def capabilities(self) -> RsyncCapabilities:
        if self._caps is None:
            self._caps = rsync_capabilities(self.rsync_path)
        return self._caps

    @property
    def version(self) -> Tuple[int, int, int]:
        return self.capabilities.version

    @property
    def has_mkpath(self) -> bool:
        return self.version >= (3, 2, 3)

    @property
    def filter_file(self) -> Path:
        return self.work_dir / "rsync-filter"

    def build_args(self, cycle: Cycle, path: str) -> List[str]:
        """The rsync argument list for one path of ``cycle`` (no secrets in it)."""
        bad_link = cycle.link_dest is not None and not _CYCLE_DIR_RE.match(cycle.link_dest)
        if not _CYCLE_DIR_RE.match(cycle.dest) or bad_link:
            raise ValueError("cycle dest and link_dest must be six-digit directory names")
        opts = self.options
        args = [self.rsync_path, "-aHAXS", "--numeric-ids", "--one-file-system", "--no-inc-recursive",
                "--info=progress2", "--stats", "--partial", f"--timeout={self.io_timeout_s}"]
        if cycle.incremental:
            args.append("--delete")
        args += compression_args(opts.compression, self.capabilities,
                                 zstd=self.target.where not in _ZSTD_REFUSED)
        if opts.checksum:
            args.append("--checksum")
        kib = bwlimit_kib(opts.bandwidth_mbps)
        if kib:
            args.append(f"--bwlimit={kib}")
        if self.version >= (3, 1, 3):
            # compare and set mtimes to the nanosecond; with the default (whole seconds) rsync
            # leaves a directory or symlink created in the same second as its source's mtime
            # with the target's creation time
            args.append("--modify-window=-1")
        if self.has_mkpath:
            args.append("--mkpath")
        args.append(f"--filter=merge {self.filter_file}")
        link = link_dest_arg(cycle, path)
        if link:
            args.append(f"--link-dest={link}")
        src = path.rstrip("/") + "/"
        args += ["-e", tunnel.command(self.tunnel_executable), "--", src,
                 self.target.spec(dest_subpath(cycle.dest, path))]
        return args

    def _env(self, cycle: int, path: str) -> Dict[str, str]:
        extra = tunnel.tunnel_env(self.target.url, self.target.fingerprint, cycle, path, self.target.epoch,
                                  self.target.proxy, self.io_timeout_s)
        extra["RSYNC_PASSWORD"] = self.target.password
        env = subp.child_env(extra=extra)
        if getattr(sys, "frozen", False):
            # the tunnel is this one-file executable started anew by rsync: it must unpack its
            # own files, not look for the ones of whichever process started the agent (PyInstaller)
            env = {k: v for k, v in env.items() if not k.startswith(("_PYI_", "_MEIPASS"))}
            env["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
        return env

    # -- progress --------------------------------------------------------------------------------
    def snapshot(self) -> Progress:
        with self._lock:
            paths = [PathProgress(**vars(p)) for p in self._progress]
        total = sum(p.bytes_total for p in paths)
        done = sum(p.bytes_done for p in paths)
        sent = sum(p.bytes_sent for p in paths)
        running = [p for p in paths if p.state == "running"]
        rate = sum(p.rate_bps for p in running)
        eta: Optional[float] = None
        if rate > 0:
            eta = max(0.0, (total - done) / rate)
        elif paths and all(p.state == "done" for p in paths):
            eta = 0.0
        return Progress(total, done, sent, rate, eta, paths)

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_emit < PROGRESS_INTERVAL:
            return
        self._last_emit = now
        try:
            self.on_progress(self.snapshot())
        except Exception:
            LOG.exception("progress callback failed")

    def _on_line(self, run: _PathRun, line: str) -> None:
        if line.startswith(" "):  # a progress line: rsync writes one per file, the latest will do
            now = time.monotonic()
            if now - run.parsed_at < PARSE_INTERVAL:
                return
            run.parsed_at = now
        elif run.stats.feed(line):
            return
        parsed = parse_progress(line)
        if parsed is None:
            return
        with self._lock:
            p = run.progress
            p.bytes_done = max(p.bytes_done, parsed.bytes_done)
            p.bytes_sent = p.bytes_done
            p.rate_bps = parsed.rate_bps
            if not parsed.incremental_scan:
                # rsync has its whole file list: the estimate's scan of this path is no use now
                self._exact.add(id(p))
            if parsed.percent >= 5 and not parsed.incremental_scan:
                # rsync's percentage is of the path's total file size (fixed: no inc-recursion)
                p.bytes_total = max(p.bytes_total, parsed.bytes_done * 100 // parsed.percent)
            p.bytes_total = max(p.bytes_total, p.bytes_done)
            p.eta_s = (p.bytes_total - p.bytes_done) / p.rate_bps if p.rate_bps > 0 else parsed.eta_s
        self._emit()

    def _estimate(self, rules: List[excludes_mod.Rule], cancel: threading.Event) -> None:
        """Background scan: approximate bytes per path, until rsync reports exact numbers."""
        matcher = excludes_mod.Matcher(rules)
        for i, path in enumerate(self.paths):
            total = 0
            # a path whose rsync has built its file list needs no estimate: the scan stops there
            # rather than compete with the transfer for the source's CPU and disk
            exact = self._exact
            mine = id(self._progress[i])
            try:
                root_dev = os.lstat(path).st_dev
                stack = [""]
                while stack and not cancel.is_set() and mine not in exact:
                    rel_dir = stack.pop()
                    with os.scandir(os.path.join(path, rel_dir) if rel_dir else path) as it:
                        for entry in it:
                            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            is_dir = stat.S_ISDIR(st.st_mode)
                            if matcher.excluded(rel, is_dir):
                                continue
                            if is_dir and st.st_dev == root_dev:
                                stack.append(rel)
                            elif stat.S_ISREG(st.st_mode):
                                total += st.st_size
            except OSError:
                pass
            if cancel.is_set():
                return
            if mine in exact:
                continue
            with self._lock:
                p = self._progress[i]
                if p.state != "done":
                    p.bytes_total = max(p.bytes_total, total, p.bytes_done)

    # -- running -----------------------------------------------------------------------------------
    def _spawn(self, args: List[str], on_line: Callable[[str], None], env: Dict[str, str]
               ) -> subp.StreamingProcess:
        return subp.StreamingProcess(args, on_line=on_line, env=env)

    def _run_rsync(
        self, args: List[str], run: Optional[_PathRun], cancel: threading.Event, cycle: Cycle, path: str
    ) -> Tuple[int, str]:
        def on_line(line: str) -> None:
            if run is not None:
                self._on_line(run, line)

        LOG.debug("rsync %s", args)
        proc = self._spawn(args, on_line, self._env(cycle.number, path))
        self.on_child(proc.pid)
        exited = threading.Event()
        status: List[int] = []

        def reap() -> None:  # wakes the loop the moment rsync exits (not at the next 0.1 s tick)
            try:
                status.append(proc.wait())
            finally:
                exited.set()

        threading.Thread(target=reap, name="rsync-reaper", daemon=True).start()
        try:
            while True:
                if cancel.is_set():
                    proc.terminate()
                    proc.wait(timeout=30)
                    raise TransferCancelled("transfer cancelled")
                if exited.wait(0.1):
                    rc = status[0] if status else proc.wait(timeout=30)
                    return rc, proc.stderr
        finally:
            if proc.poll() is None:
                proc.terminate()
            self.on_child(None)

    def _make_parents(self, cycle: Cycle, path: str, cancel: threading.Event) -> None:
        """For rsync < 3.2.3: create the destination's parent directories with an empty transfer."""
        parts = [p for p in path.strip("/").split("/") if p]
        if len(parts) < 2:
            return
        with tempfile.TemporaryDirectory(dir=str(self.work_dir)) as empty:
            for depth in range(1, len(parts)):
                sub = "/".join([cycle.dest] + parts[:depth]) + "/"
                args = [self.rsync_path, "-d", f"--timeout={self.io_timeout_s}", "-e",
                        tunnel.command(self.tunnel_executable), "--", empty + "/", self.target.spec(sub)]
                rc, err = self._run_rsync(args, None, cancel, cycle, path)
                if rc != 0:
                    self._raise_for(rc, err, path)

    def _raise_for(self, rc: int, stderr: str, path: str) -> None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        full = next((line.strip() for line in stderr.splitlines() if _TARGET_FULL_RE.search(line)), None)
        if full is not None and rc != 0:
            # one error type (and code) for a full target in both modes (imported here: the block
            # package imports this module)
            from go2cloud_client.replication.block.errors import BlockTargetFullError

            raise BlockTargetFullError(
                f"the target {self.target.where} is out of space while writing {path} (rsync exit {rc}: "
                f"{full}); what it committed before is intact: free space on the target, the sync "
                "resumes", detail=stderr[-4000:])
        by_proxy = next((m for m in map(_PROXY_REFUSED_RE.search, stderr.splitlines()) if m), None)
        if by_proxy is not None and rc != 0:
            raise ProxyRefusedError(by_proxy.group(1).strip(), status=int(by_proxy.group(2)))
        refused = next((m for m in map(_REFUSED_RE.search, stderr.splitlines()) if m), None)
        if refused is not None and rc != 0:
            raise self._refusal(int(refused.group(1)), refused.group(2).strip(), path, rc)
        if rc in RETRYABLE_CODES:
            hint = RETRYABLE_CODES[rc]
            raise RsyncConnectionError(
                f"rsync of {path} to {self.target.where} failed with exit {rc} "
                f"({hint}): check that the target is reachable, the task's module exists and the "
                f"credentials are current; rsync said: {tail}")
        if rc == 23:
            failed = failed_paths(stderr)
            shown = ", ".join(failed[:5]) if failed else "(rsync named no file)"
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise RsyncPartialTransferError(
                f"rsync could not transfer {len(failed) or 'some'} file(s) of {path}: {shown}{more}; "
                f"fix the files (permissions, I/O errors) or exclude them, then sync again",
                detail=stderr[-4000:])
        raise ReplicationError(f"rsync of {path} failed with exit {rc}: {tail}", detail=stderr[-4000:])

    def _refusal(self, status: int, said: str, path: str, rc: int) -> ReplicationError:
        """The error of a session the target refused before rsync started (the tunnel's HTTP
        status): a stale epoch is fencing (not retried), anything else a connection failure that
        is retried under the budget (a 401/404 after the task's credentials or cycle changed is
        cured by the next attempt, which fetches the task again; a 5xx or 503 by waiting)."""
        said = said[:300] or "no details"
        if status == 409 and "stale_epoch" in said:
            from go2cloud_client.replication.block.errors import SessionFencedError

            return SessionFencedError(
                f"the target refused the rsync session of {path} (HTTP 409, {said}): another agent "
                "session holds this source now; if this machine was cloned, run go2cloud_client --abort "
                "on the clone (then import it again as a new source); nothing of this session was written")
        kinds = {401: "the task's rsync credentials were not accepted",
                 403: "the session was not allowed",
                 404: "the task or its cycle is not open on the target",
                 409: "the task's state does not allow it now",
                 503: "the target is busy"}
        why = kinds.get(status, "the target had an internal error" if status >= 500 else "it was invalid")
        return RsyncConnectionError(
            f"the target {self.target.where} refused the rsync session of {path} with HTTP {status} "
            f"({why}): {said}; retried automatically (rsync exit {rc})")

    def run_cycle(self, cycle: Cycle, cancel: threading.Event) -> CycleResult:
        """Run one sync cycle over all paths. Raises TransferCancelled if ``cancel`` is set,
        ReplicationError (or a subclass) on failure; returns the cycle's totals on success."""
        started = utc_now()
        rules = excludes_mod.load(self.excludes_file)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        excludes_mod.write_filter_file(rules, self.filter_file)
        with self._lock:
            self._progress = [PathProgress(path=p) for p in self.paths]
            self._exact = set()
        estimator_stop = threading.Event()
        if self.estimate_totals:
            threading.Thread(target=self._estimate, args=(rules, estimator_stop),
                             name="rsync-estimate", daemon=True).start()
        total = sent = files = 0
        passes_max = 0
        try:
            for i, path in enumerate(self.paths):
                if cancel.is_set():
                    raise TransferCancelled("transfer cancelled")
                if not self.has_mkpath:
                    self._make_parents(cycle, path, cancel)
                args = self.build_args(cycle, path)
                passes = 0
                while True:
                    passes += 1
                    run = _PathRun(self._progress[i])
                    with self._lock:
                        run.progress.state = "running"
                        run.progress.bytes_done = 0
                    self._emit(force=True)
                    LOG.info("cycle %s: rsync %s (pass %s)", cycle.number, path, passes)
                    rc, err = self._run_rsync(args, run, cancel, cycle, path)
                    if rc != 0 and "--compress-choice=zstd" in args and _ZSTD_REFUSED_RE.search(err):
                        LOG.warning("cycle %s: the target %s does not take zstd (rsync said: %s); "
                                    "compressing with zlib from now on", cycle.number, self.target.where,
                                    " | ".join(line for line in err.splitlines() if "compress" in line)[:300])
                        _ZSTD_REFUSED.add(self.target.where)
                        args = self.build_args(cycle, path)
                        passes -= 1  # nothing was transferred: not a pass
                        continue
                    if rc == 24 and passes < self.max_passes:
                        LOG.warning("cycle %s: files vanished under %s during pass %s; running another pass",
                                    cycle.number, path, passes)
                        continue
                    if rc == 24:
                        raise RsyncVanishedError(
                            f"files under {path} kept vanishing during {passes} rsync passes "
                            f"(e.g. {', '.join(failed_paths(err)[:3]) or 'unknown'}): exclude "
                            "directories with short-lived files (caches, spools) or stop the "
                            "application writing them, then sync again", detail=err[-4000:])
                    if rc != 0:
                        self._raise_for(rc, err, path)
                    break
                st = run.stats.stats
                with self._lock:
                    p = run.progress
                    p.state = "done"
                    p.bytes_total = st.total_file_size if st.total_file_size is not None else p.bytes_total
                    p.bytes_done = p.bytes_total
                    p.bytes_sent = st.bytes_sent if st.bytes_sent is not None else p.bytes_sent
                    p.rate_bps = 0.0
                    p.eta_s = 0.0
                self._emit(force=True)
                total += p.bytes_total
                sent += p.bytes_sent
                files += st.regular_files if st.regular_files is not None else (st.files or 0)
                passes_max = max(passes_max, passes)
                LOG.info("cycle %s: %s done (%s bytes, %s sent, %s passes)", cycle.number, path,
                         p.bytes_total, p.bytes_sent, passes)
        finally:
            estimator_stop.set()
        return CycleResult(cycle=cycle.number, bytes_total=total, bytes_sent=sent, files=files,
                           passes=passes_max, started_at=started, finished_at=utc_now())
