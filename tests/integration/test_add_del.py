"""ADD and DEL of multi-network pods through the meta-cni binary and the reference plugins."""
from __future__ import annotations

import ipaddress
import stat
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PluginRun, links_in
from tests.integration.conftest import Scenario, default_routes4, in_netns, ipv4_of

pytestmark = pytest.mark.integration


def cid() -> str:
    return f"mcit-{uuid.uuid4().hex[:12]}"


def in_subnet(cidr: str, subnet: ipaddress.IPv4Network) -> bool:
    return ipaddress.ip_interface(cidr).network == subnet


def three_networks(sc: Scenario, master: str) -> tuple[ipaddress.IPv4Network, ...]:
    """Primary bridge, a secondary bridge NAD `sec` and a macvlan NAD `mv` on `master`, pod selecting both."""
    primary = sc.write_primary()
    sec, mv = sc.subnet(), sc.subnet()
    sc.add_nad("sec", sc.bridge_plugin(sec))
    sc.add_nad("mv", sc.macvlan_plugin(master, mv))
    sc.add_pod("sec,mv")
    return primary, sec, mv


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_multi_attach(scenario: Scenario, netns_factory: Callable[[], str], veth_master: Callable[[str], str],
                      master_name: Callable[[], str], version: str) -> None:
    sc = scenario
    master = veth_master(master_name())
    primary, sec, mv = three_networks(sc, master)
    ns, c = netns_factory(), cid()

    r = sc.add(c, ns, cni_version=version)
    assert r.rc == 0, r.stdout + r.stderr
    links = links_in(ns)
    assert sorted(links) == ["eth0", "lo", "net1", "net2"]
    assert [in_subnet(a, primary) for a in ipv4_of(links["eth0"])] == [True]
    assert [in_subnet(a, sec) for a in ipv4_of(links["net1"])] == [True]
    assert [in_subnet(a, mv) for a in ipv4_of(links["net2"])] == [True]
    # net2 is a macvlan of our master, net1 a veth (bridge plugin).
    assert links["net2"].get("link_type") == "ether"
    kinds = {n: in_netns(ns, "ip", "-d", "-j", "link", "show", n).stdout for n in ("net1", "net2")}
    assert '"info_kind":"veth"' in kinds["net1"] and '"info_kind":"macvlan"' in kinds["net2"]

    # The ADD result: the primary's result in the requested version, plus the secondary sandbox interfaces.
    res = r.json
    assert res["cniVersion"] == version
    sandbox = [i for i in res["interfaces"] if i.get("sandbox")]
    assert [i["name"] for i in sandbox] == ["eth0", "net1", "net2"]
    assert all(i["sandbox"] == ns for i in sandbox)
    assert {i["name"]: i["mac"] for i in sandbox} == {n: links[n]["address"] for n in ("eth0", "net1", "net2")}
    assert len(res["ips"]) == 1, "only the primary's addresses belong in the result"
    ip = res["ips"][0]
    assert ip["address"] == ipv4_of(links["eth0"])[0]
    assert res["interfaces"][ip["interface"]]["name"] == "eth0"
    if version == "1.0.0":
        assert "version" not in ip
    else:
        assert ip["version"] == "4"

    # network-status: one entry per attachment, IPs without prefix, MACs of the real links.
    status = sc.status()
    assert [(e["name"], e["interface"], e["default"]) for e in status] == [
        ("primary", "eth0", True), ("default/sec", "net1", False), ("default/mv", "net2", False)]
    for e in status:
        link = links[e["interface"]]
        assert e["ips"] == [a.split("/")[0] for a in ipv4_of(link)]
        assert e["mac"] == link["address"]

    # The cache may hold delegate secrets: 0600.
    path = sc.cache_path(c)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = sc.cache_record(c)
    assert [a["ifname"] for a in record["attachments"]] == ["eth0", "net1", "net2"]
    assert len(sc.reserved_ips()) == 3

    d = sc.delete(c, ns, cni_version=version)
    assert d.rc == 0, d.stdout + d.stderr
    sc.assert_nothing_left(c, ns)


