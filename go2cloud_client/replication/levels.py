"""The console's compression scale 0-10, and what each level means to zstd and to zlib.

One map for both replication modes: block mode compresses chunks with zstd at
:data:`ZSTD_LEVELS` (``block.codec``), file mode asks rsync for the same zstd level
(``--compress-choice=zstd --compress-level=N``) and falls back to :data:`ZLIB_LEVELS` when the
agent's or the target's rsync has no zstd (``replication.rsync``). 0 is off everywhere.

The console's default 7 is zstd level 1, its fastest regular level: measured on binaries and text
from /usr (bench/bench_block.py) it compresses ~300 MB/s per core to 0.49, where zstd's own default
3 gives 0.455 at ~150 MB/s; on a 2-core source that halves the CPU a full pass costs for 7% more
bytes. The low levels are zstd's "fast" negative levels (slow CPUs, fast links), the top ones
trade a lot of CPU for a few percent (thin links)::

    console  0    1   2   3   4   5   6  7  8  9  10
    zstd     off -7  -5  -4  -3  -2  -1  1  3  9  19
    zlib     off  1   1   1   1   1   1  1  3  6   9

zlib has nothing faster than its level 1, so 1-7 all mean 1 there; 9 is zlib's default (6), 10 its
maximum. Every zlib value is in 1..9, which every rsync accepts (3.1.x refuses anything outside
-1..9 and reads -1 as 6; 3.2.0 and later clamp silently).
"""

from __future__ import annotations

from typing import Optional, Tuple

#: console level (index) -> zstd level; index 0 (off) is never used for a compressor
ZSTD_LEVELS: Tuple[int, ...] = (0, -7, -5, -4, -3, -2, -1, 1, 3, 9, 19)
#: console level (index) -> zlib level (rsync without zstd)
ZLIB_LEVELS: Tuple[int, ...] = (0, 1, 1, 1, 1, 1, 1, 1, 3, 6, 9)
#: the console's default
DEFAULT = 7


def check(level: object) -> int:
    """``level`` if it is a console level (an int 0-10), else ValueError."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 10:
        raise ValueError(f"compression must be 0-10, not {level!r}")
    return level


def zstd_level(level: int) -> Optional[int]:
    """Console level 0-10 -> zstd level (None = compression off)."""
    return None if check(level) == 0 else ZSTD_LEVELS[level]


def zlib_level(level: int) -> Optional[int]:
    """Console level 0-10 -> zlib level (None = compression off)."""
    return None if check(level) == 0 else ZLIB_LEVELS[level]


__all__ = ["DEFAULT", "ZLIB_LEVELS", "ZSTD_LEVELS", "check", "zlib_level", "zstd_level"]
