"""FileReplicator without processes: argument building, exit-code handling and progress, with
the rsync child replaced by a scripted fake at the ``_spawn`` seam."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from go2cloud_client.errors import ReplicationError
from go2cloud_client.replication import excludes as excludes_mod
from go2cloud_client.replication import levels, rsync, tunnel
from go2cloud_client.replication.base import PathProgress, Progress, TransferCancelled
from go2cloud_client.replication.rsync import (
    Cycle,
    FileReplicator,
    RsyncCapabilities,
    RsyncConnectionError,
    RsyncPartialTransferError,
    RsyncTarget,
    RsyncVanishedError,
    TransferOptions,
    _PathRun,
)

PASSWORD = "s3cret-Pa55word"
URL = "https://10.0.0.9:8443/rsync/v1/tasks/t-abc"
FINGERPRINT = "sha256:" + "ab" * 32
TARGET = RsyncTarget(URL, FINGERPRINT, "t-abc", "t-abc", PASSWORD)
STATS = ["Number of files: 3 (reg: 2, dir: 1)", "Number of regular files transferred: 2",
         "Total file size: 1,000 bytes", "Total bytes sent: 1,234"]


#: ``rsync --version`` of real builds (the part the agent reads), from the machines named
VERSION_OUTPUT = {
    # this machine (rsync 3.5.0 built with zstd, lz4, xxhash)
    "3.5.0": "rsync  version 3.5.0  protocol version 32\nCopyright (C) 1996-2026 by Andrew Tridgell\n"
             "Capabilities:\n    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,\n"
             "Optimizations:\n    SIMD-roll, no asm-roll, openssl-crypto, no asm-MD5\n"
             "Checksum list:\n    xxh128 xxh3 xxh64 (xxhash) md5 md4 sha1 none\n"
             "Compress list:\n    zstd lz4 zlibx zlib none\n"
             "Daemon auth list:\n    sha512 sha256 sha1 md5 md4\n",
    # Debian 12's package
    "3.2.7": "rsync  version 3.2.7  protocol version 31\nCopyright (C) 1996-2022 by Andrew Tridgell\n"
             "Capabilities:\n    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,\n"
             "Optimizations:\n    SIMD-roll, no asm-roll, openssl-crypto, asm-MD5\n"
             "Checksum list:\n    xxh128 xxh3 xxh64 (xxhash) md5 md4 none\n"
             "Compress list:\n    zstd lz4 zlibx zlib none\n"
             "Daemon auth list:\n    sha512 sha256 sha1 md5 md4\n",
    # a 3.2 build without libzstd (configure --disable-zstd)
    "3.2.3-nozstd": "rsync  version 3.2.3  protocol version 31\n"
                    "Checksum list:\n    md5 md4 none\nCompress list:\n    zlibx zlib none\n",
    # CentOS 7 / Ubuntu 18.04 era: no negotiation, no lists, zlib only
    "3.1.2": "rsync  version 3.1.2  protocol version 31\nCopyright (C) 1996-2015 by Andrew Tridgell\n"
             "Capabilities:\n    64-bit files, 64-bit inums, 64-bit timestamps, 64-bit long ints,\n"
             "    socketpairs, hardlinks, symlinks, IPv6, batchfiles, inplace,\n",
}
CAPS = {name: rsync.parse_capabilities(text) for name, text in VERSION_OUTPUT.items()}


@pytest.fixture(autouse=True)
def _no_refused_targets():
    """Which targets refused zstd is remembered per agent process: each test starts afresh."""
    rsync._ZSTD_REFUSED.clear()
    yield
    rsync._ZSTD_REFUSED.clear()


def make(tmp_path: Path, paths=("/srv/data",), options: Optional[TransferOptions] = None,
         version=(3, 5, 0), caps: Optional[RsyncCapabilities] = None, **kw):
    options = options or TransferOptions()
    ex = tmp_path / "ex.txt"
    ex.write_text("/tmp/*\n--delete\n")
    if caps is None and version == (3, 5, 0):
        caps = CAPS["3.5.0"]
    return FileReplicator(target=TARGET, paths=list(paths), options=options, excludes_file=ex,
                          work_dir=tmp_path / "work", version=version, capabilities=caps,
                          estimate_totals=False, **kw)


FULL = Cycle(1, "000001", None, False)
INCR = Cycle(3, "000003", "000002", True)


def test_io_timeout_bounds_every_rsync_run(tmp_path: Path) -> None:
    """A stalled connection must end the run (exit 30) instead of hanging: --timeout is on the
    command line of every run, with the configured value (issue 17, item 5)."""
    rep = FileReplicator(target=TARGET, paths=["/srv/data"], options=TransferOptions(),
                         excludes_file=tmp_path / "x", work_dir=tmp_path / "w", version=(3, 2, 7),
                         io_timeout_s=7)
    assert "--timeout=7" in rep.build_args(FULL, "/srv/data")
    with pytest.raises(ValueError):
        FileReplicator(target=TARGET, paths=["/srv"], options=TransferOptions(), excludes_file=tmp_path / "x",
                       work_dir=tmp_path / "w", io_timeout_s=0)


def test_full_cycle_args(tmp_path: Path) -> None:
    rep = make(tmp_path)
    args = rep.build_args(FULL, "/srv/data")
    assert args[:9] == ["rsync", "-aHAXS", "--numeric-ids", "--one-file-system", "--no-inc-recursive",
                        "--info=progress2", "--stats", "--partial", "--timeout=120"]
    assert not any(a.startswith("--partial-dir") for a in args)  # the target refuses it
    assert "--delete" not in args and not any(a.startswith("--link-dest") for a in args)
    # the default level 7 is zstd 1 (rsync's own default for -z, zstd 3, costs twice the CPU)
    assert "--compress-choice=zstd" in args and "--compress-level=1" in args and "--compress" not in args
    assert "--checksum" not in args and not any(a.startswith("--bwlimit") for a in args)
    assert "--mkpath" in args and "--modify-window=-1" in args
    assert f"--filter=merge {tmp_path / 'work' / 'rsync-filter'}" in args
    assert args[-5:] == ["-e", tunnel.command(), "--", "/srv/data/", "t-abc@go2cloud::t-abc/000001/srv/data/"]
    assert not any("rsync://" in a or "10.0.0.9" in a for a in args)  # the tunnel knows the address


def test_incremental_args_link_dest_is_relative_to_the_dest_dir(tmp_path: Path) -> None:
    rep = make(tmp_path, paths=["/srv/data", "/"])
    args = rep.build_args(INCR, "/srv/data")
    assert "--delete" in args
    assert "--link-dest=../../../000002/srv/data" in args
    root = rep.build_args(INCR, "/")
    assert "--link-dest=../000002" in root
    assert root[-2:] == ["/", "t-abc@go2cloud::t-abc/000003/"]


@pytest.mark.parametrize("mbps,kib", [(0, None), (1, 122), (8, 976), (100, 12207), (100000, 12207031)])
def test_bwlimit_is_kib_per_second_rounded_down(tmp_path: Path, mbps: int, kib: Optional[int]) -> None:
    args = make(tmp_path, options=TransferOptions(bandwidth_mbps=mbps)).build_args(FULL, "/srv/data")
    limits = [a for a in args if a.startswith("--bwlimit")]
    assert limits == ([] if kib is None else [f"--bwlimit={kib}"])
    if kib:
        assert kib * 1024 <= mbps * 1_000_000 / 8 < (kib + 1) * 1024


def compress_opts(args: List[str]) -> List[str]:
    return [a for a in args if a.startswith(("--compress", "-z", "--zc", "--zl"))]


@pytest.mark.parametrize("caps,level,expected", [
    # rsync with zstd (3.2.0+ built with libzstd): the level map block mode uses
    ("3.5.0", 7, ["--compress-choice=zstd", "--compress-level=1"]),
    ("3.5.0", 1, ["--compress-choice=zstd", "--compress-level=-7"]),
    ("3.5.0", 6, ["--compress-choice=zstd", "--compress-level=-1"]),
    ("3.5.0", 8, ["--compress-choice=zstd", "--compress-level=3"]),
    ("3.5.0", 10, ["--compress-choice=zstd", "--compress-level=19"]),
    ("3.2.7", 7, ["--compress-choice=zstd", "--compress-level=1"]),
    ("3.2.7", 3, ["--compress-choice=zstd", "--compress-level=-4"]),
    # 3.2 without zstd: no --compress-choice (it negotiates what both sides have), zlib's levels
    ("3.2.3-nozstd", 7, ["--compress", "--compress-level=1"]),
    ("3.2.3-nozstd", 9, ["--compress", "--compress-level=6"]),
    # 3.1.x: neither zstd nor --compress-choice; only levels -1..9 exist (-1 means 6): 1..9 sent
    ("3.1.2", 7, ["--compress", "--compress-level=1"]),
    ("3.1.2", 1, ["--compress", "--compress-level=1"]),
    ("3.1.2", 8, ["--compress", "--compress-level=3"]),
    ("3.1.2", 10, ["--compress", "--compress-level=9"]),
    # 0 is off everywhere: no compression option at all
    ("3.5.0", 0, []), ("3.2.3-nozstd", 0, []), ("3.1.2", 0, []),
])
def test_compression_args_per_rsync_capability(tmp_path: Path, caps: str, level: int,
                                               expected: List[str]) -> None:
    c = CAPS[caps]
    rep = make(tmp_path, options=TransferOptions(compression=level), version=c.version, caps=c)
    assert compress_opts(rep.build_args(FULL, "/srv/data")) == expected
    assert compress_opts(rep.build_args(INCR, "/srv/data")) == expected


def test_old_rsync_never_gets_a_level_it_refuses(tmp_path: Path) -> None:
    """rsync 3.1.x answers a --compress-level outside -1..9 with "--compress-level value is
    invalid", and reads -1 as zlib's default 6: every console level must give 1..9 there."""
    for level in range(1, 11):
        args = rsync.compression_args(level, CAPS["3.1.2"])
        assert args[0] == "--compress" and 1 <= int(args[1].split("=")[1]) <= 9
        assert not any("choice" in a for a in args)


