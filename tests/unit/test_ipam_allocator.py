"""The meta-ipam allocator over the file store: idempotence, exact release, static and sticky addresses,
exhaustion, dual-stack rollback, leases and borrowing, conflicts and the cache."""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meta.cni.errors import INTERNAL, INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from meta.ipam import config
from meta.ipam.allocator import Allocator
from meta.ipam.config import Owner, PoolSpec
from meta.ipam.filestore import FileStore
from meta.ipam.store import BLOCK, POOL, Conflict, Unavailable, Versioned


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def spec(network_name: str = "blue", **ipam: Any) -> PoolSpec:
    return config.parse({"type": "meta-ipam", "network_name": network_name, **ipam}, "net").pool


def owner(cid: str, ifname: str = "net1", uid: str = "", name: str = "", network: str = "net") -> Owner:
    return Owner(cid, ifname, "ns", name or f"pod-{cid}", uid or f"uid-{cid}", network)


def no_sleep(_: float) -> None:
    pass


def alloc(store: Any, node: str = "n1", **kw: Any) -> Allocator:
    return Allocator(store, node, sleep=no_sleep, **kw)


def entries(store: FileStore, pool: str = "blue") -> dict[str, dict[str, Any]]:
    return {ip_: e for b in store.list(BLOCK, pool) for ip_, e in b.data["allocations"].items()}


def addrs(leases: list[Any]) -> list[str]:
    return [str(x.address) for x in leases]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "ipam")


def test_add_records_the_owner_in_the_reservation_and_is_idempotent(store: FileStore) -> None:
    # one block per range, so the addresses do not depend on where the node's hash starts its search
    p = spec(range="10.232.10.0/26", gateway="10.232.10.1", ipRanges=[{"range": "fd00:232:10::/122"}])
    a = alloc(store)
    first = a.allocate(p, owner("c1"))
    assert addrs(first) == ["10.232.10.2", "fd00:232:10::1"]
    assert (first[0].prefixlen, first[0].gateway, first[1].gateway) == (26, ip("10.232.10.1"), None)
    assert addrs(a.allocate(p, owner("c1"))) == addrs(first)
    assert addrs(alloc(store).allocate(p, owner("c1"))) == addrs(first)  # a fresh process too
    e = entries(store)
    assert set(e) == {"10.232.10.2", "fd00:232:10::1"}
    assert e["10.232.10.2"] == {"containerID": "c1", "ifname": "net1", "podNamespace": "ns", "podName": "pod-c1",
                                "podUID": "uid-c1", "network": "net", "node": "n1", "static": False, "claim": None,
                                "released": False}
    blocks = {b.name: b.data for b in store.list(BLOCK, "blue")}
    assert blocks["blue-0ae80a00"] == {"pool": "blue", "cidr": "10.232.10.0/26", "node": "n1", "used": 1,
                                       "allocations": {"10.232.10.2": e["10.232.10.2"]}}
    assert store.get(POOL, "blue").data == {  # type: ignore[union-attr]
        "pool": "blue", "ranges": ["10.232.10.0/26 exclude 10.232.10.1", "fd00:232:10::/122"], "blockPrefix": {"4": 26, "6": 122}}
    # another interface of the same container is another owner
    assert addrs(a.allocate(p, owner("c1", "net2"))) == ["10.232.10.3", "fd00:232:10::2"]


def test_del_frees_exactly_that_owner_and_succeeds_with_nothing(store: FileStore) -> None:
    p = spec(range="10.232.11.0/26")
    a = alloc(store)
    a.allocate(p, owner("c1"))
    a.allocate(p, owner("c2"))
    a.allocate(p, owner("c1", "net2"))
    assert a.release(p, owner("c1")) == [ip("10.232.11.1")]
    assert sorted(entries(store)) == ["10.232.11.2", "10.232.11.3"]
    assert a.release(p, owner("c1")) == []
    assert a.release(p, owner("nobody")) == []
    assert alloc(store).release(spec("never-used", range="10.232.12.0/24"), owner("c1")) == []
    assert store.list(BLOCK, "never-used") == [] and store.get(POOL, "never-used") is None


