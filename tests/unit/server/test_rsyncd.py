"""The file-level receiver's pure parts (``go2cloud_server.rsyncd``): the daemon filter that
confines a session to its cycle and path, the single-use daemon's configuration, the session's
paths and the preparations on disk. Running rsync itself is the integration tests' job."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import List

import pytest

from go2cloud_server.rsyncd import (
    REFUSED_OPTIONS,
    RsyncSessionError,
    RsyncSessions,
    SessionSpec,
    filter_rules,
    render_config,
    unlink_shared,
)

ROOT = Path("/data/tasks/t-1/tree")


def spec(path: str = "/srv", cycle: int = 2, link_cycle=1, other_paths=(), **kw) -> SessionSpec:
    return SessionSpec(task_id="t-1", tree_root=ROOT, cycle=cycle, path=path, link_cycle=link_cycle,
                       other_paths=tuple(other_paths), user=kw.pop("user", "t-1"),
                       password=kw.pop("password", "pw-secret"), **kw)


def _regex(pattern: str) -> re.Pattern[str]:
    """rsync's matching of the anchored patterns ``filter_rules`` writes: without a wildcard a
    pattern is literal; with one, ``\\x`` is a literal x, ``**`` anything, ``*`` anything but
    ``/``, ``?`` one character but ``/``, ``[[:space:]]`` white space and ``[%]`` a ``%``."""
    if not any(c in pattern for c in "*?["):
        return re.compile(re.escape(pattern))
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        for klass, rx in (("[[:space:]]", r"\s"), ("[%]", "%")):
            if pattern.startswith(klass, i):
                out += rx
                i += len(klass)
                break
        else:
            klass = ""
        if klass:
            continue
        if c == "\\" and i + 1 < len(pattern):
            out += re.escape(pattern[i + 1])
            i += 2
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out)


def allowed(rules: List[str], name: str) -> bool:
    """First match wins, as in rsync; ``name`` is a path below the module, starting with ``/``."""
    for rule in rules:
        action, pattern = rule.split(" ", 1)
        anchored = pattern.startswith("/")
        rx = _regex(pattern)
        if (rx.fullmatch(name) if anchored else rx.fullmatch(name.rsplit("/", 1)[-1]) or rx.fullmatch(name)):
            return action == "+"
    return True  # no rule matched: rsync includes it (filter_rules always ends with "- **")


# --- filter_rules ---------------------------------------------------------------------------------

def test_filter_rules_of_a_path_with_nested_paths_and_a_link_dest():
    rules = filter_rules(spec("/srv", other_paths=("/", "/srv/data", "/srv/db/x", "/srvx", "/opt")))
    assert rules == ["+ /000002", "+ /000002/srv", "- /000002/srv/data/**", "- /000002/srv/db/x/**",
                     "+ /000002/srv/**", "+ /000001/srv", "- **"]


@pytest.mark.parametrize("name,ok", [
    ("/000002", True),  # the cycle directory and the parents of the path: to create them
    ("/000002/srv", True),
    ("/000002/srv/a", True),  # the path's subtree
    ("/000002/srv/a/b/c", True),
    ("/000002/srv/.hidden", True),
    ("/000002/srv/data", True),  # a nested path's mount point directory itself ...
    ("/000002/srv/data/x", False),  # ... but not what is in it: its own session writes that
    ("/000002/srv/data/x/y", False),
    ("/000002/srv/db/x/f", False),
    ("/000002/srv/db/f", True),
    ("/000001/srv", True),  # the link-dest directory itself
    ("/000001/srv/a", False),  # ... not into the committed image
    ("/000001", False),
    ("/000001/other", False),
    ("/000002/srvx", False),  # a sibling of the path
    ("/000002/srvx/f", False),
    ("/000002/opt", False),
    ("/000002/f", False),  # beside the path, in the cycle
    ("/000003", False),  # another cycle
    ("/000003/srv/f", False),
    ("/f", False),
    ("/..", False),
])
def test_filter_rules_confine_a_session_to_its_cycle_and_path(name, ok):
    rules = filter_rules(spec("/srv", other_paths=("/", "/srv/data", "/srv/db/x", "/srvx", "/opt")))
    assert allowed(rules, name) is ok


def test_filter_rules_of_the_root_path_without_link_dest():
    rules = filter_rules(spec("/", cycle=1, link_cycle=None, other_paths=("/boot/efi", "/srv")))
    assert rules == ["+ /000001", "- /000001/boot/efi/**", "- /000001/srv/**", "+ /000001/**", "- **"]
    assert allowed(rules, "/000001/etc/passwd") and allowed(rules, "/000001/srv")
    assert not allowed(rules, "/000001/srv/f") and not allowed(rules, "/000001/boot/efi/EFI")
    assert allowed(rules, "/000001/boot/grub")
    assert not allowed(rules, "/000002") and not allowed(rules, "/000000/x")


def test_filter_rules_link_dest_is_only_the_exact_directory():
    rules = filter_rules(spec("/srv/data", cycle=5, link_cycle=4))
    assert [r for r in rules if "000004" in r] == ["+ /000004/srv/data"]
    assert allowed(rules, "/000004/srv/data")
    for name in ("/000004", "/000004/srv", "/000004/srv/data/f", "/000004/srv/datax", "/000003/srv/data"):
        assert not allowed(rules, name), name


def test_filter_rules_escape_white_space_and_wildcards():
    path = "/srv/my dir/[x]*?\tend"
    rules = filter_rules(spec(path, cycle=1, link_cycle=None))
    # the daemon's filter parameter is split on white space: no rule may contain any
    assert all(len(rule.split()) == 2 for rule in rules)
    assert rules == ["+ /000001", "+ /000001/srv", "+ /000001/srv/my[[:space:]]dir",
                     r"+ /000001/srv/my[[:space:]]dir/\[x\]\*\?[[:space:]]end",
                     r"+ /000001/srv/my[[:space:]]dir/\[x\]\*\?[[:space:]]end/**", "- **"]
    assert allowed(rules, "/000001/srv/my dir/[x]*?\tend/f")
    assert allowed(rules, "/000001/srv/my dir/[x]*?\tend")
    # the wildcards in the name are literal: other names they would match stay out
    for name in ("/000001/srv/my dir/x-anything end/f", "/000001/srv/my dir/[x]abc end",
                 "/000001/srv/my dir/other", "/000001/srv/myXdir/[x]*?\tend/f"):
        assert not allowed(rules, name), name


def test_filter_rules_escape_wildcards_of_nested_and_link_paths():
    rules = filter_rules(spec("/srv/a*", cycle=3, link_cycle=2, other_paths=("/srv/a*/b c", "/srv/a*x")))
    assert r"- /000003/srv/a\*/b[[:space:]]c/**" in rules and r"+ /000002/srv/a\*" in rules
    assert not any("a*x" in r or r"a\*x" in r for r in rules)  # not nested in this path
    assert not allowed(rules, "/000003/srv/ab/f") and not allowed(rules, "/000002/srv/ab")
    assert not allowed(rules, "/000003/srv/a*/b c/f") and allowed(rules, "/000003/srv/a*/bc/f")


# --- render_config --------------------------------------------------------------------------------

def _module(config: str) -> dict:
    """The ``[t-1]`` section of a rendered configuration as a dict."""
    section, out = None, {}
    for line in config.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section == "t-1":
            out[key.strip()] = value.strip()
    return out


@pytest.mark.parametrize("as_root", [True, False])
def test_render_config(tmp_path, as_root):
    s = spec("/srv", other_paths=("/srv/data",))
    config = render_config(s, tmp_path / "secrets", tmp_path / "rsyncd.log", as_root)
    assert config.endswith("\n") and "pw-secret" not in config  # the password is in the secrets file only
    assert f"log file = {tmp_path / 'rsyncd.log'}" in config.splitlines()
    module = _module(config)
    assert module["path"] == str(ROOT)
    assert module["read only"] == "false" and module["write only"] == "true" and module["list"] == "false"
    assert module["auth users"] == "t-1" and module["secrets file"] == str(tmp_path / "secrets")
    assert module["strict modes"] == "true" and module["numeric ids"] == "true"
    refused = module["refuse options"].split()
    assert refused == list(REFUSED_OPTIONS)
    for option in ("inplace", "partial-dir", "temp-dir", "backup-dir", "keep-dirlinks", "append",
                   "delay-updates", "compare-dest", "copy-dest", "write-devices"):
        assert option in refused
    assert "link-dest" not in refused and "partial" not in refused  # what the agent uses
    assert module["filter"].split() == " ".join(filter_rules(s)).split()
    if as_root:
        assert (module["use chroot"], module["uid"], module["gid"]) == ("true", "0", "0")
    else:
        assert module["use chroot"] == "false" and "uid" not in module and "gid" not in module


# --- the session's paths, preparation and errors ---------------------------------------------------

def test_session_spec_paths():
    s = spec("/srv/data", cycle=7, link_cycle=6,
             other_paths=("/", "/srv", "/srv/data/x", "/srv/data/y/z", "/opt"))
    dest = ROOT / "000007" / "srv" / "data"
    assert s.dest_dir() == dest
    assert s.nested_dirs() == [dest / "x", dest / "y" / "z"]
    assert s.link_dir() == ROOT / "000006" / "srv" / "data"
    assert spec("/", cycle=1, link_cycle=None).dest_dir() == ROOT / "000001"
    assert spec("/", cycle=1, link_cycle=None).link_dir() is None
    assert "pw-secret" not in repr(s)


def test_prepare_writes_a_private_configuration_and_secrets_file(tmp_path):
    sessions = RsyncSessions(state_dir=tmp_path / "state")
    s = spec("/srv")
    sdir, conf, log_file = sessions._prepare(s)
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sdir).st_mode) == 0o700 and sdir.name.startswith("t-1.")
    secrets = sdir / "secrets"
    assert secrets.read_text() == "t-1:pw-secret\n" and stat.S_IMODE(os.stat(secrets).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    assert conf.read_text() == render_config(s, secrets, log_file, os.geteuid() == 0)
    assert not sessions.busy("t-1")
    sessions.close_task("t-1")  # nothing running: returns at once


@pytest.mark.parametrize("bad", [
    {"task_id": ".."}, {"task_id": "t 1"}, {"task_id": "t-1]\n[x"}, {"user": "a b"}, {"user": ""},
    {"password": ""}, {"password": "a\nb"}, {"password": "x" * 1025}, {"tree_root": Path("/data/a\nb")},
])
def test_prepare_refuses_what_would_break_the_configuration(tmp_path, bad):
    fields = {"task_id": "t-1", "tree_root": ROOT, "cycle": 1, "path": "/srv", "user": "t-1",
              "password": "pw"}
    fields.update(bad)
    with pytest.raises((ValueError, RsyncSessionError)):
        RsyncSessions(state_dir=tmp_path / "state")._prepare(SessionSpec(**fields))


@pytest.mark.parametrize("path", ["/srv/a\\b", "/srv/%PATH%", "/srv/100%", "/srv/a\\b c"])
def test_filter_rules_keep_backslashes_and_percent_signs_literal(path):
    rules = filter_rules(spec(path, cycle=1, link_cycle=None))
    assert all(len(rule.split()) == 2 for rule in rules)
    assert not any("%" in rule.replace("[%]", "") for rule in rules)  # rsyncd.conf expands %VAR%
    assert allowed(rules, f"/000001{path}") and allowed(rules, f"/000001{path}/f")
    assert not allowed(rules, "/000001/srv/ab/f") and not allowed(rules, "/000001/srv/PATH/f")


def test_check_names_a_missing_rsync(tmp_path):
    with pytest.raises(RsyncSessionError, match="rsync is not installed"):
        RsyncSessions(state_dir=tmp_path, rsync_path="no-such-rsync-here").check()


def test_unlink_shared_removes_only_what_an_earlier_attempt_hard_linked(tmp_path):
    image = tmp_path / "000001"
    dest = tmp_path / "000002" / "srv"
    nested = dest / "data"
    for d in (image, nested, dest / "sub"):
        d.mkdir(parents=True)
    (image / "linked").write_text("old")
    os.link(image / "linked", dest / "linked")  # what --link-dest made in the earlier attempt
    (image / "deep").write_text("old")
    os.link(image / "deep", dest / "sub" / "deep")
    (image / "nested").write_text("old")
    os.link(image / "nested", nested / "nested")  # another session's subtree: left alone
    (dest / "own").write_text("new")
    os.symlink("linked", dest / "symlink")
    assert unlink_shared(dest, [nested]) == 2
    assert sorted(p.name for p in dest.rglob("*")) == ["data", "nested", "own", "sub", "symlink"]
    assert (image / "linked").read_text() == "old" and os.stat(image / "linked").st_nlink == 1
    assert unlink_shared(tmp_path / "missing", []) == 0
    os.symlink(dest, tmp_path / "link-to-dest")
    assert unlink_shared(tmp_path / "link-to-dest", []) == 0
