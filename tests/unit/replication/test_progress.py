from __future__ import annotations

import pytest

from go2cloud_client.replication.progress import parse_progress, parse_stats


@pytest.mark.parametrize("line,done,pct,rate,eta", [
    ("  1,234,567  45%   12.34MB/s    0:00:05 (xfr#3, to-chk=10/20)", 1234567, 45, 12.34 * 1024 ** 2, 5),
    ("         32,768   0%    0.00kB/s    0:00:00  ", 32768, 0, 0.0, 0),
    ("     31,457,280  85%   19.60MB/s    0:00:01 (xfr#1, to-chk=53/55)", 31457280, 85, 19.6 * 1024 ** 2, 1),
    ("  999  100%  1.50GB/s  1:02:03 (xfr#9, ir-chk=1000/2000)", 999, 100, 1.5 * 1024 ** 3, 3723),
    ("  123456789 9% 512.00kB/s 10:00:00", 123456789, 9, 512 * 1024, 36000),
    ("  1.23M  50%  1.00MB/s  0:00:01", int(1.23 * 1024 ** 2), 50, 1024 ** 2, 1),
    ("  100  1%  0.00kB/s  ??:??:??", 100, 1, 0.0, None),
])
def test_progress_lines(line: str, done: int, pct: int, rate: float, eta) -> None:
    p = parse_progress(line)
    assert p is not None
    assert p.bytes_done == done and p.percent == pct
    assert p.rate_bps == pytest.approx(rate)
    assert p.eta_s == eta


def test_progress_bracket_fields() -> None:
    p = parse_progress("  5  0%  0.00kB/s  0:00:00 (xfr#1, to-chk=51/55)")
    assert (p.xfr, p.to_check, p.total_files, p.incremental_scan) == (1, 51, 55, False)
    p = parse_progress("  5  0%  0.00kB/s  0:00:00 (xfr#1, ir-chk=51/55)")
    assert p.incremental_scan


@pytest.mark.parametrize("junk", ["", "sending incremental file list", "docs/small.txt",
                                  "rsync: [sender] send_files failed to open \"x\": Permission denied (13)",
                                  "  12 345% 1.00MB/s 0:00:01", "Number of files: 55 (reg: 52, dir: 3)",
                                  "abc  45%   12.34MB/s    0:00:05", "  1,234  45%  12.34XB/s  0:00:05",
                                  "\x00\xff garbage"])
def test_junk_lines(junk: str) -> None:
    assert parse_progress(junk) is None


STATS = """
Number of files: 1,055 (reg: 1,052, dir: 3)
Number of created files: 0
Number of deleted files: 0
Number of regular files transferred: 17
Total file size: 36,700,304 bytes
Total transferred file size: 5 bytes
Literal data: 5 bytes
Matched data: 0 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 915
Total bytes received: 32

sent 915 bytes  received 32 bytes  1,894.00 bytes/sec
total size is 36,700,304  speedup is 38,754.28
"""


def test_stats() -> None:
    s = parse_stats(STATS)
    assert s.files == 1055 and s.regular_files == 1052
    assert s.files_transferred == 17
    assert s.total_file_size == 36700304 and s.transferred_file_size == 5
    assert s.bytes_sent == 915 and s.bytes_received == 32
    assert s.complete


def test_stats_without_separators_and_partial() -> None:
    s = parse_stats("Total file size: 1234 bytes\nrandom\n")
    assert s.total_file_size == 1234 and s.bytes_sent is None and not s.complete
