"""Log lines during a control-plane outage (go2cloud_client/outage.py): one line when it goes,
a summary every few minutes, one "reconnected after X s" line - not a pair every 2 s."""

from __future__ import annotations

from go2cloud_client.outage import OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_then_summaries_then_reconnected():
    clock = Clock()
    log = OutageLog(summary_every_s=300, clock=clock)
    lines = []
    for _ in range(260):  # a call failing every 2 s for 520 s
        lines += log.failure("connection refused")
        clock.now += 2
    lines += log.success()
    assert len(lines) == 3, lines
    assert lines[0].startswith("control plane unreachable: connection refused")
    assert lines[1].startswith("control plane still unreachable after 300s")
    assert lines[2] == "reconnected to the control plane after 520s"


def test_a_flapping_link_is_folded():
    clock = Clock()
    log = OutageLog(summary_every_s=300, flap_window_s=60, clock=clock)
    lines = []
    for _ in range(130):  # fail, succeed, fail, succeed ... every 2 s for ~8 min
        lines += log.failure("reset")
        clock.now += 1
        lines += log.success()
        clock.now += 1
    clock.now += 61
    lines += log.success()  # stable for a minute
    assert len(lines) <= 4, lines
    assert lines[0].startswith("control plane unreachable")
    assert "unstable" in lines[-1] and "129 short interruptions" in lines[-1]