def test_static_is_a_real_reservation(store: FileStore) -> None:
    p = spec(range="10.232.13.0/29", range_start="10.232.13.3", exclude=["10.232.13.6"])  # dynamic: .3 .4 .5
    a = alloc(store)
    assert addrs(a.allocate(p, owner("s1"), static=[ip("10.232.13.4")])) == ["10.232.13.4"]
    assert entries(store)["10.232.13.4"]["static"] is True and len(entries(store)) == 1  # no dynamic one besides
    assert addrs(a.allocate(p, owner("s1"), static=[ip("10.232.13.4")])) == ["10.232.13.4"]  # idempotent
    with pytest.raises(CNIError) as e:
        alloc(store, "n2").allocate(p, owner("s2"), static=[ip("10.232.13.4")])
    assert e.value.code == INTERNAL
    assert e.value.msg == ('meta-ipam pool "blue": requested address 10.232.13.4 is taken by pod ns/pod-s1 (uid uid-s1), '
                           'container s1 interface net1 on node n1')
    # outside range_start..range_end is the static zone: reserved, and never handed out dynamically
    assert addrs(a.allocate(p, owner("s3"), static=[ip("10.232.13.1")])) == ["10.232.13.1"]
    dynamic = [addrs(a.allocate(p, owner(f"d{i}")))[0] for i in range(2)]
    assert sorted(dynamic) == ["10.232.13.3", "10.232.13.5"]
    with pytest.raises(CNIError, match="no addresses available"):
        a.allocate(p, owner("d9"))
    for bad, why in [("10.232.13.6", "10.232.13.6 is excluded"), ("10.232.13.7", "broadcast address"),
                     ("10.232.14.1", "is in none of its ranges")]:
        with pytest.raises(CNIError, match=why) as e:
            a.allocate(p, owner("bad"), static=[ip(bad)])
        assert e.value.code == INVALID_CONFIG
    with pytest.raises(CNIError, match="one address per range") as e:
        a.allocate(p, owner("bad"), static=[ip("10.232.13.2"), ip("10.232.13.1")])
    assert "bad" not in {x["containerID"] for x in entries(store).values()}


def test_static_after_a_dynamic_address_for_the_same_owner_is_refused(store: FileStore) -> None:
    p = spec(range="10.232.15.0/26")
    a = alloc(store)
    a.allocate(p, owner("c1"))
    with pytest.raises(CNIError, match=r"already holds 10.232.15.1 in 10.232.15.0/26; it asked for 10.232.15.9"):
        a.allocate(p, owner("c1"), static=[ip("10.232.15.9")])


def test_static_in_a_block_nobody_leases_is_tidied_after_release(store: FileStore) -> None:
    p = spec(range="10.232.16.0/24")
    a = alloc(store)
    a.allocate(p, owner("s1"), static=[ip("10.232.16.200")])
    (b,) = store.list(BLOCK, "blue")
    assert (b.name, b.data["node"], b.data["cidr"]) == ("blue-0ae810c0", "", "10.232.16.192/26")
    assert a.release(p, owner("s1"), hints=[ip("10.232.16.200")]) == [ip("10.232.16.200")]
    assert store.list(BLOCK, "blue") == []


def test_sticky_claim_keeps_its_address_across_del(store: FileStore) -> None:
    p = spec(range="10.232.17.0/29", range_end="10.232.17.3")  # .1 .2 .3
    a = alloc(store)
    (x,) = addrs(a.allocate(p, owner("c1", name="web-0"), claim="ns/web-0"))
    assert a.release(p, owner("c1", name="web-0")) == [ip(x)]
    assert entries(store)[x]["released"] is True and entries(store)[x]["claim"] == "ns/web-0"
    others = [addrs(a.allocate(p, owner(f"o{i}")))[0] for i in range(2)]
    assert x not in others
    with pytest.raises(CNIError, match=r"no addresses available .* 1 of them kept for sticky claims"):
        a.allocate(p, owner("o9"))
    # the pod comes back (new sandbox, new UID, another node): same address
    assert addrs(alloc(store, "n2").allocate(p, owner("c2", name="web-0"), claim="ns/web-0")) == [x]
    assert entries(store)[x]["containerID"] == "c2" and entries(store)[x]["released"] is False
    assert entries(store)[x]["node"] == "n2"


def test_claim_still_held_by_another_live_attachment(store: FileStore) -> None:
    p = spec(range="10.232.18.0/26")
    a = alloc(store)
    a.allocate(p, owner("c1", name="web-0"), claim="ns/web-0")
    with pytest.raises(CNIError, match=r"10.232.18.1 of claim ns/web-0 is still held by pod ns/web-0") as e:
        a.allocate(p, owner("c2", name="web-0"), claim="ns/web-0")
    assert e.value.code == TRY_AGAIN_LATER


def test_a_new_sandbox_of_the_same_pod_takes_over_the_old_ones_address(store: FileStore) -> None:
    p = spec(range="10.232.19.0/26")
    a = alloc(store)
    assert addrs(a.allocate(p, owner("c1", uid="u1"))) == ["10.232.19.1"]
    # a reboot without DEL: same pod UID and interface, new container ID
    assert addrs(a.allocate(p, owner("c2", uid="u1"))) == ["10.232.19.1"]
    assert entries(store)["10.232.19.1"]["containerID"] == "c2"
    assert a.release(p, owner("c1", uid="u1")) == []  # the late DEL of the dead sandbox frees nothing
    assert a.release(p, owner("c2", uid="u1")) == [ip("10.232.19.1")]