def test_default_compression_stays_cheap(tmp_path: Path) -> None:
    """The console's default must stay zstd's cheapest regular level (or zlib 1): rsync's own
    default for -z (zstd 3) or the old pass-through (--compress-level=7 = zstd 7) made a LAN full
    pass 2-3x slower than plain rsync over ssh (docs/performance.md, issue 16)."""
    from go2cloud_client.commands import Options

    assert TransferOptions().compression == levels.DEFAULT == 7
    assert Options().compression == levels.DEFAULT
    for name, caps in CAPS.items():
        args = compress_opts(make(tmp_path, version=caps.version, caps=caps).build_args(FULL, "/srv"))
        level = int(args[-1].split("=")[1])
        assert level <= 1, (name, args)
    assert levels.zstd_level(levels.DEFAULT) == 1 and levels.zlib_level(levels.DEFAULT) == 1


def test_one_level_map_for_both_modes() -> None:
    """Block mode's codec and file mode read the same map (not a copy of it)."""
    from go2cloud_client.replication.block import codec

    assert [codec.zstd_level(n) for n in range(11)] == [None, *levels.ZSTD_LEVELS[1:]]
    assert codec.zstd_level is levels.zstd_level


def test_compression_out_of_range_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make(tmp_path, options=TransferOptions(compression=11))


