"""meta-ipvlan (the standalone executable) against the reference /usr/lib/cni/ipvlan on a dummy master.

Parity cases run the same config through both (ADD, CHECK, DEL) and compare the result JSON and what is
left in the namespace; the other tests cover what only ours does or where the two differ on purpose
(see delegates/ipvlan.py).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import (IFNAME, OURS, REFERENCE_PLUGINS, cni, compare, failed, host_local, ip, ip_files, ip_json,
                      link_names, mac_of, ok, with_prev)

REF = REFERENCE_PLUGINS / "ipvlan"
MINE = OURS / "meta-ipvlan"

# id: (extra config fields, subnets, options); one subnet per case
CASES: dict[str, tuple[dict[str, Any], tuple[str, ...], dict[str, bool]]] = {
    "l2-v4": ({"mode": "l2"}, ("10.237.1.0/24",), {"del_twice": True}),
    "l3-v4": ({"mode": "l3"}, ("10.237.2.0/24",), {}),
    "l3s-v4": ({"mode": "l3s"}, ("10.237.3.0/24",), {}),
    "l3-v6": ({"mode": "l3"}, ("fd10:237:4::/64",), {"check": False}),
    "l2-dual": ({"mode": "l2"}, ("10.237.5.0/24", "fd10:237:5::/64"), {}),
    "default-mode-mtu": ({"mtu": 1400}, ("10.237.6.0/24",), {"check": False}),
}


def config(master: str | None, fields: dict[str, Any], ipam: dict[str, Any] | None) -> dict[str, Any]:
    c: dict[str, Any] = {"cniVersion": "1.0.0", "name": "mck-ipvlan", "type": "ipvlan", **fields}
    if master:
        c["master"] = master
    if ipam is not None:
        c["ipam"] = ipam
    return c


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case: str, ipvlan_master: str, netns_factory: Callable[[], str], tmp_path: Path) -> None:
    fields, subnets, opts = CASES[case]
    ours = compare(REF, MINE, lambda d: config(ipvlan_master, fields, host_local(d, *subnets)),
                   netns_factory, tmp_path, random_mac=False, **opts)[1]
    # and both did the right thing, not merely the same thing
    link = ours.state["link"]
    assert link["kind"] == "ipvlan" and link["info_data"]["mode"] == fields.get("mode", "l2")
    assert link["address"] == mac_of(ipvlan_master)  # slaves share the master's MAC
    assert link["mtu"] == fields.get("mtu", 1500)
    assert {a["local"] for a in ours.state["addrs"] if a["scope"] == "global"} == {
        a["address"].split("/")[0] for a in ours.result["ips"]}
    assert ours.state["sysctls"]["net/ipv4/conf/net1/arp_notify"] == "1"
    assert ours.state["sysctls"]["net/ipv6/conf/net1/ndisc_notify"] == "1"
    assert [a["interface"] for a in ours.result["ips"]] == [0] * len(subnets)


def test_parity_chained(ipvlan_master: str, netns_factory: Callable[[], str], tmp_path: Path) -> None:
    """No master and no ipam: the master is prevResult's only interface and its IPs and routes are used.
    The reference's CHECK fails here (it looks up master "" as it never resolves the chained master)."""
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": ipvlan_master}],
            "ips": [{"address": "10.237.7.9/24", "gateway": "10.237.7.1", "interface": 0}],
            "routes": [{"dst": "10.237.70.0/24"}], "dns": {"nameservers": ["10.237.7.53"]}}
    ours = compare(REF, MINE, lambda d: dict(config(None, {"mode": "l2", "dns": {"search": ["mck"]}}, None),
                                             prevResult=prev), netns_factory, tmp_path, random_mac=False,
                   check_reference=False)[1]
    assert ours.result["ips"] == [{"address": "10.237.7.9/24", "gateway": "10.237.7.1", "interface": 0}]
    assert ours.result["dns"] == {"search": ["mck"]}
    assert any(r.get("dst") == "10.237.70.0/24" and r.get("gateway") == "10.237.7.1" for r in ours.state["routes"])


def test_chained_master_failure(netns_factory: Callable[[], str]) -> None:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "mckx1"}, {"name": "mckx2"}],
            "ips": [{"address": "10.237.8.9/24", "interface": 0}]}
    conf = dict(config(None, {}, None), prevResult=prev)
    ns = netns_factory()
    ref_err, our_err = failed(cni(REF, "ADD", conf, ns)), failed(cni(MINE, "ADD", conf, ns))
    assert our_err["msg"] == ref_err["msg"] == "chained master failure. PrevResult lacks a single named interface"
    assert IFNAME not in link_names(ns)


def test_mtu_above_master(ipvlan_master: str, netns_factory: Callable[[], str], tmp_path: Path) -> None:
    ns = netns_factory()
    err = failed(cni(MINE, "ADD", config(ipvlan_master, {"mtu": 9000}, host_local(tmp_path, "10.237.9.0/24")), ns))
    assert err["code"] == 7 and "MTU" in err["msg"], err
    assert IFNAME not in link_names(ns)
    assert ip_files(tmp_path) == []


def test_ipam_required_unless_chained(ipvlan_master: str, netns_factory: Callable[[], str]) -> None:
    ns = netns_factory()
    err = failed(cni(MINE, "ADD", config(ipvlan_master, {}, None), ns))
    assert err["code"] == 7 and "ipam" in err["msg"], err
    assert IFNAME not in link_names(ns)


def test_link_in_container(dummy: Callable[..., str], netns_factory: Callable[[], str], tmp_path: Path) -> None:
    """The master lives in the pod namespace; CHECK notices a mode that differs from the config."""
    ns = netns_factory()
    master = dummy("mckin0", netns=ns)
    conf = config(master, {"mode": "l3s", "linkInContainer": True}, host_local(tmp_path, "10.237.10.0/24"))
    result = ok(cni(MINE, "ADD", conf, ns))
    link = ip_json(ns, "-d", "link", "show", "dev", IFNAME)[0]
    assert link["linkinfo"]["info_kind"] == "ipvlan" and link["linkinfo"]["info_data"]["mode"] == "l3s"
    assert link["link"] == master and "link_netnsid" not in link  # the master is in the same namespace
    assert result["interfaces"] == [{"name": IFNAME, "mac": mac_of(master, ns), "sandbox": ns}]
    ok(cni(MINE, "CHECK", with_prev(conf, result), ns))
    err = failed(cni(MINE, "CHECK", with_prev(dict(conf, mode="l2"), result), ns))
    assert "mode" in err["msg"], err
    ok(cni(MINE, "DEL", with_prev(conf, result), ns))
    assert link_names(ns) == {"lo", master}
    assert ip_files(tmp_path) == []


def test_del_with_missing_netns(ipvlan_master: str, netns_factory: Callable[[], str], tmp_path: Path) -> None:
    """DEL after the namespace is gone succeeds and still releases the address."""
    ns = netns_factory()
    conf = config(ipvlan_master, {}, host_local(tmp_path, "10.237.11.0/24"))
    result = ok(cni(MINE, "ADD", conf, ns))
    assert ip_files(tmp_path) == ["10.237.11.2"]
    ip("netns", "del", Path(ns).name)
    ok(cni(MINE, "DEL", with_prev(conf, result), ns))
    assert ip_files(tmp_path) == []