def test_exhaustion_reserves_nothing_and_dual_stack_rolls_back(store: FileStore) -> None:
    p = spec(ipRanges=[{"range": "fd00:232:20::/120"}, {"range": "10.232.20.0/30"}])  # v6 first, 2 v4 addresses
    a = alloc(store)
    a.allocate(p, owner("c1"))
    a.allocate(p, owner("c2"))
    before = entries(store)
    with pytest.raises(CNIError) as e:
        a.allocate(p, owner("c3"))
    assert e.value.code == INTERNAL
    assert e.value.msg == ('meta-ipam pool "blue": no addresses available in range 10.232.20.0/30 '
                           '(2 dynamic addresses, all allocated)')
    assert entries(store) == before  # the v6 address taken for c3 was released again


def test_a_pool_fills_to_its_last_address_by_leasing_then_borrowing(store: FileStore) -> None:
    p = spec(range="10.232.21.0/26", block_size={"4": 28})  # 4 blocks, 62 addresses
    nodes = [alloc(store, f"node-{i}") for i in range(6)]
    got: list[str] = []
    for k in range(62):
        got += addrs(nodes[k % len(nodes)].allocate(p, owner(f"c{k}")))
    assert len(set(got)) == 62
    blocks = store.list(BLOCK, "blue")
    assert len(blocks) == 4 and all(b.data["used"] == len(b.data["allocations"]) for b in blocks)
    leased = sorted(b.data["node"] for b in blocks)
    assert len(set(leased)) == 4  # one block per node that found one; the other two nodes borrowed
    borrowers = {e["node"] for b in blocks for e in b.data["allocations"].values() if e["node"] != b.data["node"]}
    assert borrowers >= {"node-4", "node-5"} - set(leased)
    for a in nodes:
        with pytest.raises(CNIError, match="no addresses available"):
            a.allocate(p, owner("late"))


def test_nodes_lease_different_blocks(store: FileStore) -> None:
    p = spec(range="10.232.22.0/24")
    n = [alloc(store, name) for name in ("alpha", "beta", "gamma")]
    for i, a in enumerate(n):
        a.allocate(p, owner(f"c{i}"))
    blocks = store.list(BLOCK, "blue")
    assert sorted(b.data["node"] for b in blocks) == ["alpha", "beta", "gamma"]
    # later allocations of a node stay in its block
    n[0].allocate(p, owner("c9"))
    assert {b.data["node"]: b.data["used"] for b in store.list(BLOCK, "blue")}["alpha"] == 2


def test_a_different_config_for_the_same_pool_is_refused_naming_both(store: FileStore) -> None:
    alloc(store).allocate(spec("shared", range="10.232.23.0/26"), owner("c1"))
    with pytest.raises(CNIError) as e:
        alloc(store).allocate(spec("shared", range="10.232.23.0/27"), owner("c2"))
    assert e.value.code == INVALID_CONFIG
    assert e.value.msg == ('meta-ipam pool "shared": this config has ranges [\'10.232.23.0/27\'] with blockPrefix '
                           "{'4': 26, '6': 122}, but the pool was created with ranges ['10.232.23.0/26'] with blockPrefix "
                           "{'4': 26, '6': 122}: configs sharing a network_name must have the same ranges, or use their "
                           "own network_name")
    # same ranges under another network_name: another pool, overlapping on purpose
    assert addrs(alloc(store).allocate(spec("other", range="10.232.23.0/27"), owner("c1"))) == ["10.232.23.1"]


# --- concurrency seams: conflicts, an unavailable store, and the cache ---------------------------------------


class Wrapped:
    """A store that lets a test act just before an update reaches the real store."""

    def __init__(self, inner: FileStore, before_update: Callable[[int], None]) -> None:
        self.inner = inner
        self.before_update = before_update
        self.updates = 0
        self.full_lists = 0

    def get(self, kind: str, name: str) -> Versioned | None:
        return self.inner.get(kind, name)

    def list(self, kind: str, pool: str, node: str | None = None) -> list[Versioned]:
        self.full_lists += node is None
        return self.inner.list(kind, pool, node)

    def create(self, kind: str, name: str, data: dict[str, Any]) -> Versioned:
        return self.inner.create(kind, name, data)

    def update(self, obj: Versioned, data: dict[str, Any]) -> Versioned:
        self.updates += 1
        self.before_update(self.updates)
        return self.inner.update(obj, data)

    def delete(self, obj: Versioned) -> None:
        self.inner.delete(obj)


