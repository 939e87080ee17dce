from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from go2cloud_client.replication import excludes
from go2cloud_client.replication.excludes import ExcludesError, Rule


def test_shipped_defaults_parse_and_cover_the_design_list() -> None:
    patterns = [r.pattern for r in excludes.load(excludes.DEFAULT_EXCLUDES)]
    for p in ("/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/var/tmp/*", "/mnt/*", "/media/*",
              "/lost+found", "/swapfile", "/swap.img"):
        assert p in patterns


def test_comments_blank_lines_whitespace_and_crlf() -> None:
    rules = excludes.parse("# comment\n\n   \n  /a/b  \r\n*.swp\n  # indented comment\ncache/\n")
    assert rules == [Rule("/a/b", 4), Rule("*.swp", 5), Rule("cache/", 7)]
    assert rules[2].dir_only and rules[0].anchored and not rules[1].anchored


@pytest.mark.parametrize("line", ["--delete", "--remove-source-files", "-rf", "--exclude=*", "-x-",
                                  "--max-size=1", "+foo", "merge-file", "exclude.txt", ";x", "#"[1:] + "x#"])
def test_option_looking_lines_are_literal_patterns(line: str) -> None:
    rules = excludes.parse(line + "\n")
    assert rules == [Rule(line, 1)]


@pytest.mark.parametrize("line", ["- /x", "+ /x", "-e sh", "merge /etc/shadow", ". /etc/x", ": .rsync",
                                  "dir-merge .f", "exclude foo", "include,s foo", "!", "-/ x", "P x",
                                  "H x", "clear", "-_x", "+,s foo"])
def test_filter_rule_syntax_is_refused_naming_the_line(line: str) -> None:
    with pytest.raises(ExcludesError, match=r"line 3\b.*filter rule"):
        excludes.parse(f"# a\n/ok\n{line}\n")


@pytest.mark.parametrize("line,what", [("a\x00b", "NUL"), ("a\x01b", "control"), ("a\tb", "control"),
                                       ("/", "whole transfer root"), ("x" * 5000, "longer")])
def test_hostile_lines_are_refused(line: str, what: str) -> None:
    with pytest.raises(ExcludesError, match=what):
        excludes.parse("/ok\n" + line + "\n")


def test_filter_file_is_exclude_rules_only(tmp_path: Path) -> None:
    src = tmp_path / "ex.txt"
    src.write_bytes(b"/proc/*\n--delete\n-rf\nname with spaces\nbad-\xff\n")
    out = excludes.write_filter_file(excludes.load(src), tmp_path / "w" / "filter")
    lines = out.read_bytes().split(b"\n")
    assert lines == [b"- /proc/*", b"- --delete", b"- -rf", b"- name with spaces", b"- bad-\xff", b""]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_filter_file_revalidates_hand_built_rules(tmp_path: Path) -> None:
    for bad in (Rule("x\n+ *"), Rule("+ /etc"), Rule("")):
        with pytest.raises(ExcludesError):
            excludes.write_filter_file([bad], tmp_path / "f")


def test_ensure_home_excludes_copies_once_with_private_modes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = excludes.ensure_home_excludes(home)
    assert path == home / "Excludes" / "rsync_excludes_linux.txt"
    assert path.read_bytes() == excludes.DEFAULT_EXCLUDES.read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    path.write_text("/mine\n")
    assert excludes.ensure_home_excludes(home) == path
    assert path.read_text() == "/mine\n"  # never overwritten


def test_load_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExcludesError, match="cannot read"):
        excludes.load(tmp_path / "nope")


@pytest.mark.parametrize("pattern,path,is_dir,expected", [
    ("/tmp/*", "tmp/x", False, True),
    ("/tmp/*", "tmp", True, False),
    ("/tmp/*", "a/tmp/x", False, False),
    ("*.swp", "a/b/c.swp", False, True),
    ("cache/", "a/cache", True, True),
    ("cache/", "a/cache", False, False),
    ("/lost+found", "lost+found", True, True),
    ("var/**/log", "x/var/a/b/log", False, True),
])
def test_matcher_approximates_rsync(pattern: str, path: str, is_dir: bool, expected: bool) -> None:
    assert excludes.Matcher([Rule(pattern)]).excluded(path, is_dir) is expected
