"""meta-ipam's garbage-collection decisions (meta/ipam/collect.py): which allocations CNI GC and the daemon's
pod collector may free, and the exact, DEL-like change of a block body."""
from __future__ import annotations

import copy
from typing import Any

from meta.ipam import collect
from meta.ipam.store import BLOCK, Versioned


def entry(cid: str, *, node: str = "n1", network: str | None = "blue", ifname: str = "net1", uid: str | None = None,
          claim: str | None = None, released: bool = False, name: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"containerID": cid, "ifname": ifname, "podNamespace": "ns", "podName": name or f"pod-{cid}",
                         "podUID": f"uid-{cid}" if uid is None else uid, "node": node, "static": False,
                         "claim": claim, "released": released}
    if network is not None:
        e["network"] = network
    return e


def block(name: str, allocations: dict[str, dict[str, Any]], pool: str = "shared") -> Versioned:
    return Versioned(BLOCK, name, {"pool": pool, "cidr": "10.232.90.0/26", "node": "n1", "used": len(allocations),
                                   "allocations": allocations}, "1")


def ips(held: list[collect.Held]) -> list[str]:
    return [h.ip for h in held]


BLOCKS = [block("shared-0ae85a00", {
    "10.232.90.1": entry("a1"),                                  # blue, valid below
    "10.232.90.2": entry("a2"),                                  # blue, not valid: stale
    "10.232.90.3": entry("b1", network="red"),                   # red shares the pool
    "10.232.90.4": entry("a3", node="n2"),                       # another node's
    "10.232.90.5": entry("a4", claim="ns/web-0", released=True),  # released sticky address
    "10.232.90.6": entry("old", network=None),                   # written before networks were recorded
    "10.232.90.7": entry("a5", claim="ns/web-1"),                # held for a claim, not valid: stale
    "10.232.90.8": entry("a1", ifname="net2"),                   # same container, another interface
})]


def test_cni_gc_frees_only_this_nodes_unlisted_attachments_of_this_network() -> None:
    stale = collect.stale_attachments(BLOCKS, node="n1", network="blue", valid={("a1", "net1")})
    assert ips(stale) == ["10.232.90.2", "10.232.90.7", "10.232.90.8"]
    assert {h.network for h in stale} == {"blue"}
    # Red's GC with an empty list takes red's only, never blue's (they share the pool).
    assert ips(collect.stale_attachments(BLOCKS, node="n1", network="red", valid=set())) == ["10.232.90.3"]
    # A network with no name matches nothing, not the entries that have none.
    assert collect.stale_attachments(BLOCKS, node="n1", network="", valid=set()) == []


def test_pod_candidates_are_this_nodes_held_allocations_with_a_pod() -> None:
    blocks = [block("b", {**BLOCKS[0].data["allocations"], "10.232.90.9": entry("cnitool", uid="")})]
    got = collect.pod_candidates(blocks, "n1")
    # Other nodes', released and pod-less entries are never candidates; legacy entries without a network are.
    assert ips(got) == ["10.232.90.1", "10.232.90.2", "10.232.90.3", "10.232.90.6", "10.232.90.7", "10.232.90.8"]
    assert collect.pods_to_check(got)[0] == ("ns", "pod-a1", "uid-a1")
    assert len(collect.pods_to_check(got)) == 5  # a1 holds two interfaces: one pod to ask about


def test_alive_needs_the_recorded_uid() -> None:
    assert collect.alive("u1", "u1")
    assert not collect.alive("u1", "u2")  # a namesake (StatefulSet pod recreated)
    assert not collect.alive("u1", None)  # 404


def test_only_pods_judged_gone_are_collected() -> None:
    cands = collect.pod_candidates(BLOCKS, "n1")
    verdicts = {("ns", "pod-a1", "uid-a1"): False, ("ns", "pod-a2", "uid-a2"): True}
    # pod-a1 gone: both its interfaces; no verdict (b1, old, a5) counts as alive.
    assert ips(collect.gone(cands, verdicts)) == ["10.232.90.1", "10.232.90.8"]


def test_drop_frees_like_del_and_only_the_exact_owner() -> None:
    data = copy.deepcopy(BLOCKS[0].data)
    held = {h.ip: h for h in collect.pod_candidates(BLOCKS, "n1")}
    # The address of a5 (claim) is released for its claim, a2's removed; b1's entry changed hands since
    # it was judged (another container now), so it stays.
    data["allocations"]["10.232.90.3"] = entry("b9", network="red")
    done = collect.drop(data, [held["10.232.90.2"], held["10.232.90.7"], held["10.232.90.3"]])
    assert [(h.ip, h.outcome) for h in done] == [("10.232.90.2", "freed"), ("10.232.90.7", "released")]
    assert "10.232.90.2" not in data["allocations"]
    assert data["allocations"]["10.232.90.7"]["released"] is True
    assert data["allocations"]["10.232.90.3"]["containerID"] == "b9"
    # Again: nothing left to do (the released entry is no longer held).
    assert collect.drop(data, [held["10.232.90.2"], held["10.232.90.7"]]) == []


def test_by_pool_groups_targets() -> None:
    other = block("other-0ae85b00", {"10.232.91.1": entry("z")}, pool="other")
    cands = collect.pod_candidates([*BLOCKS, other], "n1")
    groups = collect.by_pool(cands)
    assert sorted(groups) == ["other", "shared"] and ips(groups["other"]) == ["10.232.91.1"]