def test_checksum_flag(tmp_path: Path) -> None:
    assert "--checksum" in make(tmp_path, options=TransferOptions(checksum=True)).build_args(FULL, "/srv")


def test_old_rsync_gets_no_mkpath_or_modify_window(tmp_path: Path) -> None:
    args = make(tmp_path, version=(3, 1, 2)).build_args(FULL, "/srv/data")
    assert "--mkpath" not in args and "--modify-window=-1" not in args
    assert compress_opts(args) == ["--compress", "--compress-level=1"]


def test_a_version_alone_means_no_zstd(tmp_path: Path) -> None:
    """A caller that knows only the version (no compress list) gets the zlib arguments, which
    every rsync takes."""
    args = make(tmp_path, version=(3, 4, 1)).build_args(FULL, "/srv/data")
    assert compress_opts(args) == ["--compress", "--compress-level=1"]


def test_version_output_parsing() -> None:
    assert CAPS["3.5.0"] == RsyncCapabilities((3, 5, 0), ("zstd", "lz4", "zlibx", "zlib", "none"))
    assert CAPS["3.5.0"].has_zstd and CAPS["3.2.7"].has_zstd
    assert CAPS["3.2.3-nozstd"].has_compress_choice and not CAPS["3.2.3-nozstd"].has_zstd
    assert CAPS["3.1.2"] == RsyncCapabilities((3, 1, 2), ()) and not CAPS["3.1.2"].has_compress_choice
    # a 3.1 with a line that happens to mention zstd elsewhere is still 3.1: no --compress-choice
    assert not RsyncCapabilities((3, 1, 3), ("zstd",)).has_zstd


