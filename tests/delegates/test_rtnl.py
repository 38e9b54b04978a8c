"""delegates/_rtnl.py against pyroute2 itself: the requests it builds without pyroute2's request filters are
byte for byte the ones the filters build, and its lazily decoded answers read exactly as pyroute2's fully
decoded ones, attribute by attribute, on real links, addresses and routes of a fresh namespace."""
from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2.iproute.linux import get_arguments_processor, get_dump_filter
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from delegates import _rtnl
from delegates._rtnl import ADDR, LINK, Rtnl
from meta.netns import entered


def filtered(sock: Rtnl, mode: str, command: str, kwarg: dict[str, Any]) -> bytes:
    """The request pyroute2's filters make (the way Rtnl._request sends every other shape)."""
    message, command_map = (ifinfmsg(), LINK) if mode == "link" else (ifaddrmsg(), ADDR)
    dump_filter, kw = get_dump_filter(mode, command, dict(kwarg), None)
    request = NetlinkRequest(sock, message, command, command_map, dump_filter,
                             get_arguments_processor(mode, command, kw, None), msg_seq=7)
    request.msg.encode()
    return bytes(request.msg.data)


def direct(sock: Rtnl, mode: str, command: str, kwarg: dict[str, Any]) -> bytes | None:
    body = (_rtnl._simple_link if mode == "link" else _rtnl._simple_addr)(command, dict(kwarg))
    if body is None:
        return None
    msg_type, flags = (LINK if mode == "link" else ADDR)[command]
    return _rtnl._NLMSGHDR.pack(16 + len(body), msg_type, NetlinkRequest.flags[flags], 7, sock.epid) + body


SIMPLE = [
    ("link", "get", {"ifname": "eth0"}),
    ("link", "get", {"ifname": "a-fifteen-chars"}),
    ("link", "get", {"index": 12}),
    ("link", "set", {"index": 5, "state": "up"}),
    ("link", "set", {"index": 5, "state": "down"}),
    ("link", "set", {"index": 5, "flags": 0x101, "change": 0x101}),
    ("link", "set", {"index": 5, "address": "02:ab:cd:ef:01:23"}),
    ("link", "set", {"index": 5, "ifname": "net1"}),
    ("link", "set", {"index": 5, "mtu": 1400}),
    ("link", "set", {"index": 5, "mtu": 9000, "state": "up", "address": "0a:00:00:00:00:01", "ifname": "x"}),
    ("link", "del", {"index": 5}),
    # the bridge's veth (make_veth) and the macvlan/ipvlan child (_child.create_link), as they ask
    ("link", "add", {"ifname": "veth01ab", "kind": "veth", "peer": {"ifname": "eth0", "txqlen": 0, "net_ns_fd": 9},
                     "master": 7, "state": "up", "txqlen": 0}),
    ("link", "add", {"ifname": "veth01ab", "kind": "veth", "peer": {"ifname": "net1", "txqlen": 0, "net_ns_fd": 9,
                     "address": "02:00:00:00:00:01", "mtu": 1400}, "master": 7, "state": "up", "txqlen": 0,
                     "mtu": 1400}),
    ("link", "add", {"ifname": "br0.5", "kind": "veth", "peer": {"ifname": "veth02cd", "txqlen": 0}, "master": 7,
                     "state": "up", "txqlen": 0}),
    ("link", "add", {"net_ns_fd": 9, "ifname": "veth0a", "kind": "macvlan", "link": 3, "macvlan_mode": "bridge",
                     "txqlen": 0}),
    ("link", "add", {"ifname": "veth0a", "kind": "macvlan", "link": 3, "macvlan_mode": "private", "txqlen": 0,
                     "mtu": 1400, "address": "0a:00:00:00:00:02"}),
    ("link", "add", {"net_ns_fd": 9, "ifname": "veth0b", "kind": "ipvlan", "link": 3, "ipvlan_mode": 0, "txqlen": 0}),
    ("link", "add", {"net_ns_fd": 9, "ifname": "veth0b", "kind": "ipvlan", "link": 3, "ipvlan_mode": 2, "txqlen": 0,
                     "mtu": 1300}),
    ("addr", "add", {"index": 3, "address": "10.1.2.3", "prefixlen": 24, "broadcast": "10.1.2.255"}),
    ("addr", "add", {"index": 3, "address": "10.1.2.3", "prefixlen": 31}),
    ("addr", "add", {"index": 3, "address": "fd00::1:3", "prefixlen": 64}),
]
# Shapes left to pyroute2's filters (each has something the direct builds do not cover).
FILTERED = [
    ("link", "get", {"ifname": "eth0", "index": 3}),
    ("link", "add", {"ifname": "x", "kind": "dummy"}),
    ("link", "add", {"ifname": "br0", "kind": "bridge", "mtu": 1400}),
    ("link", "add", {"ifname": "x", "kind": "veth"}),
    ("link", "add", {"ifname": "x", "kind": "macvlan", "link": 3, "macvlan_mode": "weird"}),
    ("link", "add", {"ifname": "x", "kind": "macvlan", "link": 3, "macvlan_mode": "bridge", "vlan_id": 5}),
    ("link", "add", {"ifname": "x", "kind": "veth", "peer": {"ifname": "y", "master": 3}, "state": "down"}),
    ("link", "set", {"index": 5, "master": 3}),
    ("link", "set", {"index": 5, "state": "up", "flags": 1, "change": 1}),
    ("link", "set", {"index": "5"}),
    ("addr", "add", {"index": 3, "address": "fd00::3", "prefixlen": 64, "broadcast": "fd00::ff"}),
    ("addr", "add", {"index": 3, "address": "10.1.2.3", "prefixlen": 24, "local": "10.1.2.4"}),
    ("addr", "del", {"index": 3, "address": "10.1.2.3", "prefixlen": 24}),
]


