from __future__ import annotations

import copy

import pytest

from go2cloud_client.commands import parse_command
from go2cloud_client.errors import CommandRejectedError

FP = "sha256:" + "ab" * 32
TARGET = {"kind": "rsync", "url": "https://127.0.0.1:8443/rsync/v1/tasks/t-1", "fingerprint": FP,
          "module": "t-1", "user": "t-1", "password": "pw"}
START = {"id": "c-1", "type": "start", "params": {
    "task_id": "t-1", "mode": "file", "paths": ["/srv/data", "/"], "bandwidth_mbps": 0, "compression": 7,
    "checksum": False, "target": TARGET, "cycle": {"number": 1, "dest": "000001", "link_dest": None}}}


def isdir(path):
    return path in ("/", "/srv/data", "/srv")


def start_with(**changes):
    raw = copy.deepcopy(START)
    for key, value in changes.items():
        node = raw["params"]
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return raw


def test_valid_start():
    cmd = parse_command(START, isdir)
    assert cmd.paths == ("/srv/data", "/") and cmd.options.compression == 7
    assert cmd.target.url == "https://127.0.0.1:8443/rsync/v1/tasks/t-1" and cmd.cycle.dest == "000001"
    assert cmd.target.fingerprint == FP and (cmd.target.module, cmd.target.user) == ("t-1", "t-1")
    assert "pw" not in repr(cmd) and "pw" not in repr(cmd.target)


@pytest.mark.parametrize("key,value,field", [
    ("paths", ["relative/path"], "paths[0]"),
    ("paths", ["/srv/../etc"], "paths[0]"),
    ("paths", ["/srv/data/"], "paths[0]"),
    ("paths", ["/srv//data"], "paths[0]"),
    ("paths", ["/srv/./data"], "paths[0]"),
    ("paths", ["/srv/da\nta"], "paths[0]"),
    ("paths", ["/srv/da\x00ta"], "paths[0]"),
    ("paths", ["/does/not/exist"], "paths[0]"),
    ("paths", ["--delete"], "paths[0]"),
    ("paths", [], "paths"),
    ("paths", "/srv", "paths"),
    ("paths", ["/srv", "/srv"], "paths"),
    ("compression", 11, "compression"),
    ("compression", -1, "compression"),
    ("compression", True, "compression"),
    ("compression", "7", "compression"),
    ("bandwidth_mbps", 100001, "bandwidth_mbps"),
    ("bandwidth_mbps", 1.5, "bandwidth_mbps"),
    ("checksum", "yes", "checksum"),
    ("checksum", KeyError, "checksum"),
    ("mode", "tape", "mode"),
    ("mode", "block", "disks"),
    ("task_id", "t 1;rm", "task_id"),
    ("target.kind", "ssh", "target.kind"),
    ("target.url", "http://127.0.0.1:8443/rsync/v1/tasks/t-1", "target.url"),
    ("target.url", "rsync://127.0.0.1:8873/t-1", "target.url"),
    ("target.url", "https://127.0.0.1:8443/block/v1/tasks/t-1", "target.url"),
    ("target.url", "https://127.0.0.1:8443/rsync/v1/tasks/", "target.url"),
    ("target.url", "https://127.0.0.1:8443/rsync/v1/tasks/t-1/x", "target.url"),
    ("target.url", "https://127.0.0.1:8443/rsync/v1/tasks/t 1", "target.url"),
    ("target.url", "https:///rsync/v1/tasks/t-1", "target.url"),
    ("target.url", "https://h/rsync/v1/tasks/t-1\nx", "target.url"),
    ("target.url", KeyError, "target.url"),
    ("target.url", 8443, "target.url"),
    ("target.fingerprint", KeyError, "target.fingerprint"),
    ("target.fingerprint", "", "target.fingerprint"),
    ("target.fingerprint", "sha256:" + "AB" * 32, "target.fingerprint"),
    ("target.fingerprint", "sha256:" + "ab" * 31, "target.fingerprint"),
    ("target.fingerprint", "sha1:" + "ab" * 32, "target.fingerprint"),
    ("target.fingerprint", "ab" * 32, "target.fingerprint"),
    ("target.module", "../x", "target.module"),
    ("target.user", "u@h", "target.user"),
    ("target.password", "a\nb", "target.password"),
    ("cycle.dest", "../000001", "cycle.dest"),
    ("cycle.dest", "1", "cycle.dest"),
    ("cycle.link_dest", "/abs", "cycle.link_dest"),
    ("cycle.number", 0, "cycle.number"),
    ("cycle", None, "cycle"),
])
def test_invalid_start_rejected_naming_the_field(key, value, field):
    with pytest.raises(CommandRejectedError) as err:
        parse_command(start_with(**{key: value}), isdir)
    assert f"'{field}'" in str(err.value)
    assert err.value.code == "command_rejected"


def test_params_must_be_object():
    with pytest.raises(CommandRejectedError, match="params"):
        parse_command({"id": "c", "type": "pause", "params": ["x"]})


def test_modify_partial_and_ranges():
    cmd = parse_command({"id": "c", "type": "modify", "params": {"task_id": "t-1", "compression": 0}})
    assert cmd.changes == {"compression": 0}
    with pytest.raises(CommandRejectedError, match="bandwidth_mbps"):
        parse_command({"id": "c", "type": "modify", "params": {"task_id": "t-1", "bandwidth_mbps": -5}})


def test_finalize_requires_cycle_key_but_allows_null():
    raw = {"id": "c", "type": "finalize", "params": {"task_id": "t", "cycle": None}}
    assert parse_command(raw).cycle is None
    with pytest.raises(CommandRejectedError, match="cycle"):
        parse_command({"id": "c", "type": "finalize", "params": {"task_id": "t"}})