#: what rsync 3.5.0 printed when the target's rsync would not take --compress-choice=zstd (real
#: runs against a daemon: started with RSYNC_COMPRESS_LIST=zlib, and with "refuse options =
#: compress-choice"); the third is the form of rsync 3.1.x's "unknown option" error (no 3.1 here)
ZSTD_REFUSALS = [
    (12, "Your --compress-choice value (zstd) was refused by the server.\n"
         "rsync error: requested action not supported (code 4) at compat.c(450) [Receiver=3.5.0]\n"
         "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
         "rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]\n"),
    (4, "rsync: The server is configured to refuse --compress-choice\n"
        "rsync error: requested action not supported (code 4) at clientserver.c(1267) [Receiver=3.5.0]\n"
        "rsync: [sender] read error: Connection reset by peer (104)\n"),
    (1, "rsync: on remote machine: --compress-choice=zstd: unknown option\n"
        "rsync error: syntax or usage error (code 1) at main.c(1596) [server=3.1.2]\n"),
]


@pytest.mark.parametrize("rc,err", ZSTD_REFUSALS)
def test_a_target_refusing_zstd_gets_zlib_at_once_and_from_then_on(tmp_path: Path, rc: int, err: str) -> None:
    rep = make(tmp_path, max_passes=1)
    calls = scripted(rep, [FakeProc(rc, [], err), FakeProc(0, STATS)])
    result = rep.run_cycle(FULL, threading.Event())
    assert result.passes == 1  # the refused run moved nothing: it is not a pass
    assert compress_opts(calls[0]) == ["--compress-choice=zstd", "--compress-level=1"]
    assert compress_opts(calls[1]) == ["--compress", "--compress-level=1"]
    # the next cycle (a new replicator for the same target) starts with zlib
    again = make(tmp_path)
    assert compress_opts(again.build_args(INCR, "/srv/data")) == ["--compress", "--compress-level=1"]


def test_zlib_refused_too_is_an_error_not_a_loop(tmp_path: Path) -> None:
    """A failure that mentions --compress-choice while zlib is in use is the run's real error."""
    rep = make(tmp_path)
    rc, err = ZSTD_REFUSALS[0]
    calls = scripted(rep, [FakeProc(rc, [], err), FakeProc(rc, [], err)])
    with pytest.raises(RsyncConnectionError):
        rep.run_cycle(FULL, threading.Event())
    assert len(calls) == 2


def test_other_failures_keep_zstd(tmp_path: Path) -> None:
    rep = make(tmp_path)
    scripted(rep, [FakeProc(5, [], "@ERROR: auth failed on module t-abc\n")])
    with pytest.raises(RsyncConnectionError):
        rep.run_cycle(FULL, threading.Event())
    assert not rsync._ZSTD_REFUSED


def test_password_never_in_argv_or_repr(tmp_path: Path) -> None:
    rep = make(tmp_path, paths=["/srv/data", "/"], options=TransferOptions(12, 3, True))
    for cycle in (FULL, INCR):
        for p in rep.paths:
            assert not any(PASSWORD in a for a in rep.build_args(cycle, p))
    assert PASSWORD not in repr(TARGET) and PASSWORD not in str(TARGET)
    env = rep._env(3, "/srv/data")
    assert env["RSYNC_PASSWORD"] == PASSWORD
    assert PASSWORD not in tunnel.command()
    assert PASSWORD not in str(tunnel.tunnel_env(URL, FINGERPRINT, 3, "/srv"))


def test_tunnel_executable_is_rsyncs_remote_shell(tmp_path: Path) -> None:
    rep = make(tmp_path, tunnel_executable="/opt/go2cloud agent/go2cloud_client")
    args = rep.build_args(INCR, "/srv/data")
    i = args.index("-e")
    assert args[i + 1] == "'/opt/go2cloud agent/go2cloud_client' rsync-tunnel"
    assert args[i + 2:] == ["--", "/srv/data/", "t-abc@go2cloud::t-abc/000003/srv/data/"]
    assert args.index("--link-dest=../../../000002/srv/data") < i  # every option before the operands


