"""Throttling of failed imports and the bounded key derivation (go2cloud_server/throttle.py)."""

from __future__ import annotations

import threading
import time

import pytest

from go2cloud_server import throttle
from go2cloud_server.errors import Busy, CodeRejected, Throttled
from go2cloud_server.throttle import FailureWindow, ImportThrottle, KeyDerivation
from tests.unit.server.conftest import import_body


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_failure_window_slides():
    clock = Mono()
    w = FailureWindow(3, 60, clock=clock)
    for _ in range(3):
        assert w.retry_after("a") == 0
        w.add("a")
        clock.t += 10
    # failures at 100, 110, 120; now 130: the oldest leaves the window at 160
    assert w.retry_after("a") == pytest.approx(30)
    assert w.retry_after("b") == 0
    clock.t = 160.5
    assert w.retry_after("a") == 0
    w.add("a")
    assert w.retry_after("a") == pytest.approx(110 + 60 - 160.5)


def test_failure_window_memory_is_bounded():
    w = FailureWindow(2, 60, clock=Mono(), max_keys=100)
    for i in range(1000):
        w.add(f"at-{i}")
    assert len(w._hits) == 100


def _service_with(service, **kw):
    service.import_throttle = ImportThrottle(clock=kw.pop("clock"), **kw)
    service.create_workgroup({"name": "web-tier"})
    return service.create_code("web-tier", {"uses": 10}), service.create_code("web-tier", {"uses": 10})


def test_wrong_codes_from_one_address_get_429_then_the_window_passes(service):
    clock = Mono()
    code, other = _service_with(service, clock=clock, window_s=60, per_address=3, per_token=5)
    wrong = {**code, "token_code": "wrong"}
    for _ in range(3):
        with pytest.raises(CodeRejected):
            service.import_source(import_body(wrong), client="192.0.2.1")
    with pytest.raises(Throttled) as info:  # even the right code: nothing is checked while throttled
        service.import_source(import_body(code), client="192.0.2.1")
    assert info.value.http_status == 429 and info.value.retry_after == 60
    # another address with another token id is not blocked by these failures
    assert service.import_source(import_body(other), client="192.0.2.2")["source_id"]
    # the same token id from another address: its own limit (5) is not reached yet
    assert service.import_source(import_body(code), client="192.0.2.3")["source_id"]
    clock.t += 61
    assert service.import_source(import_body(code), client="192.0.2.1")["source_id"]


def test_wrong_codes_on_one_token_id_from_many_addresses_get_429(service):
    clock = Mono()
    code, other = _service_with(service, clock=clock, window_s=60, per_address=100, per_token=4)
    for i in range(4):
        with pytest.raises(CodeRejected):
            service.import_source(import_body({**code, "token_code": "wrong"}), client=f"198.51.100.{i}")
    with pytest.raises(Throttled):
        service.import_source(import_body(code), client="198.51.100.99")
    assert service.import_source(import_body(other), client="198.51.100.99")["source_id"]


def test_unknown_token_ids_count_and_cost_a_derivation(service, monkeypatch):
    clock = Mono()
    _service_with(service, clock=clock, window_s=60, per_address=2, per_token=2)
    derived = []
    real = service.key_derivation._derive
    monkeypatch.setattr(service.key_derivation, "_derive", lambda c, s: derived.append(s) or real(c, s))
    for i in range(2):
        with pytest.raises(CodeRejected, match="unknown activation code"):
            service.import_source(import_body({"token_id": f"at-nope{i}", "token_code": "x"}), client="a")
    assert len(derived) == 2 and derived[0] == derived[1] == service.key_derivation._dummy_salt
    with pytest.raises(Throttled):
        service.import_source(import_body({"token_id": "at-nope9", "token_code": "x"}), client="a")
    assert len(derived) == 2


def test_key_derivation_runs_at_most_workers_at_once_and_refuses_beyond_the_queue():
    running = {"now": 0, "peak": 0}
    lock = threading.Lock()
    gate = threading.Event()

    def derive(code: str, salt: bytes) -> bytes:
        with lock:
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
        gate.wait(10)
        time.sleep(0.01)
        with lock:
            running["now"] -= 1
        return b"d" * 32

    kdf = KeyDerivation(derive, workers=2, queue=6, wait_s=30)
    results: list = []

    def one() -> None:
        try:
            results.append(kdf.check("code", b"salt", b"d" * 32))
        except Busy as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(isinstance(r, Busy) for r in results) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(30)
    busy = [r for r in results if isinstance(r, Busy)]
    assert len(results) == 20 and len(busy) == 12 and results.count(True) == 8
    assert busy[0].http_status == 503 and busy[0].retry_after == throttle.BUSY_RETRY_AFTER_S
    assert running["peak"] == 2 and kdf.peak == 2
    kdf.close()


def test_a_busy_answer_does_not_count_as_a_failure(service):
    clock = Mono()
    code, _ = _service_with(service, clock=clock, window_s=60, per_address=1, per_token=1)

    def busy(*a):
        raise Busy("busy", retry_after=2)

    service.key_derivation.digest = busy
    for _ in range(3):
        with pytest.raises(Busy):
            service.import_source(import_body(code), client="a")
    del service.key_derivation.digest  # the class's method again
    assert service.import_source(import_body(code), client="a")["source_id"]
