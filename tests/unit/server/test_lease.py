"""The lease logic of fencing (go2cloud_server.lease) and its use by the service: one live agent
session per source; expiry, takeover after expiry, renewal, resume by the same agent home."""

from __future__ import annotations

from typing import Iterator

import pytest

from go2cloud_server import lease as L
from go2cloud_server.errors import SessionBusy, SessionConflict, SessionRequired, StaleEpoch
from go2cloud_server.service import Service
from tests.unit.server.test_block_tasks import FakeBlockStores, _ack, _cmds, _service, _source, wait_verified

FP_A = {"machine_id": "aaaa", "disk_serials": ["sa"], "macs": ["02:00:00:00:00:0a"]}
FP_B = {"machine_id": "bbbb", "disk_serials": ["sb"], "macs": ["02:00:00:00:00:0b"]}
TTL = 30.0


def _open(cur, session="home-1", instance="p-1", fp=FP_A, now=1000.0):
    return L.open_lease(cur, session_id=session, instance=instance, fingerprint=fp, now=now, ttl=TTL)


def test_first_session_gets_epoch_one_until_ttl():
    d = _open(L.Lease())
    assert (d.granted, d.outcome, d.lease.epoch, d.lease.expires) == (True, L.GRANT_NEW, 1, 1030.0)
    assert d.lease.live(1029.9) and not d.lease.live(1030.0)


def test_a_second_process_is_refused_while_the_lease_is_live():
    held = _open(L.Lease()).lease
    d = _open(held, session="home-1", instance="p-2", now=1029.0)  # even the same home (a copy)
    assert (d.granted, d.outcome, d.lease) == (False, L.HELD, held)


def test_renewal_extends_only_the_holders_lease():
    held = _open(L.Lease()).lease
    renewed = L.renew(held, "p-1", now=1020.0, ttl=TTL)
    assert renewed is not None and renewed.expires == 1050.0 and renewed.epoch == 1
    assert L.renew(held, "p-2", now=1020.0, ttl=TTL) is None
    assert L.renew(held, None, now=1020.0, ttl=TTL) is None
    # renewed past the first expiry: another process is still refused at 1040
    assert not _open(renewed, instance="p-2", now=1040.0).granted
    # the holder renews even after expiry when nobody took over
    late = L.renew(held, "p-1", now=1100.0, ttl=TTL)
    assert late is not None and late.expires == 1130.0


def test_the_same_process_opening_again_keeps_its_epoch():
    held = _open(L.Lease()).lease
    d = _open(held, now=1010.0)
    assert (d.granted, d.outcome, d.lease.epoch, d.lease.expires) == (True, L.GRANT_RENEWED, 1, 1040.0)


def test_restart_of_the_same_home_on_the_same_machine_resumes_the_epoch_after_expiry():
    held = _open(L.Lease()).lease
    d = _open(held, instance="p-2", now=1031.0)
    assert (d.granted, d.outcome, d.lease.epoch, d.lease.instance) == (True, L.GRANT_RESUMED, 1, "p-2")


def test_takeover_after_expiry_by_another_home_or_machine_bumps_the_epoch():
    held = _open(L.Lease()).lease
    other_home = _open(held, session="home-2", instance="p-2", now=1031.0)
    assert (other_home.outcome, other_home.lease.epoch) == (L.GRANT_TAKEN_OVER, 2)
    clone = _open(held, session="home-1", instance="p-3", fp=FP_B, now=1031.0)
    assert (clone.outcome, clone.lease.epoch) == (L.GRANT_TAKEN_OVER, 2)
    # the old holder cannot renew once it was taken over
    assert L.renew(clone.lease, "p-1", now=1032.0, ttl=TTL) is None


def test_fingerprint_diff_names_what_differs_and_ignores_unknowns():
    assert L.fingerprint_diff(FP_A, FP_A) == []
    assert L.fingerprint_diff(FP_A, None) == []
    diff = L.fingerprint_diff(FP_A, FP_B)
    assert [d.split(" ")[0] for d in diff] == ["machine", "disk", "MAC"]
    added_nic = dict(FP_A, macs=FP_A["macs"] + ["02:00:00:00:00:0c"])
    assert L.fingerprint_diff(FP_A, added_nic) == []
    inv = {"machine_id": "aaaa", "disks": [{"name": "vda", "serial": "SA"}],
           "nics": [{"name": "eth0", "mac": "02:00:00:00:00:0A"}, {"name": "x", "mac": "00:00:00:00:00:00"}]}
    assert L.fingerprint_of(inv) == FP_A