def test_target_spec_where_and_repr() -> None:
    assert TARGET.spec() == "t-abc@go2cloud::t-abc/"
    assert TARGET.spec("000002/srv/") == "t-abc@go2cloud::t-abc/000002/srv/"
    assert TARGET.where == "10.0.0.9:8443"
    assert repr(TARGET) == f"RsyncTarget(url={URL!r}, module='t-abc', user='t-abc', password='***')"


@pytest.mark.parametrize("url", [
    "http://10.0.0.9:8443/rsync/v1/tasks/t-abc",  # plain http only to a loopback address
    "https://10.0.0.9:8443/block/v1/tasks/t-abc",
    "https://10.0.0.9:8443/rsync/v1/tasks/",
    "https://10.0.0.9:8443/rsync/v1/tasks/t-abc/x",
    "https://10.0.0.9:8443/rsync/v1/tasks/t-abc?x=1",
    "rsync://10.0.0.9:8873/t-abc",
    "https:///rsync/v1/tasks/t-abc",
])
def test_bad_target_urls_refused(tmp_path: Path, url: str) -> None:
    bad = RsyncTarget(url, FINGERPRINT, "t-abc", "t-abc", PASSWORD)
    with pytest.raises(ValueError):
        FileReplicator(target=bad, paths=["/srv"], options=TransferOptions(), excludes_file=tmp_path / "ex",
                       work_dir=tmp_path / "work", version=(3, 5, 0), estimate_totals=False)


def test_plain_http_to_loopback_accepted(tmp_path: Path) -> None:
    local = RsyncTarget("http://127.0.0.1:8080/rsync/v1/tasks/t-abc", "", "t-abc", "t-abc", PASSWORD)
    rep = FileReplicator(target=local, paths=["/srv"], options=TransferOptions(),
                         excludes_file=tmp_path / "ex", work_dir=tmp_path / "work", version=(3, 5, 0),
                         estimate_totals=False)
    assert rep.build_args(FULL, "/srv")[-1] == "t-abc@go2cloud::t-abc/000001/srv/"


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/a//b", "/a\nb", "/a\x00b"])
def test_bad_paths_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        make(tmp_path, paths=[bad])


def test_bad_cycle_names_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make(tmp_path).build_args(Cycle(1, "../x", None, False), "/srv")
    with pytest.raises(ValueError):
        make(tmp_path).build_args(Cycle(2, "000002", "/etc", True), "/srv")


# --- running with a scripted fake process ------------------------------------------------------

class FakeProc:
    def __init__(self, rc: int, lines: List[str], stderr: str = "", block: Optional[threading.Event] = None):
        self.rc, self.lines, self.stderr_text, self.block = rc, lines, stderr, block
        self.pid = 4242
        self.terminated = False
        self._ended = threading.Event()
        if block is None:
            self._ended.set()
        else:
            threading.Thread(target=lambda: (block.wait(), self._ended.set()), daemon=True).start()

    def start(self, on_line: Callable[[str], None]) -> FakeProc:
        for line in self.lines:
            on_line(line)
        return self

    def poll(self) -> Optional[int]:
        if self.terminated:
            return -15
        if self.block is not None and not self.block.is_set():
            return None
        return self.rc

    def wait(self, timeout=None) -> int:
        """Blocks like a real child: until it ends (its block event) or is terminated."""
        self._ended.wait(timeout)
        rc = self.poll()
        return rc if rc is not None else self.rc

    def terminate(self) -> None:
        self.terminated = True
        self._ended.set()

    @property
    def stderr(self) -> str:
        return self.stderr_text


def scripted(rep: FileReplicator, procs: List[FakeProc],
             envs: Optional[List[Dict[str, str]]] = None) -> List[List[str]]:
    calls: List[List[str]] = []

    def spawn(args, on_line, env):
        calls.append(args)
        if envs is not None:
            envs.append(env)
        return procs.pop(0).start(on_line)

    rep._spawn = spawn  # type: ignore[method-assign]
    return calls


