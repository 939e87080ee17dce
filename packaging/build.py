#!/usr/bin/env python3
"""Build the agent packages (packaging/README.md).

    python3 packaging/build.py [--out dist] [--work build/pyinstaller] [--force] [--no-windows]

Writes, in ``--out``:

- ``go2cloud_client_linux_x86_64.tar.gz``: folder ``go2cloud_client_linux_x86_64/`` with the
  one-file ``go2cloud_client`` executable (PyInstaller, then staticx: it carries the loader and
  the C library and needs no glibc on the host), ``Excludes/rsync_excludes_linux.txt``,
  ``config.yaml.example``, ``README.txt``, ``LICENSE``, ``VERSION`` and ``KERNEL`` (the oldest
  Linux kernel the executable runs on, measured at each build; install.sh checks it);
- ``go2cloud_client_windows_x86_64.zip``: folder ``go2cloud_client_windows_x86_64/`` with
  ``go2cloud_client.pyz`` (zipapp of the pure-Python agent), ``install.ps1``,
  ``Excludes/``, ``config.yaml.example``, ``README.txt``, ``LICENSE`` and ``VERSION``;
- ``SHA256SUMS`` (``sha256sum`` format) of both.

The PyInstaller run is cached: its inputs (agent and snapshot-driver sources, the spec, the entry
script, the Python and dependency versions) are hashed, and when ``<work>/stamp`` holds the same
hash the executable from the previous run is reused. Archives are deterministic apart from the
executable itself: sorted entries, owner root:root, one fixed mtime (``SOURCE_DATE_EPOCH``, else
the time of the newest input file).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEC = HERE / "go2cloud_client.spec"
ENTRY = HERE / "entry.py"
FILES = HERE / "files"
LINUX_NAME = "go2cloud_client_linux_x86_64"
WINDOWS_NAME = "go2cloud_client_windows_x86_64"
EXCLUDES = ROOT / "go2cloud_client" / "data" / "Excludes" / "rsync_excludes_linux.txt"
INSTALL_PS1 = ROOT / "go2cloud_server" / "data" / "install.ps1"
LICENSE = ROOT / "LICENSE"
#: Python distributions frozen into the executable (their versions are part of the cache key).
FROZEN_DISTS = ("pyinstaller", "staticx", "click", "requests", "psutil", "pyyaml", "cryptography", "tenacity",
                "xxhash", "zstandard", "blake3", "urllib3", "certifi", "idna", "charset-normalizer")
#: Packages of the zipapp (pure Python; the Windows Python brings the dependencies).
PYZ_PACKAGES = ("go2cloud_client", "snapshot_driver")


def log(msg: str) -> None:
    print(f"build: {msg}", flush=True)


def agent_version() -> str:
    text = (ROOT / "go2cloud_client" / "__init__.py").read_text()
    found = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not found:
        raise SystemExit("build: no __version__ in go2cloud_client/__init__.py")
    return found.group(1)


def _source_files() -> List[Path]:
    out: List[Path] = []
    for pkg in PYZ_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                out.append(path)
    return out + [SPEC, ENTRY, Path(__file__).resolve()]


def input_hash() -> Tuple[str, float]:
    """Hash of everything the PyInstaller run depends on, and the newest mtime among the files."""
    h = hashlib.sha256()
    newest = 0.0
    for path in _source_files():
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
        newest = max(newest, path.stat().st_mtime)
    h.update(sys.version.encode() + platform.machine().encode())
    for dist in FROZEN_DISTS:
        try:
            h.update(f"{dist}={metadata.version(dist)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-\n".encode())
    return h.hexdigest(), newest


@contextlib.contextmanager
def work_lock(work: Path) -> Iterator[None]:
    """One build at a time per work directory (test sessions may build concurrently)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_executable(work: Path, force: bool) -> Path:
    """The packaged executable, rebuilt only when the inputs changed: PyInstaller's one-file
    program (``<work>/dist/go2cloud_client``, dynamically linked against this host's glibc)
    wrapped by staticx into ``<work>/dist/static/go2cloud_client``, which carries the loader
    and the C library as well and runs without the host's glibc."""
    digest, _ = input_hash()
    dynamic = work / "dist" / "go2cloud_client"
    exe = work / "dist" / "static" / "go2cloud_client"
    stamp = work / "stamp"
    if not force and exe.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        log(f"executable up to date ({exe}, inputs {digest[:12]})")
        return exe
    try:
        import PyInstaller  # noqa: F401
        import staticx  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"build: {exc.name} is not installed: pip install -e '.[test]'") from None
    if shutil.which("patchelf") is None:
        raise SystemExit("build: patchelf not found (apt-get install patchelf): the spec and "
                         "staticx need it")
    work.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    started = time.monotonic()
    log("running PyInstaller (log: " + str(work / "pyinstaller.log") + ")")
    with open(work / "pyinstaller.log", "wb") as out:
        rc = subprocess.call(
            [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
             "--distpath", str(work / "dist"), "--workpath", str(work / "work"), str(SPEC)],
            cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0 or not dynamic.is_file():
        tail = (work / "pyinstaller.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"build: PyInstaller failed (exit {rc}):\n{tail}")
    log(f"PyInstaller done in {time.monotonic() - started:.0f} s; running staticx")
    started = time.monotonic()
    exe.parent.mkdir(parents=True, exist_ok=True)
    with open(work / "staticx.log", "wb") as out:
        # --no-compress: PyInstaller's contents are compressed already; xz over them saves 2.5 MB
        # but costs about 0.45 s of CPU at every start (docs/performance.md, "Executable startup"),
        # and rsync starts the executable anew for every path of every cycle (rsync-tunnel)
        rc = subprocess.call([sys.executable, "-m", "staticx", "--no-compress", "--loglevel", "INFO",
                              str(dynamic), str(exe)],
                             cwd=str(work), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0 or not exe.is_file():
        tail = (work / "staticx.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"build: staticx failed (exit {rc}):\n{tail}")
    stamp.write_text(digest + "\n")
    log(f"staticx done in {time.monotonic() - started:.0f} s")
    return exe


# -- minimum kernel ----------------------------------------------------------------------------

_ABI_RE = re.compile(r"OS: Linux, ABI: (\d+)\.(\d+)\.(\d+)")


def _kernel_needs(path: Path) -> Optional[Tuple[int, ...]]:
    """The Linux version in an ELF file's NT_GNU_ABI_TAG note (``readelf -n``), None if none."""
    try:
        out = subprocess.run(["readelf", "-n", "--", str(path)], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=False).stdout
    except FileNotFoundError:
        raise SystemExit("build: readelf not found (apt-get install binutils)") from None
    found = _ABI_RE.search(out)
    return tuple(int(g) for g in found.groups()) if found else None


def kernel_report(exe: Path, work: Path) -> Tuple[str, List[Tuple[str, str]]]:
    """The oldest Linux kernel the executable runs on: the highest ABI tag over the files staticx
    bundled (the loader and C library refuse to start on an older kernel: "FATAL: kernel too
    old"). Returns ("x.y.z", [(file, version), ...] sorted newest first)."""
    rows: List[Tuple[Tuple[int, ...], str]] = []
    with tempfile.TemporaryDirectory(dir=str(work)) as tmp:
        # staticx's archive is an xz-compressed tar in the ELF section .staticx.archive
        archive = Path(tmp) / "archive.tar.xz"
        rc = subprocess.call(["objcopy", "--dump-section", f".staticx.archive={archive}", str(exe),
                              str(Path(tmp) / "discard")], stdin=subprocess.DEVNULL)
        if rc != 0 or not archive.is_file():
            raise SystemExit(f"build: {exe} has no staticx archive (objcopy exit {rc})")
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                data = src.read()
                if data[:4] != b"\x7fELF":
                    continue
                path = Path(tmp) / "elf"
                path.write_bytes(data)
                need = _kernel_needs(path)
                if need:
                    rows.append((need, member.name))
    rows.sort(reverse=True)
    fmt = [(name, ".".join(map(str, ver))) for ver, name in rows]
    if not fmt:
        raise SystemExit(f"build: no file bundled in {exe} carries a Linux ABI tag")
    return fmt[0][1], fmt


# -- archives ----------------------------------------------------------------------------------

class Entry:
    def __init__(self, name: str, data: Optional[bytes], mode: int) -> None:
        self.name = name  # relative to the package folder; data None = directory
        self.data = data
        self.mode = mode


def _with_dirs(entries: List[Entry]) -> List[Entry]:
    dirs = {""}
    for e in entries:
        parts = e.name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    out = [Entry(d, None, 0o755) for d in dirs]
    return sorted(out + entries, key=lambda e: e.name)


def write_tar_gz(path: Path, folder: str, entries: List[Entry], mtime: int) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for e in _with_dirs(entries):
            info = tarfile.TarInfo(f"{folder}/{e.name}".rstrip("/"))
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            if e.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=mtime,
                                             compresslevel=9) as gz:
        gz.write(raw.getvalue())
    os.replace(tmp, path)


def _zip_info(name: str, mode: int, mtime: int, is_dir: bool = False) -> zipfile.ZipInfo:
    stamp = time.gmtime(max(mtime, 315532800))  # zip dates start in 1980
    info = zipfile.ZipInfo(name, date_time=stamp[:6])
    info.create_system = 3  # unix, so the modes below are kept
    info.external_attr = ((0o040000 if is_dir else 0o100000) | mode) << 16
    if is_dir:
        info.external_attr |= 0x10
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def write_zip(path: Path, folder: str, entries: List[Entry], mtime: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for e in _with_dirs(entries):
            name = f"{folder}/{e.name}".rstrip("/")
            if e.data is None:
                zf.writestr(_zip_info(name + "/", e.mode, mtime, is_dir=True), b"")
            else:
                zf.writestr(_zip_info(name, e.mode, mtime), e.data)
    os.replace(tmp, path)


def build_pyz(mtime: int) -> bytes:
    """Zipapp of the agent: ``python go2cloud_client.pyz ...`` runs the CLI."""
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(_zip_info("__main__.py", 0o644, mtime),
                    (ROOT / "go2cloud_client" / "__main__.py").read_bytes())
        for path in _source_files():
            rel = path.relative_to(ROOT)
            if rel.parts[0] not in PYZ_PACKAGES:
                continue
            zf.writestr(_zip_info(rel.as_posix(), 0o644, mtime), path.read_bytes())
    return buf.getvalue()


def _common_files() -> Dict[str, Tuple[bytes, int]]:
    if not LICENSE.is_file():
        raise SystemExit(f"build: {LICENSE} is missing")
    return {
        "Excludes/rsync_excludes_linux.txt": (EXCLUDES.read_bytes(), 0o644),
        "config.yaml.example": ((FILES / "config.yaml.example").read_bytes(), 0o644),
        "LICENSE": (LICENSE.read_bytes(), 0o644),
        "VERSION": ((agent_version() + "\n").encode(), 0o644),
    }


def linux_entries(exe: Path, kernel: str) -> List[Entry]:
    """The Linux package; ``KERNEL`` holds the oldest Linux kernel the executable runs on
    (install.sh compares it with the host's before it installs anything)."""
    files = _common_files()
    files["go2cloud_client"] = (exe.read_bytes(), 0o755)
    files["KERNEL"] = ((kernel + "\n").encode(), 0o644)
    files["README.txt"] = ((FILES / "README-linux.txt").read_bytes(), 0o644)
    return [Entry(name, data, mode) for name, (data, mode) in files.items()]


def windows_entries(mtime: int) -> List[Entry]:
    files = _common_files()
    files["go2cloud_client.pyz"] = (build_pyz(mtime), 0o644)
    files["install.ps1"] = (INSTALL_PS1.read_bytes(), 0o644)
    files["README.txt"] = ((FILES / "README-windows.txt").read_bytes().replace(b"\r\n", b"\n")
                           .replace(b"\n", b"\r\n"), 0o644)
    return [Entry(name, data, mode) for name, (data, mode) in files.items()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(out: Path, names: Iterable[str]) -> None:
    lines = "".join(f"{sha256_file(out / n)}  {n}\n" for n in sorted(names))
    (out / "SHA256SUMS").write_text(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the go2cloud_client packages.")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory (default dist/)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "pyinstaller",
                        help="PyInstaller work and cache directory (default build/pyinstaller/)")
    parser.add_argument("--force", action="store_true",
                        help="run PyInstaller even if the inputs did not change")
    parser.add_argument("--no-windows", action="store_true", help="build only the Linux package")
    args = parser.parse_args(argv)
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit("build: the Linux package is built on Linux x86_64 "
                         "(the Windows executable: packaging/windows/build.ps1)")
    started = time.monotonic()
    out: Path = args.out.absolute()
    work: Path = args.work.absolute()
    out.mkdir(parents=True, exist_ok=True)
    _, newest = input_hash()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or newest)

    with work_lock(work):
        exe = build_executable(work, args.force)
        kernel, rows = kernel_report(exe, work)
        lines = "".join(f"{v}\t{n}\n" for n, v in rows)
        (work / "kernel.txt").write_text(f"oldest kernel: {kernel}\n{lines}")
        log(f"oldest Linux kernel: {kernel} ({rows[0][0]}; details in {work / 'kernel.txt'})")
        linux = linux_entries(exe, kernel)

    names = [LINUX_NAME + ".tar.gz"]
    write_tar_gz(out / names[0], LINUX_NAME, linux, mtime)
    if not args.no_windows:
        names.append(WINDOWS_NAME + ".zip")
        write_zip(out / names[1], WINDOWS_NAME, windows_entries(mtime), mtime)
    write_sums(out, names)
    for n in names:
        log(f"{out / n} ({(out / n).stat().st_size / 1e6:.1f} MB)")
    log(f"{out / 'SHA256SUMS'}; done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
