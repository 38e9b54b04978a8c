"""Which allocations a garbage collection may free: pure decisions over block bodies, no I/O.

Two collectors share these rules:
- CNI GC (`meta-ipam` command GC, spec 1.1.0): the runtime lists the attachments of one network that are
  still in use (`cni.dev/valid-attachments`); this node's allocations of that network that are not listed
  are stale (`stale_attachments`).
- the daemon's pod collector (meta/daemon/ipamgc.py): this node's allocations whose pod UID no longer exists
  (`pod_candidates`, `pods_to_check`, `gone`).

Neither ever frees an allocation of another node (its node's runtime and daemon judge it), a released sticky
address (it is kept for its claim until `metactl ipam release`), or, for CNI GC, an allocation whose network
is not recorded (written before entries carried one: it might be another network's that shares the pool).
Freeing is exact and does what the missing DEL would have done (`drop`): an entry goes only while it is
still held by the very owner that was judged, so an address re-allocated between the judgement and the
write is never taken from its new holder; an entry with a sticky claim is marked released and kept for the
claim (a StatefulSet pod recreated elsewhere after its node died gets its address back), not removed.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import attrs

from .store import Versioned

# (namespace, name, UID) of the pod an allocation records.
PodKey = tuple[str, str, str]


@attrs.frozen
class Held:
    """One allocation as a collector sees it: where it is and who holds it."""

    pool: str
    block: str
    ip: str
    container_id: str
    ifname: str
    pod_namespace: str
    pod_name: str
    pod_uid: str
    network: str | None  # None: written before allocations recorded their network
    claim: str | None = None

    @property
    def pod(self) -> PodKey:
        return self.pod_namespace, self.pod_name, self.pod_uid

    def holds(self, entry: Mapping[str, Any] | None) -> bool:
        """Whether `entry` is still this allocation (same attachment and pod, not released since)."""
        return (entry is not None and not entry.get("released") and entry.get("containerID") == self.container_id
                and entry.get("ifname") == self.ifname and (entry.get("podUID") or "") == self.pod_uid)

    def describe(self) -> str:
        pod = f"pod {self.pod_namespace}/{self.pod_name} (uid {self.pod_uid})" if self.pod_uid else "no pod"
        return f"{pod}, container {self.container_id[:12]} interface {self.ifname}"

    @property
    def outcome(self) -> str:
        """What freeing it does: "freed", or "released" (kept for its sticky claim)."""
        return "released" if self.claim else "freed"


def held(blocks: Iterable[Versioned], node: str) -> Iterator[Held]:
    """The allocations recorded for `node` that are held (not released sticky ones), in block order."""
    for obj in sorted(blocks, key=lambda o: o.name):
        for ip, e in (obj.data.get("allocations") or {}).items():
            if not isinstance(e, Mapping) or e.get("node") != node or e.get("released"):
                continue
            network, claim = e.get("network"), e.get("claim")
            yield Held(pool=str(obj.data.get("pool")), block=obj.name, ip=ip, container_id=str(e.get("containerID")),
                       ifname=str(e.get("ifname")), pod_namespace=str(e.get("podNamespace") or ""),
                       pod_name=str(e.get("podName") or ""), pod_uid=str(e.get("podUID") or ""),
                       network=network if isinstance(network, str) and network else None,
                       claim=claim if isinstance(claim, str) and claim else None)


def stale_attachments(blocks: Iterable[Versioned], *, node: str, network: str,
                      valid: Collection[tuple[str, str]]) -> list[Held]:
    """CNI GC: `node`'s allocations of `network` whose attachment (containerID, ifname) is not in `valid`."""
    if not network:
        return []
    return [h for h in held(blocks, node) if h.network == network and (h.container_id, h.ifname) not in valid]


def pod_candidates(blocks: Iterable[Versioned], node: str) -> list[Held]:
    """The pod collector's candidates: `node`'s allocations that name a pod UID. Without one (cnitool, podman
    without a pod) there is no pod to ask about; CNI GC and DEL free those."""
    return [h for h in held(blocks, node) if h.pod_uid and h.pod_name]


def pods_to_check(candidates: Iterable[Held]) -> list[PodKey]:
    """Each pod once, in a stable order."""
    return sorted({h.pod for h in candidates})


def alive(expected_uid: str, found_uid: str | None) -> bool:
    """A pod is alive when the API has it under the recorded UID; a namesake with another UID (a
    StatefulSet pod recreated) is not the allocation's pod. `found_uid` None: the API has no such pod."""
    return found_uid is not None and found_uid == expected_uid


def gone(candidates: Iterable[Held], verdicts: Mapping[PodKey, bool]) -> list[Held]:
    """The candidates whose pod was judged not alive. A pod without a verdict counts as alive: only what
    was positively found gone is freed."""
    return [h for h in candidates if verdicts.get(h.pod, True) is False]


def by_pool(items: Iterable[Held]) -> dict[str, list[Held]]:
    out: dict[str, list[Held]] = {}
    for h in items:
        out.setdefault(h.pool, []).append(h)
    return out


def drop(data: dict[str, Any], targets: Iterable[Held]) -> list[Held]:
    """In a block body (in place), do for every target whose entry is still exactly its allocation what DEL
    does: remove the entry, or mark it released when it has a sticky claim. The targets changed, each with
    the claim the entry has now (so `outcome` tells which)."""
    allocations = data.get("allocations")
    if not isinstance(allocations, dict):
        return []
    out = []
    for t in targets:
        entry = allocations.get(t.ip)
        if not t.holds(entry):
            continue
        claim = entry.get("claim") or None
        if claim:
            entry["released"] = True
        else:
            del allocations[t.ip]
        out.append(attrs.evolve(t, claim=claim))
    return out