def test_success_aggregates_stats_and_progress(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rsync, "PROGRESS_INTERVAL", 0.0)
    seen: List[Progress] = []
    children: List[Optional[int]] = []
    rep = make(tmp_path, paths=["/a", "/b"], on_progress=seen.append, on_child=children.append)
    lines = ["       500  50%    1.00MB/s    0:00:01 (xfr#1, to-chk=1/3)", *STATS]
    envs: List[Dict[str, str]] = []
    calls = scripted(rep, [FakeProc(0, lines), FakeProc(0, lines)], envs)
    result = rep.run_cycle(FULL, threading.Event())
    assert len(calls) == 2
    # each run's tunnel learns the target, the pin, the cycle and the path from its environment
    for env, path in zip(envs, ["/a", "/b"]):
        keys = ("GO2CLOUD_RSYNC_URL", "GO2CLOUD_RSYNC_FINGERPRINT", "GO2CLOUD_RSYNC_CYCLE",
                "GO2CLOUD_RSYNC_PATH", "RSYNC_PASSWORD")
        assert {k: env[k] for k in keys} == {
            "GO2CLOUD_RSYNC_URL": URL, "GO2CLOUD_RSYNC_FINGERPRINT": FINGERPRINT, "GO2CLOUD_RSYNC_CYCLE": "1",
            "GO2CLOUD_RSYNC_PATH": path, "RSYNC_PASSWORD": PASSWORD}
    assert not any(PASSWORD in a for call in calls for a in call)
    assert (result.bytes_total, result.bytes_sent, result.files, result.passes) == (2000, 2468, 4, 1)
    assert children == [4242, None, 4242, None]
    final = seen[-1].to_dict()
    assert final["bytes_total"] == final["bytes_done"] == 2000
    assert [p["state"] for p in final["paths"]] == ["done", "done"]
    running = [p for p in seen if p.paths[0].state == "running" and p.paths[0].bytes_done == 500]
    assert running and running[0].paths[0].bytes_total == 1000 and running[0].rate_bps == 1024 ** 2
    assert set(result.to_dict()) == {"cycle", "bytes_total", "bytes_sent", "files", "passes",
                                     "started_at", "finished_at"}
    filt = (tmp_path / "work" / "rsync-filter").read_text()
    assert filt == "- /tmp/*\n- --delete\n"


def test_exit_24_runs_another_pass_then_gives_up(tmp_path: Path) -> None:
    rep = make(tmp_path, max_passes=3)
    vanished = 'file has vanished: "/srv/data/spool/x1"\n'
    scripted(rep, [FakeProc(24, [], vanished), FakeProc(0, STATS)])
    assert rep.run_cycle(FULL, threading.Event()).passes == 2

    rep = make(tmp_path, max_passes=3)
    calls = scripted(rep, [FakeProc(24, [], vanished) for _ in range(3)])
    with pytest.raises(RsyncVanishedError, match="kept vanishing during 3") as info:
        rep.run_cycle(FULL, threading.Event())
    assert len(calls) == 3 and "/srv/data/spool/x1" in str(info.value) and info.value.retryable


def test_exit_23_names_the_failing_paths(tmp_path: Path) -> None:
    err = "".join(f'rsync: [sender] send_files failed to open "/srv/data/f{i}": Permission denied (13)\n'
                  for i in range(8))
    err += "rsync error: some files/attrs were not transferred (see previous errors) (code 23)\n"
    rep = make(tmp_path)
    scripted(rep, [FakeProc(23, [], err)])
    with pytest.raises(RsyncPartialTransferError) as info:
        rep.run_cycle(FULL, threading.Event())
    msg = str(info.value)
    assert "/srv/data/f0" in msg and "/srv/data/f4" in msg and "/srv/data/f5" not in msg
    assert "8 file(s)" in msg and "and 3 more" in msg and not info.value.retryable


@pytest.mark.parametrize("rc", [5, 10, 12, 30, 35])
def test_connection_codes_are_retryable(tmp_path: Path, rc: int) -> None:
    rep = make(tmp_path)
    scripted(rep, [FakeProc(rc, [], "@ERROR: auth failed on module t-abc\n")])
    with pytest.raises(RsyncConnectionError) as info:
        rep.run_cycle(FULL, threading.Event())
    assert info.value.retryable and "credentials" in str(info.value) and PASSWORD not in str(info.value)


