"""Adaptive compression (replication/block/adaptive.py): the trial rounds, measured with a clock the
test drives, so each case knows exactly which rate each mode had."""

from __future__ import annotations

import logging

import pytest

from go2cloud_client.replication.block import adaptive
from go2cloud_client.replication.block.adaptive import (
    EXPLOIT_TRIALS,
    MARGIN,
    MAX_EXPLOIT_TRIALS,
    OFF,
    ON,
    TIE_EXPLOIT_TRIALS,
    AdaptiveCompression,
)

MiB = 1024 * 1024
CHUNK = MiB
LEVEL = 7
INFLIGHT = 8 * MiB          # -> trial windows of max(64 MiB, 4 x 8 MiB) = 64 MiB
TRIAL = 64 * MiB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple:
    clock = Clock()
    ac = AdaptiveCompression(clock=clock)
    ac.start_transfer(INFLIGHT)
    return ac, clock


def run(ac: AdaptiveCompression, clock: Clock, nbytes: int, rates, *, lag: int = 4,
        batch: int = 4) -> list:
    """Feed ``nbytes`` of 1 MiB data chunks through a pipeline ``lag`` chunks deep: each chunk is
    acknowledged ``lag`` chunks after it was chosen, in batches of ``batch`` chunks (one call per
    window per batch, as the engine does). Time advances by the chunk's size over the rate of the
    mode it was sent in: ``rates[mode]``, or ``rates(mode, i)`` for the i-th chunk of this call.
    Returns the level chosen for each chunk."""
    levels: list = []
    pending: list = []
    for i in range(nbytes // CHUNK):
        level, window = ac.choose(LEVEL, False, CHUNK)
        levels.append(level)
        mode = ON if level else OFF
        clock.now += CHUNK / (rates(mode, i) if callable(rates) else rates[mode])
        pending.append(window)
        if len(pending) >= lag + batch:
            acks, pending = pending[:batch], pending[batch:]
            for w in sorted(set(acks)):
                ac.acked(w, CHUNK * acks.count(w))
    return levels


def test_level_0_is_off_and_opens_no_trial():
    ac, _ = make()
    assert ac.choose(0, False, CHUNK) == (0, 0)
    assert ac.rounds == [] and ac.choice == ON


def test_under_a_bandwidth_limit_every_chunk_is_compressed():
    ac, clock = make()
    for _ in range(3 * TRIAL // CHUNK):
        assert ac.choose(LEVEL, True, CHUNK) == (LEVEL, 0)
        clock.now += 0.01
    assert ac.rounds == []


def test_a_round_is_compressed_raw_compressed_then_keeps_the_faster():
    ac, clock = make()
    n = TRIAL // CHUNK
    levels = run(ac, clock, 3 * TRIAL + 16 * MiB, {ON: 100e6, OFF: 300e6})
    assert set(levels[:n]) == {LEVEL}            # the first trial window: compressed
    assert set(levels[n:2 * n]) == {0}           # the second: raw
    assert set(levels[2 * n:3 * n]) == {LEVEL}   # the third: compressed again
    assert set(levels[3 * n:]) == {0}            # raw was 3x faster: kept
    assert len(ac.rounds) == 1
    _, raw, packed, choice = ac.rounds[0]
    assert choice == OFF and raw == pytest.approx(300e6) and packed == pytest.approx(100e6)


def test_compression_is_kept_when_it_is_faster():
    ac, clock = make()
    levels = run(ac, clock, 3 * TRIAL + 16 * MiB, {ON: 250e6, OFF: 120e6})
    assert set(levels[3 * TRIAL // CHUNK:]) == {LEVEL}
    assert ac.rounds[0][3] == ON


def test_a_target_slowing_down_along_the_pass_does_not_favour_the_first_mode():
    n = TRIAL // CHUNK

    def slowing(speedup: float):
        # the target's speed falls linearly by half over the round (a disk whose cache fills)
        return lambda mode, i: 300e6 * (1 - 0.5 * i / (3 * n)) * (speedup if mode == OFF else 1)

    ac, clock = make()
    run(ac, clock, 3 * TRIAL, slowing(1.0))     # equal modes: a tie, compression kept
    assert ac.rounds[0][3] == ON
    _, raw, packed, _ = ac.rounds[0]
    assert raw == pytest.approx(packed, rel=0.05)  # A-B-A: the drift cancels
    ac, clock = make()
    run(ac, clock, 3 * TRIAL, slowing(1.2))     # raw 20% faster, though measured later: raw
    assert ac.rounds[0][3] == OFF


def test_the_other_mode_must_win_by_the_margin_to_replace_the_choice():
    n = TRIAL // CHUNK
    ac, clock = make()
    run(ac, clock, 3 * TRIAL, {ON: 200e6, OFF: 200e6 * (1 + MARGIN / 2)})
    assert ac.rounds[0][3] == ON
    ac, clock = make()
    run(ac, clock, 3 * TRIAL, {ON: 200e6, OFF: 200e6 * (1 + 2 * MARGIN)})
    assert ac.rounds[0][3] == OFF
    # raw running: compressed a little faster (a tie, within the margin) keeps raw, and the next
    # round comes sooner (a tie may be the target's disk flushing for a while) ...
    levels = run(ac, clock, (EXPLOIT_TRIALS + 3) * n * CHUNK, {ON: 200e6 * (1 + MARGIN / 2), OFF: 200e6})
    assert [r[3] for r in ac.rounds] == [OFF, OFF]
    assert levels[-n:] == [0] * n  # the round's last window (raw, raw-compressed-raw)
    # ... where compressed, now clearly faster, replaces it
    levels = run(ac, clock, (TIE_EXPLOIT_TRIALS + 3 + 1) * n * CHUNK,
                 {ON: 200e6 * (1 + 2 * MARGIN), OFF: 200e6})
    assert [r[3] for r in ac.rounds] == [OFF, OFF, ON]
    assert set(levels[:TIE_EXPLOIT_TRIALS * n]) == {0} and set(levels[-n:]) == {LEVEL}


def test_the_choice_is_measured_again_after_the_exploit_period_current_choice_first():
    ac, clock = make()
    n = TRIAL // CHUNK
    e = EXPLOIT_TRIALS * n
    levels = run(ac, clock, (3 * n + e + 3 * n) * CHUNK, {ON: 100e6, OFF: 300e6})
    assert set(levels[3 * n:3 * n + e]) == {0}
    # second round: raw (the current choice), compressed, raw
    second = levels[3 * n + e:]
    assert set(second[:n]) == {0} and set(second[n:2 * n]) == {LEVEL} and set(second[2 * n:]) == {0}
    assert [r[3] for r in ac.rounds] == [OFF, OFF]


def test_the_link_changing_along_the_pass_changes_the_choice():
    ac, clock = make()
    n = TRIAL // CHUNK
    run(ac, clock, (3 * n + EXPLOIT_TRIALS * n) * CHUNK, {ON: 100e6, OFF: 300e6})
    assert ac.choice == OFF
    run(ac, clock, 3 * TRIAL + 4 * MiB, {ON: 90e6, OFF: 30e6})  # the link became thin
    assert ac.choice == ON and [r[3] for r in ac.rounds] == [OFF, ON]


def test_acknowledgements_after_a_window_closed_are_not_counted():
    ac, clock = make()
    level, w1 = ac.choose(LEVEL, False, TRIAL // 2)
    ac.acked(w1, MiB)                     # first acknowledgement: starts the window's clock
    clock.now += 1.0
    ac.acked(w1, TRIAL // 4)              # measured: 16 MiB in 1 s
    ac.choose(LEVEL, False, TRIAL // 2)   # the window is full: closed
    clock.now += 100.0
    ac.acked(w1, TRIAL)                   # late: would make the window look 100x slower
    assert ac._done[ON][0].sample() == (TRIAL // 4, pytest.approx(1.0))
    assert ac._window is not None and ac._window.mode == OFF
    assert ac._window.first_ack is None  # nor counted for the window open now


def test_a_round_that_cannot_measure_keeps_the_previous_choice(caplog):
    ac, clock = make()
    caplog.set_level(logging.INFO, logger=adaptive.__name__)
    # a pipeline deeper than the windows: nothing is acknowledged before its window closes
    n = TRIAL // CHUNK
    levels = run(ac, clock, 3 * TRIAL + 8 * MiB, {ON: 100e6, OFF: 300e6}, lag=4 * n)
    assert ac.rounds[0][1:] == (None, None, ON)
    assert set(levels[3 * n:]) == {LEVEL}
    assert "too little data acknowledged to compare" in caplog.text


def test_a_new_transfer_measures_its_open_window_again_and_keeps_the_closed_ones():
    ac, clock = make()
    n = TRIAL // CHUNK
    rates = {ON: 100e6, OFF: 300e6}
    first = run(ac, clock, TRIAL + TRIAL // 2, rates, lag=0, batch=1)  # compressed closed, raw half
    clock.now += 100.0           # e.g. committing this disk and opening the next
    ac.start_transfer(INFLIGHT)  # the raw window is opened again; the gap is measured by nobody
    levels = first + run(ac, clock, 2 * TRIAL + 8 * MiB, rates, lag=0, batch=1)
    assert set(levels[:n]) == {LEVEL} and set(levels[n:n + n // 2]) == {0}
    rest = levels[n + n // 2:]
    assert set(rest[:n]) == {0} and set(rest[n:2 * n]) == {LEVEL} and set(rest[2 * n:]) == {0}
    (_, raw, packed, choice), = ac.rounds  # one round: the compressed window before the gap counted
    assert choice == OFF and raw == pytest.approx(300e6) and packed == pytest.approx(100e6)


def test_a_new_transfer_while_exploiting_changes_nothing():
    ac, clock = make()
    n = TRIAL // CHUNK
    run(ac, clock, 3 * TRIAL + 8 * MiB, {ON: 100e6, OFF: 300e6})
    ac.start_transfer(INFLIGHT)
    levels = run(ac, clock, 8 * MiB, {ON: 100e6, OFF: 300e6})
    assert set(levels) == {0} and len(ac.rounds) == 1 and n > 8


def test_a_round_where_one_mode_was_not_measured_keeps_the_choice():
    ac, clock = make()
    n = TRIAL // CHUNK
    for _ in range(3 * n):
        level, window = ac.choose(LEVEL, False, CHUNK)
        clock.now += 0.01
        if level:  # only the compressed windows are ever acknowledged in time
            ac.acked(window, CHUNK)
    (_, raw, packed, choice), = ac.rounds
    assert raw is None and packed == pytest.approx(CHUNK / 0.01) and choice == ON
    # and the next round comes after TIE_EXPLOIT_TRIALS trial sizes: its compressed window is
    # done after one more, the raw one open
    levels = [ac.choose(LEVEL, False, CHUNK) for _ in range((TIE_EXPLOIT_TRIALS + 1) * n)]
    assert {w for _, w in levels[:TIE_EXPLOIT_TRIALS * n]} == {0} and {lv for lv, _ in levels} == {LEVEL}
    assert len({w for _, w in levels[TIE_EXPLOIT_TRIALS * n:]}) == 1 and levels[-1][0] == LEVEL
    assert ac._window is not None and ac._window.mode == OFF and ac._plan == [ON]


def test_changing_the_level_or_the_limit_starts_over_compressed():
    ac, clock = make()
    run(ac, clock, 3 * TRIAL + 8 * MiB, {ON: 100e6, OFF: 300e6})
    assert ac.choice == OFF
    assert ac.choose(5, False, CHUNK)[0] == 5    # modify --compression 5: compressed trial first
    assert ac.choice == ON
    ac.choose(5, True, CHUNK)                    # a limit set
    assert ac.choose(5, False, CHUNK)[0] == 5    # and removed: a new round, compressed first
    run(ac, clock, 3 * TRIAL + 8 * MiB, {ON: 100e6, OFF: 300e6})
    assert ac.choice == OFF
    assert ac.choose(0, False, CHUNK) == (0, 0)  # modify --compression 0, then back to 7:
    assert ac.choose(LEVEL, False, CHUNK)[0] == LEVEL and ac.choice == ON  # compressed first again


def test_trial_windows_grow_with_the_chunks_in_flight():
    ac, clock = make()
    ac.start_transfer(40 * MiB)                  # 4 x 40 MiB > 64 MiB
    n = 160
    levels = run(ac, clock, (3 * n + 1) * CHUNK, {ON: 100e6, OFF: 300e6}, lag=40)
    assert set(levels[:n]) == {LEVEL} and set(levels[n:2 * n]) == {0} and set(levels[2 * n:3 * n]) == {LEVEL}
    assert ac.rounds[0][3] == OFF  # 40 chunks in flight: each window still measured its last 120


def test_a_confirmed_choice_is_measured_again_less_often_and_a_changed_one_sooner():
    ac, clock = make()
    n = TRIAL // CHUNK
    levels = run(ac, clock, 386 * n * CHUNK, {ON: 100e6, OFF: 300e6}, lag=0, batch=1)
    starts = [i for i, lv in enumerate(levels) if lv == LEVEL and (i == 0 or levels[i - 1] == 0)]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    e = EXPLOIT_TRIALS
    assert MAX_EXPLOIT_TRIALS == 8 * e
    # round 1: compressed, raw, compressed, then raw for e windows; later rounds raw, compressed,
    # raw, each confirming raw, so the next round comes after 2e, 4e, 8e (the cap) windows
    assert gaps == [2 * n, (2 + e) * n, (3 + 2 * e) * n, (3 + 4 * e) * n, (3 + 8 * e) * n, (3 + 8 * e) * n]
    assert all(r[3] == OFF for r in ac.rounds)
    # the link becomes thin: the next round picks compression and re-checks after e windows again
    run(ac, clock, (MAX_EXPLOIT_TRIALS + 3) * n * CHUNK, {ON: 90e6, OFF: 30e6}, lag=0, batch=1)
    assert ac.rounds[-1][3] == ON and ac._exploit_trials == EXPLOIT_TRIALS
