"""Adaptive compression: send compressed only while that moves the disk faster than sending raw.

Compression trades the source's CPU for bytes on the link. On a thin link it is what makes a pass
fast; on a fast one (a LAN, a target next to the source, a source with few cores) the compressor
is the slowest stage and the pass is faster raw: in our benchmark, compression level 7 made a full
pass 25-60% slower than level 0 (docs/performance.md). Which case a pass is in cannot be predicted
from the compressor's speed and the link's speed measured apart: the "link" includes the target's
CPU and disk, and when both ends share cores, compressing takes CPU from the receiver. So it is
measured, by trials (``zstd --adapt`` watches its output buffer instead: that predicts).

**Trials.** With no bandwidth limit, the pass's data chunks go in *trial windows* of
``trial_bytes`` each (four times the bytes that can be in flight, so that most of a window is
measured in steady state; at least :data:`TRIAL_MIN`, at most :data:`TRIAL_MAX`). A round is
three windows: the current choice, the other mode, the current choice again (A-B-A: a target
that slows down along the pass, a disk whose write cache fills, would otherwise favour whichever
mode went first). A window is measured from its first acknowledgement by the target until the
workers move on to the next window; later acknowledgements are not counted (they share the CPU
with the next window's work). A mode's rate is the mean of its windows' rates. Only data chunks
count; the time also covers the holes and unchanged chunks read in between, so in an incremental
pass with scattered changes the rates say less (A-B-A evens out changes spread alike).

**Choice.** The first choice is to compress: a disk with less data than one trial window is
compressed as the level says (a larger one sends one trial window raw, even on a thin link). A
round replaces the choice only when the other mode was at least :data:`MARGIN` faster: a tie (a
pass bound by the target's disk, say) keeps what is running, and noise does not flip it back and
forth. The choice then holds for :data:`EXPLOIT_TRIALS` trial sizes of data before the next round
(the data and the link change along a disk); each round costs the losing mode's windows, so a
round that clearly confirms the choice doubles that period, up to :data:`MAX_EXPLOIT_TRIALS`, and
one that changes it starts again from :data:`EXPLOIT_TRIALS`. A tie, or a round that could not
measure (too little data acknowledged: small incremental passes, or windows capped below what a
source with many cores has in flight), keeps the choice for only :data:`TIE_EXPLOIT_TRIALS`: a
tie says the pass is bound elsewhere for now (by a target disk that is flushing, say) and that can
change soon.

**Bandwidth limit.** Under a limit every data chunk is compressed: the limit is the bottleneck
the operator chose, and each byte saved is time saved. Level 0 is off. Any change of level or of
the limit (``modify``) starts over, compressed first; a new pipeline (the next disk, the repair
after a verify) measures its open window again and keeps the windows already measured.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

LOG = logging.getLogger(__name__)

MiB = 1024 * 1024
#: smallest trial window (bytes of data chunks)
TRIAL_MIN = 64 * MiB
#: a trial window is this many times the bytes that can be in flight ...
TRIAL_INFLIGHT = 4
#: ... but at most this (a source with many cores has much in flight; a window that cannot be
#: measured keeps the choice, compression)
TRIAL_MAX = 1024 * MiB
#: after a round, its choice holds for this many trial sizes of data before the next round
EXPLOIT_TRIALS = 16
#: ... doubled by each round that confirms the choice, up to this many
MAX_EXPLOIT_TRIALS = 128
#: after a tie or a round that could not measure: this many
TIE_EXPLOIT_TRIALS = 4
#: the other mode must be this much faster than the current choice to replace it
MARGIN = 0.05
#: a window counts only when at least this share of it was measured, over at least MIN_SECONDS
MIN_MEASURED = 0.25
MIN_SECONDS = 0.02

ON = "compressed"
OFF = "raw"
#: what a disk's progress says when the level is 0
DISABLED = "off"


@dataclass
class _Window:
    id: int
    mode: str
    size: int
    assigned: int = 0
    first_ack: Optional[float] = None
    last_ack: Optional[float] = None
    measured: int = 0

    def sample(self) -> Optional[Tuple[int, float]]:
        """(bytes, seconds) measured after the first acknowledgement, or None when too little."""
        if self.first_ack is None or self.last_ack is None:
            return None
        seconds = self.last_ack - self.first_ack
        if self.measured < self.size * MIN_MEASURED or seconds < MIN_SECONDS:
            return None
        return self.measured, seconds


def _rate(windows: List[_Window]) -> Optional[float]:
    """The mean of the rates of the windows that measured (a rate drifting linearly over A-B-A
    averages out to B's moment), None when none did."""
    rates = [b / t for b, t in (s for s in (w.sample() for w in windows) if s is not None)]
    return sum(rates) / len(rates) if rates else None


class AdaptiveCompression:
    """Chooses, data chunk by data chunk, the zstd level to use: the console's ``level`` or 0 (raw).

    Thread-safe: :meth:`choose` is called by the encoding workers, :meth:`acked` by the senders
    once the target acknowledged the chunk; the window id returned by ``choose`` travels with the
    chunk (0 = not part of a trial)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, trial_min: int = TRIAL_MIN,
                 trial_inflight: int = TRIAL_INFLIGHT) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._trial_min = trial_min
        self._trial_inflight = trial_inflight
        self._trial_bytes = trial_min
        self._key: Optional[Tuple[int, bool]] = None
        self._choice = ON
        self._next_id = 1
        self._round = 0
        self._plan: list = []           # modes of the round's windows still to open
        self._window: Optional[_Window] = None
        self._done: Dict[str, List[_Window]] = {}  # mode -> closed windows of the current round
        self._exploit_left = 0
        self._exploit_trials = EXPLOIT_TRIALS
        self._measured: Optional[str] = None  # the last round's measured choice
        self.rounds: list = []          # (round, raw rate, compressed rate, choice), for reports

    @property
    def choice(self) -> str:
        return self._choice

    def start_transfer(self, inflight_bytes: int) -> None:
        """A new pipeline starts (a disk, or the repair after a verify): an open trial window would
        measure the time between pipelines, so it is opened again (its mode first in the plan);
        windows already closed keep their measurement."""
        with self._lock:
            self._trial_bytes = min(TRIAL_MAX, max(self._trial_min, self._trial_inflight * inflight_bytes))
            if self._window is not None:
                self._plan.insert(0, self._window.mode)
                self._window = None

    def choose(self, level: int, limited: bool, nbytes: int) -> Tuple[int, int]:
        """(zstd console level to use, trial window id) for a data chunk of ``nbytes``."""
        with self._lock:
            key = (level, limited)
            if key != self._key:
                self._key = key
                self._choice = ON
                self._exploit_trials = EXPLOIT_TRIALS
                self._measured = None
                self._new_round()
            if level == 0 or limited:
                return level, 0
            if self._window is None and self._exploit_left <= 0:
                self._open_next()
            w = self._window
            if w is None:  # exploiting the last round's choice
                self._exploit_left -= nbytes
                return (level if self._choice == ON else 0), 0
            w.assigned += nbytes
            if w.assigned >= w.size:
                self._close(w)
            return (level if w.mode == ON else 0), w.id

    def acked(self, window: int, nbytes: int) -> None:
        """The target acknowledged ``nbytes`` of data chunks encoded in trial ``window``."""
        if not window:
            return
        with self._lock:
            now = self._clock()  # under the lock: two senders' acknowledgements stay in order
            w = self._window if self._window is not None and self._window.id == window else None
            if w is None:
                return  # closed (its tail overlaps the next window's work) or an earlier round
            if w.first_ack is None:
                w.first_ack = now  # the clock starts here: these bytes took an unknown time
                return
            w.measured += nbytes
            w.last_ack = now

    # -- rounds (under self._lock) -----------------------------------------------------------------
    def _new_round(self) -> None:
        self._round += 1
        self._plan = [ON, OFF, ON] if self._choice == ON else [OFF, ON, OFF]
        self._window = None
        self._done = {}
        self._exploit_left = 0

    def _open_next(self) -> None:
        if not self._plan:
            self._new_round()
        mode = self._plan.pop(0)
        self._window = _Window(self._next_id, mode, self._trial_bytes)
        self._next_id += 1

    def _close(self, w: _Window) -> None:
        """The workers move on: ``w`` stops counting; after the round's last window, decide."""
        self._done.setdefault(w.mode, []).append(w)  # measured up to its last acknowledgement before now
        self._window = None
        if self._plan:
            self._open_next()
            return
        raw, packed = _rate(self._done[OFF]), _rate(self._done[ON])
        rate = {OFF: raw, ON: packed}
        current, other = rate[self._choice], rate[OFF if self._choice == ON else ON]
        if current is None or other is None:
            verdict, trials = "too little data acknowledged to compare", TIE_EXPLOIT_TRIALS
            self._measured = None
        elif other >= current * (1 + MARGIN):  # the other mode is clearly faster: switch
            self._choice = self._measured = OFF if self._choice == ON else ON
            verdict, trials = f"{self._choice} is faster", EXPLOIT_TRIALS
            self._exploit_trials = EXPLOIT_TRIALS
        elif current >= other * (1 + MARGIN):  # clearly faster: keep, and check less often
            if self._measured == self._choice:
                self._exploit_trials = min(MAX_EXPLOIT_TRIALS, 2 * self._exploit_trials)
            else:
                self._exploit_trials = EXPLOIT_TRIALS
            self._measured = self._choice
            verdict, trials = f"{self._choice} is faster", self._exploit_trials
        else:  # a tie: the pass is bound elsewhere now (the target's disk?); that may change soon
            verdict, trials = "a tie", TIE_EXPLOIT_TRIALS
            self._measured = None
        LOG.info("adaptive compression: raw %s, compressed %s (%s): sending %s for the next %s MiB of data",
                 rate_text(raw), rate_text(packed), verdict, self._choice, trials * self._trial_bytes // MiB)
        self.rounds.append((self._round, raw, packed, self._choice))
        self._exploit_left = trials * self._trial_bytes


def rate_text(rate: Optional[float]) -> str:
    """A measured rate for the operator: ``290 MB/s`` or ``not measured``."""
    return "not measured" if rate is None else f"{rate / 1e6:.0f} MB/s"


__all__ = ["DISABLED", "AdaptiveCompression", "EXPLOIT_TRIALS", "MARGIN", "MAX_EXPLOIT_TRIALS", "OFF", "ON",
           "TIE_EXPLOIT_TRIALS", "TRIAL_INFLIGHT", "TRIAL_MAX", "TRIAL_MIN", "rate_text"]