def test_other_codes_are_replication_errors(tmp_path: Path) -> None:
    rep = make(tmp_path)
    scripted(rep, [FakeProc(11, [], "rsync error: error in file IO (code 11)\n")])
    with pytest.raises(ReplicationError, match="exit 11"):
        rep.run_cycle(FULL, threading.Event())


def test_cancel_terminates_and_raises(tmp_path: Path) -> None:
    children: List[Optional[int]] = []
    rep = make(tmp_path, paths=["/a", "/b"], on_child=children.append)
    proc = FakeProc(0, [], block=threading.Event())
    calls = scripted(rep, [proc])
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(TransferCancelled):
        rep.run_cycle(FULL, cancel)
    assert proc.terminated and len(calls) == 1 and children == [4242, None]


def test_cancel_before_start_runs_nothing(tmp_path: Path) -> None:
    rep = make(tmp_path)
    calls = scripted(rep, [])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TransferCancelled):
        rep.run_cycle(FULL, cancel)
    assert calls == []


def test_old_rsync_creates_parents_first(tmp_path: Path) -> None:
    rep = make(tmp_path, paths=["/srv/deep/data"], version=(3, 1, 3))
    envs: List[Dict[str, str]] = []
    calls = scripted(rep, [FakeProc(0, []), FakeProc(0, []), FakeProc(0, STATS)], envs)
    rep.run_cycle(FULL, threading.Event())
    assert calls[0][-1] == "t-abc@go2cloud::t-abc/000001/srv/"
    assert calls[1][-1] == "t-abc@go2cloud::t-abc/000001/srv/deep/"
    assert calls[0][1:3] == ["-d", "--timeout=120"] and calls[0][-3] == "--"
    assert calls[0][3:5] == ["-e", tunnel.command()]
    # the parents are created in the session of the path they lead to (the target allows them)
    runs = [(e["GO2CLOUD_RSYNC_CYCLE"], e["GO2CLOUD_RSYNC_PATH"]) for e in envs]
    assert runs == [("1", "/srv/deep/data")] * 3
    assert calls[2][-1].endswith("/000001/srv/deep/data/")


def test_version_parsing() -> None:
    assert rsync.parse_version("rsync  version 3.2.7  protocol version 31\n") == (3, 2, 7)
    assert rsync.parse_version("rsync  version v3.1.2  protocol version 31") == (3, 1, 2)
    assert rsync.parse_version("rsync  version 3.5.0  protocol version 32") == (3, 5, 0)


def test_failed_paths_parsing() -> None:
    err = ('rsync: [sender] send_files failed to open "/a b/c": Permission denied (13)\n'
           'file has vanished: "/x/y"\n'
           'rsync: [generator] recv_generator: mkdir "/d" failed: No space left on device (28)\n'
           'rsync error: some files/attrs were not transferred (see previous errors) (code 23)\n')
    assert rsync.failed_paths(err) == ["/a b/c", "/x/y", "/d"]


def test_progress_is_throttled(tmp_path: Path) -> None:
    seen: List[Progress] = []
    rep = make(tmp_path, on_progress=seen.append)
    lines = [f"  {i}00  {i}%  1.00MB/s  0:00:01" for i in range(1, 100)] + STATS
    scripted(rep, [FakeProc(0, lines)])
    rep.run_cycle(FULL, threading.Event())
    assert len(seen) <= 4  # start, at most one or two throttled updates, done


# --- the tunnel's refusal (HTTP status before the upgrade) decides the error, not rsync's exit --

def _refused(status: int, said: str) -> str:
    return (f"go2cloud rsync tunnel: the target refused the rsync session (HTTP {status}): {said}\n"
            "rsync: did not see server greeting\n"
            "rsync error: error starting client-server protocol (code 5) at main.c(1954)\n")


