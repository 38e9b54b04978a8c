"""Block arithmetic of meta-ipam: which addresses a range hands out, how it is cut into blocks, and names."""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from meta.ipam.allocator import pick_free
from meta.ipam.config import Owner
from meta.ipam.ranges import (block_name, block_prefix, block_slots, dynamic_block_starts, dynamic_in_block,
                              parse_canonical, parse_range, pool_object_name)

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def all_dynamic(spec: str, prefix: int, **kw: object) -> list[int]:
    r = parse_range(spec, **kw)  # type: ignore[arg-type]
    return [a for s in dynamic_block_starts(r, prefix, 0) for a in dynamic_in_block(r, s, prefix)]


def test_a_slash16_is_fully_allocatable_in_1024_small_blocks() -> None:
    r = parse_range("10.232.0.0/16")
    starts = list(dynamic_block_starts(r, 26, 0))
    assert len(starts) == len(set(starts)) == 1024
    addresses = [a for s in starts for a in dynamic_in_block(r, s, 26)]
    # every host address exactly once: all but the network and broadcast addresses
    assert sorted(addresses) == list(range(ip("10.232.0.1"), ip("10.232.255.255")))
    assert r.count_dynamic(r.first, r.last) == r.count_assignable() == 65534
    # The largest object of such a pool: one full block with realistic owners is a few tens of KB, far
    # from etcd's 1.5 MiB limit, and it does not grow with the pool.
    owner = Owner("f" * 64, "net1", "n" * 63, "p" * 63, "0b1f5f7e-8f9d-4a57-9f3e-3a6d1c2b4e5f")
    block = {"pool": "x" * 200, "cidr": "10.232.255.192/26", "node": "node" * 15, "used": 64,
             "allocations": {str(ipaddress.ip_address(a)): owner.entry("node" * 15, claim="ns/" + "p" * 63)
                             for a in range(ip("10.232.255.192"), ip("10.232.255.255") + 1)}}
    assert len(json.dumps(block)) < 64 * 1024


def test_every_start_slot_visits_every_block_once() -> None:
    r = parse_range("10.232.4.0/24", exclude=["10.232.4.64/26"])
    expected = {ip("10.232.4.0"), ip("10.232.4.128"), ip("10.232.4.192")}
    for slot in range(6):
        starts = list(dynamic_block_starts(r, 26, slot))
        assert len(starts) == 3 and set(starts) == expected
    assert list(dynamic_block_starts(r, 26, 2))[0] == ip("10.232.4.128")
    assert list(dynamic_block_starts(r, 26, 1))[0] == ip("10.232.4.128")  # slot 1 is excluded: the next one


def test_network_broadcast_gateway_exclusions_and_bounds_are_never_dynamic() -> None:
    gw = ipaddress.ip_address("10.232.5.1")
    got = all_dynamic("10.232.5.0/27", 28, range_start="10.232.5.1", range_end="10.232.5.30",
                      exclude=["10.232.5.4/30", "10.232.5.20", "10.232.5.25-10.232.5.26"], gateway=gw)
    expected = [a for a in range(ip("10.232.5.2"), ip("10.232.5.30") + 1)
                if not ip("10.232.5.4") <= a <= ip("10.232.5.7") and a not in (ip("10.232.5.20"), ip("10.232.5.25"), ip("10.232.5.26"))]
    assert got == expected
    assert all_dynamic("10.232.5.0/30", 30) == [ip("10.232.5.1"), ip("10.232.5.2")]
    assert all_dynamic("10.232.5.10-10.232.5.12/24", 26) == [ip("10.232.5.10"), ip("10.232.5.11"), ip("10.232.5.12")]


