"""The shared background verifier of block generations: one task's huge generation does not make
the others wait for it (round-robin between tasks, one step at a time); stop interrupts between
steps. Steps are counted, never timed."""

from __future__ import annotations

import threading
import time
from typing import Dict, Iterator, List, Tuple

from go2cloud_server.verifier import GenerationVerifier


class Steps:
    """``verify`` for the verifier: a generation of task ``t`` takes ``steps[t]`` steps; every
    step and every end is recorded in order. Task "big" waits at its first step until the test
    has submitted everything (so the order of submissions is fixed)."""

    def __init__(self, steps: Dict[str, int]) -> None:
        self.steps = steps
        self.events: List[Tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.go = threading.Event()
        self.closed: List[str] = []
        self.done = threading.Condition()

    def __call__(self, task: str, cycle: int, disk: str) -> Iterator[None]:
        try:
            for i in range(self.steps[task]):
                if task == "big" and i == 0:
                    self.started.set()
                    assert self.go.wait(30)
                with self.lock:
                    self.events.append((task, "step", i))
                yield
            with self.done:
                self.events.append((task, "done", cycle))
                self.done.notify_all()
        except GeneratorExit:
            self.closed.append(task)
            raise

    def wait_done(self, task: str, cycle: int = 1) -> None:
        with self.done:
            assert self.done.wait_for(lambda: (task, "done", cycle) in self.events, 30), self.events

    def count(self, task: str) -> int:
        with self.lock:
            return sum(1 for t, kind, _ in self.events if t == task and kind == "step")


def test_a_huge_generation_does_not_make_another_task_wait_until_it_is_done():
    work = Steps({"big": 100000, "small": 3})
    verifier = GenerationVerifier(work)
    try:
        verifier.submit("big", 1, "vdb")
        assert work.started.wait(30)
        verifier.submit("small", 1, "vdb")
        work.go.set()
        work.wait_done("small")
        with work.lock:
            big_before = sum(1 for t, kind, _ in work.events[:work.events.index(("small", "done", 1))]
                             if t == "big")
        # turns alternate: the small task's 3 steps came after at most a few steps of the big one
        assert big_before <= 4, big_before
        assert not verifier.idle()
    finally:
        verifier.stop()
    assert work.count("big") < 100000
    assert work.closed == ["big"]  # stopped between steps: the generation in progress was closed


def test_generations_of_one_task_are_verified_in_order_and_once():
    work = Steps({"big": 2, "t": 2})
    work.go.set()
    verifier = GenerationVerifier(work)
    try:
        for cycle in (1, 2, 3):
            verifier.submit("t", cycle, "vdb")
        verifier.submit("t", 3, "vdb")  # queued already: verified once
        work.wait_done("t", 3)
        done = [e for e in work.events if e[1] == "done"]
        assert done == [("t", "done", 1), ("t", "done", 2), ("t", "done", 3)]
        for _ in range(3000):
            if verifier.idle():
                break
            time.sleep(0.01)
        assert verifier.idle()
    finally:
        verifier.stop()


def test_a_failing_step_is_logged_and_the_others_go_on(caplog):
    def verify(task: str, cycle: int, disk: str) -> Iterator[None]:
        yield
        if task == "bad":
            raise OSError(5, "Input/output error")
        ok.set()

    ok = threading.Event()
    verifier = GenerationVerifier(verify)
    try:
        verifier.submit("bad", 1, "vdb")
        verifier.submit("good", 1, "vdb")
        assert ok.wait(30)
    finally:
        verifier.stop()
    assert "Input/output error" in caplog.text
