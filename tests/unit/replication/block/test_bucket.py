from __future__ import annotations

import threading

import pytest

from go2cloud_client.replication.block.bucket import MIN_BURST, TokenBucket, mbps_to_bytes


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s


def test_mbps_to_bytes():
    assert mbps_to_bytes(0) == 0
    assert mbps_to_bytes(8) == 1_000_000
    with pytest.raises(ValueError):
        mbps_to_bytes(-1)


def _send(bucket: TokenBucket, clock: FakeClock, total: int, piece: int) -> float:
    start = clock.t
    sent = 0
    while sent < total:
        assert bucket.take(piece)
        sent += piece
    return clock.t - start


def test_rate_is_respected_without_real_sleep():
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    took = _send(bucket, clock, 10_000_000, 100_000)
    # 10 MB at 1 MB/s: ~10 s minus the initial burst (0.25 s)
    assert 9.5 <= took <= 10.1


def test_chunk_larger_than_burst_goes_then_waits():
    clock = FakeClock()
    bucket = TokenBucket(125_000, clock=clock, sleep=clock.sleep)  # 1 Mbit/s
    assert bucket.take(1 << 20)                # goes (bucket was full), now in debt
    t0 = clock.t
    assert bucket.take(1 << 20)                # waits for the debt: ~ 1 MiB / 125 kB/s
    assert (clock.t - t0) == pytest.approx(((1 << 20) - MIN_BURST) / 125_000, rel=0.05)


def test_rate_change_mid_way_takes_effect_at_once():
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    first = _send(bucket, clock, 5_000_000, 100_000)
    bucket.set_rate(4_000_000)
    second = _send(bucket, clock, 5_000_000, 100_000)
    # the clock stops when the last piece is taken: 5 MB - burst 0.25 MB - last 0.1 MB
    assert first == pytest.approx(4.65, abs=0.01)
    # 4x the rate: 4x faster at once (plus paying off the 0.1 MB debt left by the first run)
    assert second == pytest.approx((100_000 + 5_000_000 - 100_000) / 4_000_000, abs=0.01)
    bucket.set_rate(0)  # unlimited: no waiting at all
    t0 = clock.t
    _send(bucket, clock, 50_000_000, 1 << 20)
    assert clock.t == t0
    bucket.set_rate(1_000_000)  # limited again: starts with a full burst, then paces
    assert _send(bucket, clock, 3_000_000, 100_000) == pytest.approx(2.65, abs=0.01)


def test_cancel_while_waiting():
    clock = FakeClock()
    cancel = threading.Event()

    def sleep(s: float) -> None:
        clock.sleep(s)
        cancel.set()

    bucket = TokenBucket(1000, clock=clock, sleep=sleep)
    assert bucket.take(10 * MIN_BURST, cancel)
    assert bucket.take(1000, cancel) is False