# -- the service: lease stored per source, conflict after a lease of refusals -------------------

@pytest.fixture
def bservice(tmp_path, store, rsyncd, trees, clock) -> Iterator[Service]:
    service = _service(tmp_path, store, rsyncd, trees, clock, FakeBlockStores())
    yield service
    service.close()


def _open_session(service, sid, instance, fp=FP_A, session="home-1"):
    return service.open_session(sid, {"session_id": session, "instance": instance, "fingerprint": fp})


def test_service_conflict_after_a_lease_of_refusals_and_clone_warning(bservice, clock):
    service = bservice
    sid = _source(service)
    assert _open_session(service, sid, "p-1")["epoch"] == 1
    with pytest.raises(SessionBusy) as busy:
        _open_session(service, sid, "p-2", fp=FP_B)
    assert busy.value.retry_after and busy.value.retry_after > 0
    shown = service.show_source(sid)
    assert shown["clone_warning"]["code"] == "session_conflict"
    assert "machine id aaaa vs bbbb" in shown["clone_warning"]["message"]
    assert shown["session"]["epoch"] == 1 and shown["session"]["live"] is True
    # the holder keeps renewing; the second one is refused, then refused as a conflict
    for _ in range(10):
        clock.advance(service.heartbeat_interval)
        service.fence(sid, "p-1", renew_lease=True)
        try:
            _open_session(service, sid, "p-2", fp=FP_B)
        except SessionBusy:
            continue
        except SessionConflict as exc:
            assert "--abort" in str(exc) and "clone" in str(exc)
            break
    else:
        pytest.fail("the second agent was never refused as a conflict")
    assert "session_conflict" in [e["code"] for e in service.show_source(sid)["events"]]
    # the holder is still served; the other process is not, nor a request without a session
    service.fence(sid, "p-1")
    with pytest.raises(SessionConflict):
        service.fence(sid, "p-2")
    with pytest.raises(SessionRequired):
        service.fence(sid, None)


def test_service_takeover_after_expiry_fences_the_old_holder(bservice, clock):
    service = bservice
    sid = _source(service)
    _open_session(service, sid, "p-1")
    clock.advance(service.lease_ttl + 1)
    got = _open_session(service, sid, "p-2", session="home-2")
    assert (got["epoch"], got["outcome"]) == (2, "taken_over")
    with pytest.raises(SessionConflict):
        service.fence(sid, "p-1", renew_lease=True)
    assert "session_taken_over" in [e["code"] for e in service.show_source(sid)["events"]]


def test_a_session_on_another_machine_than_the_import_is_flagged(bservice):
    service = bservice
    sid = _source(service)  # imported with machine id m-1
    _open_session(service, sid, "p-1", fp=FP_B)
    warning = service.show_source(sid)["clone_warning"]
    assert warning["code"] == "clone_suspected" and "machine id m-1 vs bbbb" in warning["message"]


def test_stale_epoch_refused_and_a_cycle_of_two_epochs_is_never_verified(bservice, clock):
    service = bservice
    sid = _source(service)
    _open_session(service, sid, "p-1")
    service.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb", "/srv/disk.img"]},
                            source=sid)
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]
    with pytest.raises(StaleEpoch):
        service.check_epoch(tid, None)
    with pytest.raises(StaleEpoch):
        service.check_epoch(tid, "7")
    service.check_epoch(tid, "1")
    assert service.mixed_writers(tid, 1) is None
    # the holder stops renewing; another session takes over and writes into the same cycle
    clock.advance(service.lease_ttl + 1)
    assert _open_session(service, sid, "p-2", fp=FP_B, session="home-2")["epoch"] == 2
    with pytest.raises(StaleEpoch):
        service.check_epoch(tid, "1")  # the old holder's writes are refused from now on
    service.check_epoch(tid, "2")
    _ack(service, sid, start)
    arts = wait_verified(service, tid)
    assert len(arts) == 2
    for art in arts:
        assert art["sha256"] is None
        assert art["report"]["state"] == "failed" and art["report"]["error_code"] == "mixed_sessions"
        assert "epochs 1, 2" in art["report"]["error"]
    task = service.source_migration(sid)["tasks"][0]
    assert task["error"]["code"] == "mixed_sessions"
    # a restart queues failed generations again: the verifier refuses them again
    service.start()
    arts = wait_verified(service, tid)
    assert all(a["report"]["state"] == "failed" and a["sha256"] is None for a in arts)