@pytest.fixture
def sock() -> Iterator[Rtnl]:
    with Rtnl() as s:
        yield s


@pytest.mark.parametrize("mode,command,kwarg", SIMPLE, ids=[f"{m}-{c}-{'-'.join(k)}" for m, c, k in SIMPLE])
def test_direct_request_is_the_filtered_one(sock: Rtnl, mode: str, command: str, kwarg: dict[str, Any]) -> None:
    assert direct(sock, mode, command, kwarg) == filtered(sock, mode, command, kwarg)


@pytest.mark.parametrize("mode,command,kwarg", FILTERED, ids=[f"{m}-{c}-{'-'.join(k)}" for m, c, k in FILTERED])
def test_other_shapes_go_through_the_filters(sock: Rtnl, mode: str, command: str, kwarg: dict[str, Any]) -> None:
    assert direct(sock, mode, command, kwarg) is None


@pytest.fixture
def populated(netns_factory: Callable[[], str]) -> str:
    """A namespace with a bridge, a veth pair enslaved to it, a macvlan, IPv4 and IPv6 addresses and routes:
    links with nested kind data, bridge-port info, several address families."""
    netns = netns_factory()
    name = Path(netns).name
    for cmd in (["link", "add", "br0", "type", "bridge"],
                ["link", "add", "va", "mtu", "1400", "type", "veth", "peer", "name", "vb"],
                ["link", "set", "va", "master", "br0"],
                ["link", "add", "mv0", "link", "vb", "type", "macvlan", "mode", "bridge"],
                ["addr", "add", "10.9.8.1/24", "dev", "br0"],
                ["addr", "add", "fd00:9::1/64", "dev", "br0", "nodad"],
                ["addr", "add", "10.9.7.2/31", "dev", "mv0"],
                ["link", "set", "lo", "up"], ["link", "set", "br0", "up"], ["link", "set", "va", "up"],
                ["link", "set", "vb", "up"], ["link", "set", "mv0", "up"],
                ["route", "add", "10.100.0.0/16", "via", "10.9.8.254"]):
        subprocess.run(["ip", "-n", name, *cmd], check=True)
    return netns


def full(msg: Any) -> Any:
    """The same answer decoded by pyroute2 alone."""
    whole = MarshalRtnl.msg_map[msg["header"]["type"]](msg.data, offset=msg.offset)
    whole.decode()
    return whole


