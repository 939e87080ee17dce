"""``/download/``: only names listed in SHA256SUMS (or the two scripts) are served, checked
against their line; the index is computed from SHA256SUMS and says what is wrong."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from go2cloud_server.downloads import Download, Downloads, PackageMismatch, parse_sums
from go2cloud_server.errors import InvalidInput, NotFound

DOC = Path(__file__).resolve().parents[3] / "docs" / "openapi.yaml"
PIN = "sha256//" + "Q" * 43 + "="
FP = "sha256:" + "cd" * 32
TARBALL = "go2cloud_client_linux_x86_64.tar.gz"


def _publish(directory: Path, files: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, data in files.items():
        (directory / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (directory / "SHA256SUMS").write_text("".join(sorted(lines)))


@pytest.fixture
def packages(tmp_path: Path) -> Path:
    d = tmp_path / "packages"
    _publish(d, {TARBALL: os.urandom(300_000), "go2cloud_client_windows_x86_64.zip": b"PK zip"})
    return d


@pytest.fixture
def downloads(packages: Path) -> Downloads:
    return Downloads(packages, spki_pin=PIN, fingerprint=FP)


def _body(answer: Download) -> bytes:
    try:
        return answer.file.read()
    finally:
        answer.close()


def test_index_lists_packages_from_sha256sums(downloads: Downloads, packages: Path):
    doc = downloads.open("GET", "/download/")
    assert doc == downloads.open("GET", "/download")
    assert [p["name"] for p in doc["packages"]] == sorted([TARBALL, "go2cloud_client_windows_x86_64.zip"])
    tar = doc["packages"][0]
    assert tar["size"] == 300_000 and tar["error"] is None and tar["url"] == f"/download/{TARBALL}"
    assert tar["sha256"] == hashlib.sha256((packages / TARBALL).read_bytes()).hexdigest()
    assert doc["sums_url"] == "/download/SHA256SUMS" and "message" not in doc
    assert [s["name"] for s in doc["scripts"]] == ["install.sh", "install.ps1"]


def test_package_streamed_with_its_size(downloads: Downloads, packages: Path):
    answer = downloads.open("GET", f"/download/{TARBALL}")
    assert isinstance(answer, Download)
    assert answer.size == 300_000 and answer.content_type == "application/gzip"
    assert _body(answer) == (packages / TARBALL).read_bytes()
    sums = downloads.open("GET", "/download/SHA256SUMS")
    assert _body(sums) == (packages / "SHA256SUMS").read_bytes()


@pytest.mark.parametrize("path", [
    "/download/../server.db", "/download/..", "/download/.", "/download/a/b", "/download/%2e%2e",
    "/download/..%2Fadmin.token", "/download/.hidden", "/download/unlisted.tar.gz", "/download/README",
    "/download/" + "x" * 200,
])
def test_nothing_but_listed_names(downloads: Downloads, packages: Path, path: str):
    (packages / "unlisted.tar.gz").write_bytes(b"not published")
    (packages / "README").write_bytes(b"not published")
    (packages / ".hidden").write_bytes(b"not published")
    with pytest.raises(NotFound):
        downloads.open("GET", path)


def test_listed_but_traversing_or_symlinked_names_are_not_served(tmp_path: Path):
    d = tmp_path / "p"
    d.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    digest = hashlib.sha256(b"secret").hexdigest()
    (d / "link.tar.gz").symlink_to(secret)
    (d / "SHA256SUMS").write_text(f"{digest}  ../secret.txt\n{digest}  link.tar.gz\n{digest} */etc/passwd\n")
    downloads = Downloads(d)
    assert list(downloads.sums()) == ["link.tar.gz"]
    with pytest.raises(NotFound):
        downloads.open("GET", "/download/link.tar.gz")
    entry = downloads.index()["packages"][0]
    assert entry["name"] == "link.tar.gz" and "missing" in entry["error"]


def test_missing_and_changed_files_are_errors_in_the_index(downloads: Downloads, packages: Path):
    assert downloads.index()["packages"][0]["error"] is None  # verified once
    (packages / TARBALL).write_bytes(b"shorter now")
    (packages / "go2cloud_client_windows_x86_64.zip").unlink()
    doc = downloads.index()
    tar_entry, zip_entry = doc["packages"]
    assert "listed in SHA256SUMS but missing" in zip_entry["error"] and zip_entry["size"] is None
    assert "does not match its SHA256SUMS line" in tar_entry["error"]
    assert "size changed from 300000 to 11 bytes" in tar_entry["error"]
    assert tar_entry["size"] == 11
    with pytest.raises(PackageMismatch) as err:
        downloads.open("GET", f"/download/{TARBALL}")
    assert err.value.http_status == 409 and err.value.code == "package_mismatch"
    with pytest.raises(NotFound):
        downloads.open("GET", "/download/go2cloud_client_windows_x86_64.zip")


def test_same_size_tampering_is_caught(downloads: Downloads, packages: Path):
    data = bytearray((packages / TARBALL).read_bytes())
    _body(downloads.open("GET", f"/download/{TARBALL}"))
    data[10] ^= 1
    (packages / TARBALL).write_bytes(bytes(data))
    os.utime(packages / TARBALL, ns=(1, 1))  # even with another mtime: the inode data changed
    with pytest.raises(PackageMismatch):
        downloads.open("GET", f"/download/{TARBALL}")


def test_no_packages_directory(tmp_path: Path):
    downloads = Downloads(tmp_path / "none", spki_pin=PIN, fingerprint=FP)
    doc = downloads.index()
    assert doc["packages"] == [] and doc["sums_url"] is None
    assert "no packages are published" in doc["message"]
    assert [s["name"] for s in doc["scripts"]] == ["install.sh", "install.ps1"]
    with pytest.raises(NotFound):
        downloads.open("GET", "/download/SHA256SUMS")
    assert "no packages directory" in downloads.describe()


def test_scripts_are_served_with_the_pin_filled_in(downloads: Downloads):
    sh = _body(downloads.open("GET", "/download/install.sh")).decode()
    assert f"SERVED_SPKI_PIN='{PIN}'\n" in sh and f"SERVED_FINGERPRINT='{FP}'\n" in sh
    ps1 = _body(downloads.open("GET", "/download/install.ps1")).decode()
    assert f"$ServedFingerprint = '{FP}'" in ps1
    index = {s["name"]: s for s in downloads.index()["scripts"]}
    assert index["install.sh"]["size"] == len(sh.encode())
    assert index["install.sh"]["sha256"] == hashlib.sha256(sh.encode()).hexdigest()


def test_only_get(downloads: Downloads):
    with pytest.raises(InvalidInput):
        downloads.open("POST", "/download/")


def test_parse_sums_formats():
    digest = "AB" * 32
    assert parse_sums(f"{digest}  a.tar.gz\n{digest} *b.zip\r\nnot a line\n{digest}  SHA256SUMS\n") == {
        "a.tar.gz": digest.lower(), "b.zip": digest.lower()}


def test_every_download_route_is_documented_in_openapi():
    spec = yaml.safe_load(DOC.read_text())
    documented = set()
    for p, ops in spec["paths"].items():
        servers = ops.get("servers")
        if servers and urlsplit(servers[0]["url"]).path == "/download":
            documented |= {(m.upper(), re.sub(r"\{[^}]+\}", "{}", "/download" + p)) for m in ops
                           if m in ("get", "post", "put", "delete")}
    served = {(m, re.sub(r"\([^)]*\)", "{}", pattern.strip("^$"))) for m, pattern in Downloads.routes}
    assert served == documented
    assert all(spec["paths"][p]["get"]["security"] == [] for p in ("/", "/{name}"))
    codes = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert "package_mismatch" in codes