def test_static_zone_outside_range_start_end() -> None:
    r = parse_range("10.232.6.0/24", range_start="10.232.6.100", exclude=["10.232.6.5"], gateway=ipaddress.ip_address("10.232.6.1"))
    assert r.assignable(ip("10.232.6.50")) and not r.dynamic(ip("10.232.6.50"))
    assert r.why_not_assignable(ip("10.232.6.50")) is None
    assert r.why_not_assignable(ip("10.232.6.5")) == "10.232.6.5 is excluded in 10.232.6.100-10.232.6.254/24 exclude 10.232.6.1,10.232.6.5"
    assert r.why_not_assignable(ip("10.232.6.1")) == "10.232.6.1 is the gateway of 10.232.6.0/24"
    assert r.why_not_assignable(ip("10.232.6.0")) == "10.232.6.0 is the network address of 10.232.6.0/24"
    assert r.why_not_assignable(ip("10.232.6.255")) == "10.232.6.255 is the broadcast address of 10.232.6.0/24"
    assert r.count_assignable() == 252


def test_ipv6_blocks_and_huge_exclusions_are_jumped() -> None:
    r = parse_range("fd00:232::/64", exclude=["fd00:232::/65"])
    assert block_prefix(r, {6: 122}) == 122
    first, slots = block_slots(r, 122)
    assert slots == 2 ** 58  # slots span first..last; the walk jumps the excluded lower half in one step
    starts = dynamic_block_starts(r, 122, 0)
    assert [ipaddress.ip_address(next(starts)) for _ in range(2)] == [ipaddress.ip_address("fd00:232::8000:0:0:0"),
                                                                      ipaddress.ip_address("fd00:232::8000:0:0:40")]
    # the IPv6 subnet-router anycast address is not handed out, the last address is
    r2 = parse_range("fd00:232:1::/120")
    got = [a for s in dynamic_block_starts(r2, 122, 0) for a in dynamic_in_block(r2, s, 122)]
    assert got[0] == ip("fd00:232:1::1") and got[-1] == ip("fd00:232:1::ff") and len(got) == 255


def test_names_are_dns1123_sort_by_address_and_never_collide() -> None:
    v4 = block_name("blue", ipaddress.ip_address("10.232.0.64"))
    v6 = block_name("blue", ipaddress.ip_address("fd00::40"))
    assert v4 == "blue-0ae80040" and v6 == "blue-fd000000000000000000000000000040"
    assert pool_object_name("blue") == "blue"
    changed = [pool_object_name(n) for n in ("Blue", "blue_net", "blue.net", "-blue-", "", "x" * 300, "ünï")]
    assert all(DNS1123.match(n) and len(n) <= 253 - 33 for n in changed)
    assert len(set(changed)) == len(changed) and "blue" not in changed
    assert pool_object_name("Blue").startswith("blue-") and pool_object_name("blue_net").startswith("blue-net-")


def test_canonical_round_trip() -> None:
    for spec, kw in [("10.232.7.0/24", {}), ("10.232.7.10-10.232.7.20/24", {"exclude": ["10.232.7.15"]}),
                     ("fd00::/64", {"exclude": ["fd00::/80", "fd00::1:0:0:5"]})]:
        r = parse_range(spec, **kw)  # type: ignore[arg-type]
        assert parse_canonical(r.canonical()).canonical() == r.canonical()


def test_next_fit_inside_a_block() -> None:
    r = parse_range("10.232.8.0/24")
    start = ip("10.232.8.0")
    alloc: dict[str, Any] = {"10.232.8.1": {}, "10.232.8.2": {}, "10.232.8.5": {}}
    assert str(pick_free(r, start, 26, alloc)) == "10.232.8.6"  # after the highest, not the lowest hole
    full_top: dict[str, Any] = {str(ipaddress.ip_address(a)): {} for a in range(ip("10.232.8.60"), ip("10.232.8.63") + 1)}
    assert str(pick_free(r, start, 26, full_top)) == "10.232.8.1"  # wraps
    static_top = {"10.232.8.63": {"static": True}, "10.232.8.1": {}}
    assert str(pick_free(r, start, 26, static_top)) == "10.232.8.2"  # statics do not move the cursor
    everything: dict[str, Any] = {str(ipaddress.ip_address(a)): {} for a in range(ip("10.232.8.1"), ip("10.232.8.63") + 1)}
    assert pick_free(r, start, 26, everything) is None