@pytest.mark.parametrize("rc", [2, 5, 12, 255])
@pytest.mark.parametrize("status,said,code,retryable,words", [
    (409, "another agent session holds source s-1 (stale_epoch)", "stale_epoch", False, "--abort"),
    (507, "the target is full (target_full)", "target_full", False, "free space"),
    (401, "bad credentials (unauthorized)", "rsync_connection_failed", True, "credentials were not accepted"),
    (404, "no open cycle 3 (not_found)", "rsync_connection_failed", True, "not open on the target"),
    (409, "task is paused (conflict)", "rsync_connection_failed", True, "state does not allow"),
    (500, "internal error (internal_error)", "rsync_connection_failed", True, "internal error"),
    (503, "try again (server_busy)", "rsync_connection_failed", True, "busy"),
])
def test_a_refused_tunnel_maps_to_its_error_whatever_rsync_exits(tmp_path: Path, rc: int, status: int,
                                                                  said: str, code: str, retryable: bool,
                                                                  words: str) -> None:
    rep = make(tmp_path)
    scripted(rep, [FakeProc(rc, [], _refused(status, said))])
    with pytest.raises(ReplicationError) as info:
        rep.run_cycle(FULL, threading.Event())
    err = info.value
    assert (err.code, err.retryable) == (code, retryable), err
    assert words in str(err) and PASSWORD not in str(err)
    if code == "rsync_connection_failed":
        assert f"HTTP {status}" in str(err) and said in str(err)


def test_a_refusal_line_without_a_failed_exit_is_not_an_error(tmp_path: Path) -> None:
    rep = make(tmp_path)
    scripted(rep, [FakeProc(0, STATS, _refused(503, "busy"))])
    assert rep.run_cycle(FULL, threading.Event()).passes == 1


@pytest.mark.allow_subprocess
def test_rsync_version_is_read_once_per_binary(tmp_path):
    """Every cycle asks for the version: the binary runs once, and again when it is replaced."""
    calls = tmp_path / "calls"
    fake = tmp_path / "rsync"

    def install(version: str) -> None:
        fake.write_text(f"#!/bin/sh\necho x >> {calls}\n"
                        f"echo 'rsync  version {version}  protocol version 31'\n")
        fake.chmod(0o755)

    install("3.2.7")
    assert rsync.rsync_version(str(fake)) == (3, 2, 7)
    assert rsync.rsync_version(str(fake)) == (3, 2, 7)
    assert calls.read_text().count("x") == 1
    fake.unlink()  # an upgrade: a new file (new inode and mtime)
    install("3.3.0")
    assert rsync.rsync_version(str(fake)) == (3, 3, 0)
    assert calls.read_text().count("x") == 2


def _tree(root: Path, files: int) -> int:
    total = 0
    for i in range(files):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"x" * (100 + i))
        total += 100 + i
    return total


def test_estimate_scans_a_path_until_rsync_knows_its_total(tmp_path: Path) -> None:
    """The background estimate walks the source only while rsync has not built its file list:
    once a progress line of a whole list arrives for a path, the walk leaves that path alone
    (on 20,000 files it cost the agent a third of its CPU per cycle, competing with rsync)."""
    a, b = tmp_path / "a", tmp_path / "b"
    size_b = _tree(b, 40)
    _tree(a, 40)
    (tmp_path / "w").mkdir()
    rep = make(tmp_path / "w", paths=(str(a), str(b)))
    rep._progress = [PathProgress(path=str(a)), PathProgress(path=str(b))]
    run = _PathRun(rep._progress[0])
    rep._on_line(run, "      1,000  50%   1.00MB/s    0:00:01 (xfr#1, to-chk=10/20)")
    assert rep._progress[0].bytes_total == 2000  # rsync's own total: 1,000 bytes at 50%
    rep._estimate(excludes_mod.load(rep.excludes_file), threading.Event())
    assert rep._progress[0].bytes_total == 2000  # not replaced by the walk's sum
    assert rep._progress[1].bytes_total == size_b  # still estimated: rsync has not reached it


def test_estimate_ignores_a_list_still_being_built(tmp_path: Path) -> None:
    """A progress line while rsync still scans incrementally (ir-chk) leaves the estimate on."""
    a = tmp_path / "a"
    size_a = _tree(a, 30)
    (tmp_path / "w").mkdir()
    rep = make(tmp_path / "w", paths=(str(a),))
    rep._progress = [PathProgress(path=str(a))]
    rep._on_line(_PathRun(rep._progress[0]), "  10  1%  1.00kB/s  0:00:09 (xfr#1, ir-chk=5/9)")
    rep._estimate(excludes_mod.load(rep.excludes_file), threading.Event())
    assert rep._progress[0].bytes_total == size_a