def plain(value: Any) -> Any:
    """A decoded value as plain data (pyroute2's attribute slots compare by identity)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k != "header"}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "cell"):  # nla_slot
        return (value.name, plain(value.value))
    return value


def names(msg: Any) -> list[str]:
    return sorted({str(a[0]) for a in msg["attrs"]})


def test_lazy_answers_read_as_pyroute2s(populated: str) -> None:
    with entered(populated):
        ns = Rtnl()
    try:
        answers = {"link": ns.link("dump"), "addr": ns.get_addr(), "route": ns.get_routes()}
        assert len(answers["link"]) == 5 and len(answers["addr"]) >= 4 and answers["route"]
        for what, msgs in answers.items():
            for msg in msgs:
                assert isinstance(msg, _rtnl._Lazy)
                whole = full(msg)
                for name in names(whole):  # every attribute, read one by one before the list is touched
                    assert plain(msg.get_attrs(name)) == plain(whole.get_attrs(name)), (what, name)
                    assert plain(msg.get(name)) == plain(whole.get(name)), (what, name)
                for field, _ in whole.fields:
                    assert msg[field] == whole[field]
                assert msg.get_attrs("IFLA_NO_SUCH") == whole.get_attrs("IFLA_NO_SUCH") == []
        links = {m.get("ifname"): m for m in answers["link"]}
        assert links["va"].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"
        assert links["mv0"].get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_MACVLAN_MODE") == \
            full(links["mv0"]).get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_MACVLAN_MODE")
        assert links["va"].get("master") == links["br0"]["index"] and links["va"].get("mtu") == 1400
        # Reading the list itself gives pyroute2's whole decoding.
        fresh = ns.link("get", ifname="br0")[0]
        assert plain(fresh["attrs"]) == plain(full(fresh)["attrs"])
        assert fresh.get("ifname") == "br0"
    finally:
        ns.close()


def test_requests_and_errors(populated: str) -> None:
    with entered(populated):
        ns = Rtnl()
    try:
        va = ns.link("get", ifname="va")[0]
        assert ns.link("get", index=va["index"])[0].get("ifname") == "va"
        assert ns.link("set", index=va["index"], mtu=1300, address="02:00:00:00:00:09") == []  # the ACK is not returned
        assert ns.link("get", ifname="va")[0].get("address") == "02:00:00:00:00:09"
        ns.addr("add", index=va["index"], address="10.9.6.1", prefixlen=24, broadcast="10.9.6.255")
        have = {(a.get("address"), a["prefixlen"]) for a in ns.get_addr(index=va["index"])}
        assert ("10.9.6.1", 24) in have
        # One link's addresses: the same messages as pyroute2's filtered dump.
        for family in (0, 2, 10):
            for link in ns.link("dump"):
                mine = ns.get_addr(family=family, index=link["index"])
                theirs = ns.addr("dump", family=family, match={"index": link["index"]})
                assert [plain(full(m)) for m in mine] == [plain(full(m)) for m in theirs]
        assert len(ns.get_addr(index=ns.link("get", ifname="br0")[0]["index"])) == 3  # v4, v6, v6 link-local
        # Kernel errors are pyroute2's NetlinkError, with the code and text the filtered path gives.
        with pytest.raises(NetlinkError) as direct_error:
            ns.link("get", ifname="nope")
        with pytest.raises(NetlinkError) as filtered_error:
            ns.link("get", ifname="nope", ext_mask=0)  # not a direct shape: built by the filters
        assert direct_error.value.code == filtered_error.value.code == errno.ENODEV
        assert direct_error.value.args == filtered_error.value.args
        with pytest.raises(NetlinkError) as dup:
            ns.addr("add", index=va["index"], address="10.9.6.1", prefixlen=24)
        assert dup.value.code == errno.EEXIST
        # A request after an error still gets its own answer (the sequence numbers keep them apart).
        assert ns.link("get", ifname="br0")[0].get("ifname") == "br0"
    finally:
        ns.close()