def test_explicit_interface_names_and_conflist_nad(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    fast, slow, tuned = sc.subnet(), sc.subnet(), sc.subnet()
    sc.add_nad("fast", sc.bridge_plugin(fast))
    sc.add_nad("slow", sc.bridge_plugin(slow))
    # A conflist NAD: tuning runs after the bridge, on the same interface, and sets a sysctl in the pod.
    sc.add_nad("tuned", {"name": "tuned", "plugins": [
        sc.bridge_plugin(tuned),
        {"type": "tuning", "sysctl": {"net.ipv4.conf.tune0.arp_ignore": "2"}, "dataDir": str(sc.root / "tuning")},
    ]})
    sc.add_pod([{"name": "fast", "interface": "fast0"}, {"name": "slow"}, {"name": "tuned", "interface": "tune0"}])
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns)
    assert r.rc == 0, r.stdout + r.stderr
    links = links_in(ns)
    # The unnamed element keeps its positional name net2.
    assert sorted(links) == ["eth0", "fast0", "lo", "net2", "tune0"]
    assert in_subnet(ipv4_of(links["fast0"])[0], fast)
    assert in_subnet(ipv4_of(links["net2"])[0], slow)
    assert in_subnet(ipv4_of(links["tune0"])[0], tuned)
    assert in_netns(ns, "sysctl", "-n", "net.ipv4.conf.tune0.arp_ignore").stdout.strip() == "2"
    assert in_netns(ns, "sysctl", "-n", "net.ipv4.conf.fast0.arp_ignore").stdout.strip() == "0"
    assert [e["interface"] for e in sc.status()] == ["eth0", "fast0", "net2", "tune0"]
    assert sc.delete(c, ns).rc == 0
    sc.assert_nothing_left(c, ns)


def test_explicit_interface_comma_form(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    sec = sc.subnet()
    sc.add_nad("sec", sc.bridge_plugin(sec))
    sc.add_pod("default/sec@fast0")
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns)
    assert r.rc == 0, r.stdout + r.stderr
    links = links_in(ns)
    assert sorted(links) == ["eth0", "fast0", "lo"]
    assert in_subnet(ipv4_of(links["fast0"])[0], sec)
    assert sc.delete(c, ns).rc == 0
    sc.assert_nothing_left(c, ns)


def failing_second_secondary(sc: Scenario, failing: dict[str, Any]) -> None:
    sc.write_primary()
    sc.add_nad("sec", sc.bridge_plugin(sc.subnet()))
    sc.add_nad("bad", failing)
    sc.add_pod("sec,bad")


def assert_rolled_back(sc: Scenario, r: PluginRun, c: str, ns: str) -> None:
    assert r.rc == 1
    err = r.json
    assert "network default/bad (net2)" in err["msg"], err
    sc.assert_nothing_left(c, ns)
    d = sc.delete(c, ns)
    assert d.rc == 0, d.stdout + d.stderr


def test_rollback_when_second_secondary_fails(scenario: Scenario, netns_factory: Callable[[], str],
                                               veth_master: Callable[[str], str], master_name: Callable[[], str]) -> None:
    """A bridge plugin pointed at an existing non-bridge link fails ADD (and its DEL is harmless)."""
    sc = scenario
    not_a_bridge = veth_master(master_name())
    failing_second_secondary(sc, {"type": "bridge", "bridge": not_a_bridge, "ipam": sc.ipam(sc.subnet())})
    ns, c = netns_factory(), cid()
    assert_rolled_back(sc, sc.add(c, ns), c, ns)


def test_rollback_macvlan_missing_master(scenario: Scenario, netns_factory: Callable[[], str],
                                         master_name: Callable[[], str]) -> None:
    """macvlan with a master that does not exist: its ADD fails, and so does its DEL ("Link not found"),
    though it never created anything. The pod must still be deletable."""
    sc = scenario
    failing_second_secondary(sc, sc.macvlan_plugin(master_name(), sc.subnet()))
    ns, c = netns_factory(), cid()
    assert_rolled_back(sc, sc.add(c, ns), c, ns)


