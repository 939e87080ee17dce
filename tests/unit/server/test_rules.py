from __future__ import annotations

import pytest

from go2cloud_server import rules
from go2cloud_server.errors import InvalidInput


@pytest.mark.parametrize(
    "name", ["ab", "web-tier", "Prod:db.01_x", "東京-db", "データベース", "a" * 64, "Zz9"]
)
def test_valid_workgroup_names(name):
    assert rules.workgroup_name(name) == name


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("a", "2-64"),
        ("a" * 65, "2-64"),
        ("1abc", "start with a letter"),
        ("-abc", "start with a letter"),
        ("http://x", "http"),
        ("HTTPS://example", "http"),
        ("web tier", "' '"),
        ("web/tier", "'/'"),
        ("ab\n", "'\\n'"),
    ],
)
def test_invalid_workgroup_names(name, fragment):
    with pytest.raises(InvalidInput) as err:
        rules.workgroup_name(name)
    assert fragment in err.value.message
    assert err.value.message.startswith("name:")


def test_tags_limits():
    assert rules.tags({"env": "prod", "team": ""}) == {"env": "prod", "team": ""}
    with pytest.raises(InvalidInput, match="at most 20"):
        rules.tags({f"k{i}": "v" for i in range(21)})
    with pytest.raises(InvalidInput, match="key"):
        rules.tags({"": "v"})
    with pytest.raises(InvalidInput, match="value"):
        rules.tags({"k": "v" * 129})
    assert len(rules.tags({f"k{i}": "v" for i in range(20)})) == 20


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("90", 90),
        ("off", None),
        ("0", None),
        (" 5M ", 300),
    ],
)
def test_parse_duration(text, seconds):
    assert rules.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "abc", "-5m", "1.5h", "10 minutes"])
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidInput, match="--sync-every"):
        rules.parse_duration(text)


def test_sync_every_bounds():
    assert rules.sync_every(None) is None
    assert rules.sync_every(0) is None
    assert rules.sync_every(60) == 60
    with pytest.raises(InvalidInput, match="sync_every_s"):
        rules.sync_every(59)
    with pytest.raises(InvalidInput, match="sync_every_s"):
        rules.sync_every(31 * 86400)
    with pytest.raises(InvalidInput):
        rules.sync_every(True)


def test_integer_bounds_and_types():
    assert rules.integer(None, "uses", rules.CODE_USES, 200) == 200
    assert rules.integer(1000, "uses", rules.CODE_USES) == 1000
    for bad in (0, 1001):
        with pytest.raises(InvalidInput, match="uses: must be between 1 and 1000"):
            rules.integer(bad, "uses", rules.CODE_USES)
    for bad in ("5", 5.0, True):
        with pytest.raises(InvalidInput, match="integer"):
            rules.integer(bad, "uses", rules.CODE_USES)


@pytest.mark.parametrize("path", ["/", "/srv/data", "/var/lib/my app", "/-dash"])
def test_valid_paths(path):
    assert rules.source_path(path) == path


@pytest.mark.parametrize(
    "path", ["relative", "", "/a/../b", "/a/", "/a//b", "//a", "/a/./b", "/a\nb", "/a\x00"]
)
def test_invalid_paths(path):
    with pytest.raises(InvalidInput, match="paths"):
        rules.source_path(path)


def test_paths_dedup_and_limits():
    assert rules.paths(["/srv", "/srv", "/"]) == ["/srv", "/"]
    assert rules.paths(None) is None
    with pytest.raises(InvalidInput):
        rules.paths([])
    with pytest.raises(InvalidInput, match="at most"):
        rules.paths([f"/p{i}" for i in range(65)])


def test_limits_table_mentions_every_limit():
    table = rules.limits_table()
    for needle in (
        "50",
        "1-1000, default 200",
        "1-90 days, default 90",
        "0-100000",
        "0-10, default 7",
        "1-100, default 3",
        "60 s",
    ):
        assert needle in table
