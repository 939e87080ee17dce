"""The snapshot backend conformance suite (see conformance.py) on real loop-mounted
filesystems: live and fsfreeze on ext4/xfs devices, reflink on XFS and btrfs, btrfs subvolume
snapshots, and the scripted failing backend."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple

import pytest

from snapshot_driver import Backend
from tests.snapshot import conformance as c
from tests.snapshot.conftest import LoopFactory, require_root_and_loop

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture(params=c.CASES, ids=[case.id for case in c.CASES])
def case(request, loopfs: LoopFactory, tmp_path: Path) -> Iterator[Tuple[c.Case, Backend, c.Subject]]:
    require_root_and_loop()
    spec: c.Case = request.param
    subject = spec.setup(loopfs, tmp_path)
    subject.workdir.mkdir(parents=True, exist_ok=True)
    backend = spec.make_backend()
    try:
        yield spec, backend, subject
    finally:
        # never leave a frozen filesystem, a clone or a subvolume behind, whatever failed
        backend.purge(subject.workdir)


def test_probe_is_usable_and_explains(case):
    _, backend, subject = case
    c.check_probe(backend, subject)


def test_snapshot_has_the_volume_contents(case):
    _, backend, subject = case
    c.check_contents(backend, subject)


def test_writes_after_create_are_not_in_the_snapshot(case):
    spec, backend, subject = case
    if not backend.point_in_time:
        # nothing to freeze: the contract is only that it says so
        assert "not point-in-time" in backend.probe(subject.volume).reason
        return
    c.check_point_in_time(backend, subject, spec.blocks_writers)


def test_release_is_idempotent_and_releases(case):
    _, backend, subject = case
    c.check_release(backend, subject)


def test_changed_since_covers_every_changed_byte(case):
    spec, backend, subject = case
    if not isinstance(subject, c.ImageSubject):
        with backend.create(subject.volume, subject.workdir) as snap:
            assert snap.token() is None
            assert snap.changed_since(None) is None and snap.changed_since("x") is None
        return
    c.check_changed_since(backend, subject, spec.tracks_changes)


def test_recover_after_a_crash(case):
    spec, _, subject = case
    c.check_recover(spec, subject)


def test_errors_are_snapshot_errors_with_a_code(case):
    _, backend, subject = case
    c.check_errors(backend, subject)
