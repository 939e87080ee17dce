"""Fencing: one live agent session per source identity (docs/reliability.md, section 1).

A source's identity is its key, and a key can be copied: every VM cloned from an imported machine
carries the agent home with it. The control plane therefore grants a **lease** to one agent
process at a time. The lease names

* the ``epoch``: a number that grows by one each time the lease passes to another session; every
  data write (block chunk, rsync session) carries it and the target refuses any other;
* the ``session_id``: random, kept in the agent home (a restart of the same agent on the same
  machine resumes the same epoch once the old process's lease expired);
* the ``instance``: random per agent process; the holder's requests carry it;
* the ``fingerprint`` of the machine the holder runs on (machine id, disk serials, MAC addresses);
* ``expires``: the server's clock; heartbeats of the holder push it forward.

This module is the pure logic (no database, no clock of its own): :func:`open_lease` decides
whether a session may start, :func:`renew` extends the holder's lease, :func:`fingerprint_of`
and :func:`fingerprint_diff` compare machines. ``go2cloud_server.service`` stores the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

#: the lease lasts this many heartbeat intervals after the holder's last heartbeat
LEASE_INTERVALS = 3
#: a second session refused for longer than the lease (plus this many intervals) while the holder
#: kept renewing is another live agent, not a restart waiting for the old lease to expire
CONFLICT_GRACE_INTERVALS = 1

GRANT_NEW = "new"  # no lease before: epoch 1
GRANT_RENEWED = "renewed"  # the holder process opened again
GRANT_RESUMED = "resumed"  # same agent home and machine after the old process's lease expired
GRANT_TAKEN_OVER = "taken_over"  # another session after the lease expired: epoch + 1
HELD = "held"  # refused: another process holds a live lease


@dataclass(frozen=True)
class Lease:
    epoch: int = 0
    session_id: str = ""
    instance: str = ""
    fingerprint: Optional[Dict[str, Any]] = None
    expires: float = 0.0
    granted_at: float = 0.0

    def live(self, now: float) -> bool:
        return self.epoch > 0 and now < self.expires


class Decision(NamedTuple):
    granted: bool
    outcome: str  # one of the GRANT_* values or HELD
    lease: Lease  # the new lease when granted, the current one when refused


def open_lease(
    cur: Lease,
    *,
    session_id: str,
    instance: str,
    fingerprint: Optional[Dict[str, Any]],
    now: float,
    ttl: float,
) -> Decision:
    """May the agent process ``instance`` (of agent home ``session_id``, on machine
    ``fingerprint``) hold the lease now?

    * no lease yet: granted, epoch 1;
    * the same process again: granted, same epoch, renewed;
    * a live lease of another process: refused (``HELD``); the caller decides when a refused
      session is a second live agent rather than a restart waiting (:func:`conflict_after`);
    * an expired lease: granted. Same agent home on the same machine: the same epoch (a
      restarted agent resumes its own cycle); anything else: epoch + 1, so the old holder's
      writes are refused from now on.
    """
    if cur.epoch <= 0:
        return Decision(True, GRANT_NEW, Lease(1, session_id, instance, fingerprint, now + ttl, now))
    if instance and instance == cur.instance:
        return Decision(True, GRANT_RENEWED, replace(cur, expires=max(cur.expires, now + ttl)))
    if cur.live(now):
        return Decision(False, HELD, cur)
    same_home = bool(session_id) and session_id == cur.session_id
    if same_home and not fingerprint_diff(cur.fingerprint, fingerprint):
        resumed = Lease(cur.epoch, session_id, instance, fingerprint, now + ttl, now)
        return Decision(True, GRANT_RESUMED, resumed)
    taken = Lease(cur.epoch + 1, session_id, instance, fingerprint, now + ttl, now)
    return Decision(True, GRANT_TAKEN_OVER, taken)


def renew(cur: Lease, instance: Optional[str], *, now: float, ttl: float) -> Optional[Lease]:
    """The holder's heartbeat: its lease extended (even if it had expired meanwhile, as long as no
    other session took it). None when ``instance`` is not the holder."""
    if cur.epoch <= 0 or not instance or instance != cur.instance:
        return None
    return replace(cur, expires=max(cur.expires, now + ttl))


def conflict_after(interval: float) -> float:
    """Seconds a session may be refused while another one renews before it is a conflict."""
    return (LEASE_INTERVALS + CONFLICT_GRACE_INTERVALS) * interval


# -- fingerprints ------------------------------------------------------------------------------


def _clean(values: Any) -> List[str]:
    out = set()
    for v in values if isinstance(values, list) else []:
        if isinstance(v, str) and v.strip() and v.strip() != "00:00:00:00:00:00":
            out.add(v.strip().lower()[:128])
    return sorted(out)[:64]


def fingerprint_of(inventory: Mapping[str, Any]) -> Dict[str, Any]:
    """What tells machines apart in an inventory: the machine id, the disks' serial numbers and
    the network interfaces' MAC addresses (empty when unknown)."""
    disks: List[Any] = inventory.get("disks") or []
    nics: List[Any] = inventory.get("nics") or []
    disks = disks if isinstance(disks, list) else []
    nics = nics if isinstance(nics, list) else []
    return {
        "machine_id": str(inventory.get("machine_id") or "")[:255],
        "disk_serials": _clean([d.get("serial") for d in disks if isinstance(d, dict)]),
        "macs": _clean([n.get("mac") for n in nics if isinstance(n, dict)]),
    }


def check_fingerprint(doc: Any) -> Optional[Dict[str, Any]]:
    """A fingerprint sent by an agent, normalised (None when absent or malformed)."""
    if not isinstance(doc, dict):
        return None
    return {
        "machine_id": str(doc.get("machine_id") or "")[:255],
        "disk_serials": _clean(doc.get("disk_serials")),
        "macs": _clean(doc.get("macs")),
    }


def fingerprint_diff(a: Optional[Mapping[str, Any]], b: Optional[Mapping[str, Any]]) -> List[str]:
    """What differs between two fingerprints, in words (empty: the same machine as far as they
    tell; an unknown side compares equal). Only values known on both sides count."""
    if not a or not b:
        return []
    out = []
    if a.get("machine_id") and b.get("machine_id") and a["machine_id"] != b["machine_id"]:
        out.append(f"machine id {a['machine_id']} vs {b['machine_id']}")
    for key, label in (("disk_serials", "disk serials"), ("macs", "MAC addresses")):
        x, y = a.get(key) or [], b.get(key) or []
        if x and y and not set(x) & set(y):
            out.append(f"{label} {', '.join(x)} vs {', '.join(y)}")
    return out
