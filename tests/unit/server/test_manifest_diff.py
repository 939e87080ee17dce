"""The manifest verifier: every kind of difference planted is found; identical copies are equal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from go2cloud_server import manifest

T = 1_600_000_000_123_456_789


def make_tree(root: Path) -> Path:
    r = os.fsencode(root)
    os.makedirs(os.path.join(r, b"d/sub"))
    os.makedirs(os.path.join(r, b"empty"))
    for name, data in (
        (b"d/a", b"alpha"),
        (b"d/sub/b", b"beta"),
        (b"bad-\xff\xfe", b"non-utf8"),
        (b"new\nline", b"nl"),
        (b"h1", b"hard"),
    ):
        with open(os.path.join(r, name), "wb") as fh:
            fh.write(data)
    os.link(os.path.join(r, b"h1"), os.path.join(r, b"d/h2"))
    os.link(os.path.join(r, b"h1"), os.path.join(r, b"d/h3"))
    os.symlink(b"d/a", os.path.join(r, b"link"))
    os.symlink(b"missing", os.path.join(r, b"dangling"))
    os.setxattr(os.path.join(r, b"d/a"), "user.k", b"v")
    os.mkfifo(os.path.join(r, b"fifo"))
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), ns=(T, T), follow_symlinks=False)
    os.utime(r, ns=(T, T))
    return root


def p(root: Path, rel: bytes) -> bytes:
    return os.path.join(os.fsencode(root), rel)


def touch_back(root: Path, rel: bytes) -> None:
    """Restore the parent's mtime after a change, so only the planted difference remains."""
    os.utime(os.path.dirname(p(root, rel)) or os.fsencode(root), ns=(T, T))


def _rewrite(root: Path, rel: bytes, data: bytes) -> None:
    st = os.lstat(p(root, rel))
    with open(p(root, rel), "wb") as fh:
        fh.write(data)
    os.utime(p(root, rel), ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def pair(tmp_path: Path):
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b")
    return a, b


def test_identical_trees_have_no_differences(pair) -> None:
    a, b = pair
    ma, mb = manifest.build(a), manifest.build(b)
    assert manifest.diff(ma, mb) == []
    assert len(ma.links) == 1 and next(iter(ma.links)) == {b"h1", b"d/h2", b"d/h3"}
    assert ma.entries[b"bad-\xff\xfe"].sha256 and ma.entries[b"link"].target == b"d/a"
    assert ma.files == 7


PLANTS = {
    "content same size and mtime": (lambda b: _rewrite(b, b"d/a", b"ALPHA"), "d/a: sha256"),
    "size": (lambda b: _rewrite(b, b"d/sub/b", b"beta!"), "d/sub/b: size"),
    "mode": (lambda b: os.chmod(p(b, b"d/a"), 0o600), "d/a: mode"),
    "setuid bit": (lambda b: os.chmod(p(b, b"d/a"), 0o4644), "d/a: mode"),
    "uid": (lambda b: os.chown(p(b, b"d/a"), 1234, -1), "d/a: uid"),
    "gid": (lambda b: os.chown(p(b, b"d/a"), -1, 5678), "d/a: gid"),
    "symlink owner": (lambda b: os.lchown(p(b, b"link"), 42, 42), "link: uid"),
    "mtime of a file": (lambda b: os.utime(p(b, b"d/a"), ns=(T, T + 1)), "d/a: mtime_ns"),
    "mtime of a dir": (lambda b: os.utime(p(b, b"empty"), ns=(T, T + 1000)), "empty: mtime_ns"),
    "mtime of a symlink": (
        lambda b: os.utime(p(b, b"link"), ns=(T, 5), follow_symlinks=False),
        "link: mtime_ns",
    ),
    "xattr value": (lambda b: os.setxattr(p(b, b"d/a"), "user.k", b"w"), "xattr user.k differs"),
    "xattr missing": (lambda b: os.removexattr(p(b, b"d/a"), "user.k"), "xattr user.k missing"),
    "xattr extra": (lambda b: os.setxattr(p(b, b"d/sub"), "user.x", b"1"), "unexpected xattr user.x"),
    "acl": (
        lambda b: os.setxattr(
            p(b, b"d/sub/b"),
            "system.posix_acl_access",
            bytes.fromhex(
                "0200000001000600ffffffff02000400d204000004000400ffffffff10000400ffffffff20000400ffffffff"
            ),
        ),
        "xattr system.posix_acl_access",
    ),
    "symlink target": (
        lambda b: (os.unlink(p(b, b"link")), os.symlink(b"d/sub/b", p(b, b"link"))),
        "link: target",
    ),
    "missing file": (lambda b: os.unlink(p(b, b"new\nline")), "missing file"),
    "extra file": (lambda b: open(p(b, b"d/extra"), "wb").close(), "d/extra: unexpected file"),
    "non-utf8 name": (
        lambda b: os.rename(p(b, b"bad-\xff\xfe"), p(b, b"bad-\xfe\xff")),
        "bad-\\xff\\xfe: missing",
    ),
    "type": (lambda b: (os.unlink(p(b, b"fifo")), open(p(b, b"fifo"), "wb").close()), "fifo: type"),
    "empty dir missing": (lambda b: os.rmdir(p(b, b"empty")), "empty: missing dir"),
    "hard link broken": (
        lambda b: (os.unlink(p(b, b"d/h3")), shutil.copy2(p(b, b"h1"), p(b, b"d/h3"))),
        "hard-link group missing",
    ),
    "hard link added": (
        lambda b: (os.unlink(p(b, b"d/a")), os.link(p(b, b"d/sub/b"), p(b, b"d/a"))),
        "unexpected hard-link group",
    ),
}


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_planted_difference_is_found(pair, name: str) -> None:
    a, b = pair
    plant, expected = PLANTS[name]
    if name in ("uid", "gid", "symlink owner", "acl") and os.geteuid() != 0:
        pytest.skip("needs root")
    plant(b)
    for rel in (b"d/a", b"link", b"new\nline", b"d/extra", b"fifo", b"d/h3", b"bad-\xfe\xff", b"empty"):
        touch_back(b, rel)
    os.utime(p(b, b"d"), ns=(T, T))
    os.utime(os.fsencode(b), ns=(T, T))
    differences = manifest.diff(manifest.build(a), manifest.build(b))
    assert differences, f"{name} not detected"
    assert any(expected in d for d in differences), differences


def test_exclude_predicate_skips_entries_and_subtrees(pair) -> None:
    a, _ = pair
    seen = []

    def exclude(rel: bytes, is_dir: bool) -> bool:
        seen.append(rel)
        return rel == b"d" or rel.endswith(b"fifo")

    m = manifest.build(a, exclude=exclude)
    assert b"d" not in m.entries and b"d/a" not in m.entries and b"fifo" not in m.entries
    assert b"d/a" not in seen  # subtree not walked
    assert b"h1" in m.entries and m.links == frozenset()  # group members outside: no group


def test_diff_is_bounded() -> None:
    a = manifest.Manifest({b"x%d" % i: manifest.Entry("file", 0o644, 0, 0, 1, 0, "h") for i in range(50)})
    out = manifest.diff(a, manifest.Manifest(), limit=10)
    assert len(out) == 11 and out[-1].startswith("... and 40 more")