def test_del_after_nad_and_pod_removed(scenario: Scenario, netns_factory: Callable[[], str],
                                       veth_master: Callable[[str], str], master_name: Callable[[], str]) -> None:
    sc = scenario
    three_networks(sc, veth_master(master_name()))
    ns, c = netns_factory(), cid()
    assert sc.add(c, ns).rc == 0
    assert len(sc.reserved_ips()) == 3 and sc.status_path().exists()
    # DEL must work from the cache alone.
    sc.nad_path("sec").unlink()
    sc.nad_path("mv").unlink()
    sc.pod_path().unlink()
    d = sc.delete(c, ns)
    assert d.rc == 0, d.stdout + d.stderr
    sc.assert_nothing_left(c, ns)


def test_del_idempotent_and_missing_netns(scenario: Scenario, netns_factory: Callable[[], str],
                                          veth_master: Callable[[str], str], master_name: Callable[[], str]) -> None:
    sc = scenario
    three_networks(sc, veth_master(master_name()))

    ns, c = netns_factory(), cid()
    assert sc.add(c, ns).rc == 0
    first, second = sc.delete(c, ns), sc.delete(c, ns)
    assert (first.rc, second.rc) == (0, 0), first.stdout + second.stdout
    sc.assert_nothing_left(c, ns)

    # The sandbox's netns is already gone when DEL comes: addresses must still be released.
    ns2, c2 = netns_factory(), cid()
    assert sc.add(c2, ns2).rc == 0
    assert len(sc.reserved_ips()) == 3
    subprocess.run(["ip", "netns", "del", Path(ns2).name], check=True)
    assert not Path(ns2).exists()
    d = sc.delete(c2, ns2)
    assert d.rc == 0, d.stdout + d.stderr
    assert sc.reserved_ips() == []
    assert not sc.cache_path(c2).exists()

    unknown = sc.delete(cid(), netns_factory())
    assert unknown.rc == 0, unknown.stdout


def test_check(scenario: Scenario, netns_factory: Callable[[], str],
               veth_master: Callable[[str], str], master_name: Callable[[], str]) -> None:
    sc = scenario
    three_networks(sc, veth_master(master_name()))
    ns, c = netns_factory(), cid()
    assert sc.add(c, ns).rc == 0
    ok = sc.run("CHECK", c, ns)
    assert ok.rc == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == ""

    old = sc.run("CHECK", c, ns, cni_version="0.3.1")
    assert old.rc == 1 and old.json["code"] == 1, old.stdout

    # Someone removed net1 behind our back: CHECK must notice and say which network.
    assert in_netns(ns, "ip", "link", "del", "net1").returncode == 0
    broken = sc.run("CHECK", c, ns)
    assert broken.rc != 0
    assert "default/sec" in broken.json["msg"], broken.stdout
    assert sc.delete(c, ns).rc == 0
    sc.assert_nothing_left(c, ns)


def test_default_route_moves_to_secondary(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    primary = sc.write_primary(isDefaultGateway=True)
    sec = sc.subnet()
    gw = str(sec.network_address + 1)
    sc.add_nad("sec", sc.bridge_plugin(sec, isGateway=True))
    sc.add_pod([{"name": "sec", "default-route": [gw]}])
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns)
    assert r.rc == 0, r.stdout + r.stderr
    routes = default_routes4(ns)
    assert [(rt.get("gateway"), rt.get("dev")) for rt in routes] == [(gw, "net1")]
    status = sc.status()
    assert status[1]["name"] == "default/sec" and status[1]["gateway"] == [gw]
    assert "gateway" not in status[0], "the primary no longer owns a default route"
    assert not any(rt.get("gw") == str(primary.network_address + 1) and rt["dst"] == "0.0.0.0/0"
                   for rt in r.json.get("routes", []))
    assert sc.delete(c, ns).rc == 0
    sc.assert_nothing_left(c, ns)