def test_a_write_that_lost_a_race_rereads_and_picks_another_address(store: FileStore) -> None:
    p = spec(range="10.232.24.0/24")
    other = alloc(store)
    alloc(store).allocate(p, owner("c0"))  # the block exists, leased to n1

    def race(n: int) -> None:
        if n == 1:
            other.allocate(p, owner("rival"))  # same node, another process, same block, in between

    w = Wrapped(store, race)
    got = addrs(alloc(w).allocate(p, owner("c1")))
    assert w.updates >= 2  # the first write lost
    e = entries(store)
    assert len(e) == 3 and e[got[0]]["containerID"] == "c1"
    assert len({x["containerID"] for x in e.values()}) == 3


def test_conflicts_are_bounded_then_try_again_later(store: FileStore) -> None:
    p = spec(range="10.232.25.0/24")
    alloc(store).allocate(p, owner("c0"))
    sleeps: list[float] = []

    def always(_: int) -> None:
        raise Conflict("busy")

    a = Allocator(Wrapped(store, always), "n1", max_conflicts=5, sleep=sleeps.append)
    with pytest.raises(CNIError) as e:
        a.allocate(p, owner("c1"))
    assert e.value.code == TRY_AGAIN_LATER and "gave up after 5 conflicting writes" in e.value.msg
    assert len(sleeps) == 5 and all(s > 0 for s in sleeps)
    assert "c1" not in {x["containerID"] for x in entries(store).values()}

    def down(_: int) -> None:
        raise Unavailable("API timeout")

    with pytest.raises(CNIError) as e:
        alloc(Wrapped(store, down)).allocate(p, owner("c1"))
    assert e.value.code == TRY_AGAIN_LATER and "store unavailable: API timeout" in e.value.msg


def test_the_cache_is_never_trusted(store: FileStore) -> None:
    p = spec(range="10.232.26.0/24")
    daemon = alloc(store)
    x = addrs(daemon.allocate(p, owner("c1")))[0]
    # freed by hand behind the daemon's back: a repeated ADD must hold an address, not just remember one
    assert alloc(store).release_address("blue", ip(x)) is not None
    again = addrs(daemon.allocate(p, owner("c1")))[0]
    assert entries(store)[again]["containerID"] == "c1"
    # another process of this node writes the same block: the daemon's stale version loses and it re-reads
    alloc(store).allocate(p, owner("c2"))
    daemon.allocate(p, owner("c3"))
    held = [e["containerID"] for e in entries(store).values()]
    assert sorted(held) == ["c1", "c2", "c3"]


def test_release_looks_in_hinted_blocks_before_the_whole_pool(store: FileStore) -> None:
    p = spec(range="10.232.27.0/24")
    alloc(store, "n2").allocate(p, owner("c0"))
    b = alloc(store, "n3")
    # static addresses sit in whatever block holds them, not in this node's blocks
    b.allocate(p, owner("s1"), static=[ip("10.232.27.3")])
    b.allocate(p, owner("s2"), static=[ip("10.232.27.4")])
    w = Wrapped(store, lambda _: None)
    assert alloc(w, "n3").release(p, owner("s1"), hints=[ip("10.232.27.3")]) == [ip("10.232.27.3")]
    assert w.full_lists == 0  # prevResult named the block: no pool-wide read
    # without a hint, a range still unaccounted for makes it search the pool: found all the same
    w = Wrapped(store, lambda _: None)
    assert alloc(w, "n3").release(p, owner("s2")) == [ip("10.232.27.4")]
    assert w.full_lists == 1


def test_held_for_check(store: FileStore) -> None:
    p = spec(range="10.232.28.0/26", ipRanges=[{"range": "fd00:232:28::/122"}])
    a = alloc(store)
    a.allocate(p, owner("c1"))
    assert a.held(p, owner("c1")) == {0: ip("10.232.28.1"), 1: ip("fd00:232:28::1")}
    assert a.held(p, owner("c2")) == {}


def test_release_by_hand_frees_a_sticky_address(store: FileStore) -> None:
    p = spec(range="10.232.29.0/26")
    a = alloc(store)
    a.allocate(p, owner("c1"), claim="ns/web-0")
    a.release(p, owner("c1"))
    assert entries(store)["10.232.29.1"]["released"] is True
    gone = a.release_address("blue", ip("10.232.29.1"))
    assert gone is not None and gone["claim"] == "ns/web-0"
    assert entries(store) == {}
    assert a.release_address("blue", ip("10.232.29.1")) is None
