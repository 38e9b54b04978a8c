"""meta-ipam as a real CNI IPAM plugin: exec'd on its own, exec'd by the reference bridge plugin from CNI_PATH,
and in-process under meta-cni's built-in meta-bridge. Real namespaces, bridges named `mcip*`, subnets in
10.232.128.0/17 (the unit tests use the lower half of 10.232.0.0/16 in files only)."""
from __future__ import annotations

import ipaddress
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta.ipam.filestore import FileStore
from meta.ipam.store import BLOCK
from tests.conftest import META_CNI, REFERENCE_PLUGINS, PluginRun, delete_host_link, links_in, run_plugin

pytestmark = pytest.mark.integration

OURS = Path(sys.prefix) / "bin" / "meta-ipam"


def ok(r: PluginRun) -> Any:
    assert r.rc == 0, r.stdout + r.stderr
    return r.json


def err(r: PluginRun) -> dict[str, Any]:
    assert r.rc != 0, r.stdout
    return r.json  # type: ignore[no-any-return]


def host_subnets() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = subprocess.run(["ip", "-4", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(out) for a in link.get("addr_info", [])]


@pytest.fixture
def subnet() -> Callable[[], ipaddress.IPv4Network]:
    """Fresh /24s in 10.232.128.0/17 that no host interface uses (concurrent runs pick at random)."""
    given: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    def make() -> ipaddress.IPv4Network:
        used = host_subnets() + given
        free = [n for n in ipaddress.IPv4Network("10.232.128.0/17").subnets(new_prefix=24)
                if not any(n.overlaps(u) for u in used)]
        net = random.choice(free)
        given.append(net)
        return net

    return make


@pytest.fixture
def bridge() -> Iterator[Callable[[], str]]:
    """Fresh `mcip` bridge names; the bridges are deleted at teardown (the bridge plugins never delete them)."""
    made: list[str] = []

    def make() -> str:
        name = f"mcip{uuid.uuid4().hex[:8]}"
        made.append(name)
        return name

    yield make
    for name in made:
        delete_host_link(name)


def store_allocations(data_dir: Path, pool: str) -> dict[str, dict[str, Any]]:
    return {ip: e for b in FileStore(data_dir).list(BLOCK, pool) for ip, e in b.data["allocations"].items()}


def pod_args(name: str, uid: str = "", ns: str = "default", extra: str = "") -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}" + (f";K8S_POD_UID={uid}" if uid else "") + extra


def ping(netns: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", Path(netns).name, "ping", "-c", "1", "-W", "5", address],
                          capture_output=True, text=True)


def global_v4(netns: str, ifname: str) -> list[str]:
    link = links_in(netns)[ifname]
    return [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"]


# --- exec'd by the reference bridge plugin ---------------------------------------------------------------


def test_reference_bridge_execs_meta_ipam(tmp_path: Path, netns_factory: Callable[[], str],
                                         bridge: Callable[[], str], subnet: Callable[[], ipaddress.IPv4Network]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bridge").symlink_to(REFERENCE_PLUGINS / "bridge")
    (bin_dir / "meta-ipam").symlink_to(OURS)
    data = tmp_path / "ipam"
    net = subnet()
    gw = str(net.network_address + 1)
    conf = {"cniVersion": "1.0.0", "name": "mcip-net", "type": "bridge", "bridge": bridge(), "isGateway": True,
            "ipam": {"type": "meta-ipam", "range": str(net), "gateway": gw, "dataDir": str(data),
                     "routes": [{"dst": "192.0.2.0/24", "gw": gw}], "nodeName": "node-a"}}

    def run(command: str, cid: str, netns: str, args: str, config: dict[str, Any] = conf) -> PluginRun:
        return run_plugin(bin_dir / "bridge", command, config, container_id=cid, netns=netns, ifname="eth0",
                          cni_args=args, path=str(bin_dir))

    ns1, ns2 = netns_factory(), netns_factory()
    static = str(net.network_address + 200)
    r1 = ok(run("ADD", "c1", ns1, pod_args("p1", "u1")))
    r2 = ok(run("ADD", "c2", ns2, pod_args("p2", "u2", extra=f";IP={static}")))
    a1 = r1["ips"][0]["address"]
    assert ipaddress.ip_interface(a1).network == net and r1["ips"][0]["gateway"] == gw
    assert r2["ips"][0]["address"] == f"{static}/24"
    assert r1["routes"] == [{"dst": "192.0.2.0/24", "gw": gw}]
    assert global_v4(ns1, "eth0") == [a1]
    assert ping(ns1, static).returncode == 0
    held = store_allocations(data, "mcip-net")
    assert {ip: (e["containerID"], e["podName"], e["podUID"], e["ifname"], e["node"], e["static"]) for ip, e in held.items()} == {
        a1.split("/")[0]: ("c1", "p1", "u1", "eth0", "node-a", False), static: ("c2", "p2", "u2", "eth0", "node-a", True)}
    # the same static address for another pod is refused, with its holder named
    e = err(run("ADD", "c3", netns_factory(), pod_args("p3", extra=f";IP={static}")))
    assert e["code"] == 999 and f"requested address {static} is taken by pod default/p2" in e["msg"]
    # CHECK with the cached result, then DEL as a runtime does (prevResult included), twice
    ok(run("CHECK", "c1", ns1, pod_args("p1", "u1"), {**conf, "prevResult": r1}))
    for cid, ns, res, name in (("c1", ns1, r1, "p1"), ("c2", ns2, r2, "p2")):
        ok(run("DEL", cid, ns, pod_args(name), {**conf, "prevResult": res}))
        ok(run("DEL", cid, ns, pod_args(name), conf))
    assert store_allocations(data, "mcip-net") == {}


# --- exec'd on its own ---------------------------------------------------------------------------------


def test_standalone_commands(tmp_path: Path, netns_factory: Callable[[], str]) -> None:
    data = tmp_path / "ipam"
    ns = netns_factory()
    ipam: dict[str, Any] = {"type": "meta-ipam", "range": "10.232.60.0/29", "dataDir": str(data), "sticky": True}
    base: dict[str, Any] = {"cniVersion": "1.0.0", "name": "solo", "type": "bridge", "ipam": ipam}

    def run(command: str, cid: str, args: str = "", config: dict[str, Any] = base) -> PluginRun:
        return run_plugin(OURS, command, config, container_id=cid, netns=ns if cid else "", ifname="net1", cni_args=args)

    version = ok(run("VERSION", "", config={"cniVersion": "1.1.0"}))
    assert "1.1.0" in version["supportedVersions"]
    # results in the config's version: 0.3.x has ips[].version
    old = ok(run("ADD", "c0", config={**base, "cniVersion": "0.3.1", "name": "old"}))
    assert old["ips"] == [{"version": "4", "address": "10.232.60.1/29"}]
    # sticky: a StatefulSet pod gets its address back after DEL, and nobody else gets it meanwhile
    x = ok(run("ADD", "c1", pod_args("web-0", "u1")))["ips"][0]["address"]
    ok(run("DEL", "c1", pod_args("web-0", "u1")))
    y = ok(run("ADD", "c2", pod_args("other", "u2")))["ips"][0]["address"]
    assert y != x
    assert ok(run("ADD", "c3", pod_args("web-0", "u3")))["ips"][0]["address"] == x
    e = err(run("CHECK", "c1", pod_args("web-0", "u1")))
    assert e["code"] == 999 and "holds no address" in e["msg"]
    ok(run("CHECK", "c3", pod_args("web-0", "u3")))
    # invalid config: the network and the field are named
    bad = {**base, "ipam": {**ipam, "range_start": "10.232.61.1"}}
    e = err(run("ADD", "c4", config=bad))
    assert e == {"cniVersion": "1.0.0", "code": 7,
                 "msg": 'meta-ipam: network "solo": ipam.range_start: 10.232.61.1 is not in 10.232.60.0/29'}
    # STATUS: the store must answer
    status = {**base, "cniVersion": "1.1.0"}
    ok(run("STATUS", "", config=status))
    (tmp_path / "file").write_text("")
    e = err(run("STATUS", "", config={**status, "ipam": {**ipam, "dataDir": str(tmp_path / "file")}}))
    assert e["code"] == 50 and "IPAM store not available" in e["msg"]


# --- in-process under meta-cni ----------------------------------------------------------------------------


def test_meta_cni_runs_meta_bridge_and_meta_ipam_in_process(tmp_path: Path, netns_factory: Callable[[], str],
                                                           bridge: Callable[[], str],
                                                           subnet: Callable[[], ipaddress.IPv4Network]) -> None:
    """The CNI path is empty: neither meta-bridge nor meta-ipam can be exec'd, so all of it runs in-process."""
    from tests.integration.conftest import Scenario

    empty = tmp_path / "plugins"
    empty.mkdir()
    (tmp_path / "meta").mkdir()
    sc = Scenario(tmp_path / "meta", META_CNI, empty)
    data = sc.data_dir
    n0, n1 = subnet(), subnet()
    primary = {"cniVersion": "1.0.0", "name": "primary", "plugins": [
        {"type": "meta-bridge", "bridge": bridge(), "isGateway": True,
         "ipam": {"type": "meta-ipam", "range": str(n0), "gateway": str(n0.network_address + 1), "dataDir": str(data)}}]}
    (sc.conf_dir / "10-primary.conflist").write_text(json.dumps(primary))
    sc.add_nad("sec", {"name": "sec", "type": "meta-bridge", "bridge": bridge(), "capabilities": {"ips": True},
                       "ipam": {"type": "meta-ipam", "range": str(n1), "dataDir": str(data), "network_name": "sec-pool"}})
    static = str(n1.network_address + 77)
    sc.add_pod([{"name": "sec", "ips": [f"{static}/24"]}], name="p1", uid="uid-1")
    sc.add_pod("sec", name="p2", uid="uid-2")
    ns1, ns2 = netns_factory(), netns_factory()

    ok(sc.add("c1", ns1, cni_args=Scenario.pod_args("p1", uid="uid-1")))
    ok(sc.add("c2", ns2, cni_args=Scenario.pod_args("p2", uid="uid-2")))
    status1 = {s["interface"]: s for s in sc.status("p1")}
    status2 = {s["interface"]: s for s in sc.status("p2")}
    assert status1["net1"]["ips"] == [static]
    assert ipaddress.ip_address(status2["net1"]["ips"][0]) in n1
    assert ipaddress.ip_address(status1["eth0"]["ips"][0]) in n0
    assert global_v4(ns1, "net1") == [f"{static}/24"]
    assert ping(ns2, static).returncode == 0

    sec = store_allocations(data, "sec-pool")
    assert {(e["podName"], e["podUID"], e["ifname"], e["static"]) for e in sec.values()} == {
        ("p1", "uid-1", "net1", True), ("p2", "uid-2", "net1", False)}
    assert {(e["podName"], e["ifname"]) for e in store_allocations(data, "primary").values()} == {("p1", "eth0"), ("p2", "eth0")}

    ok(sc.delete("c1", ns1, cni_args=Scenario.pod_args("p1", uid="uid-1")))
    ok(sc.delete("c2", ns2, cni_args=Scenario.pod_args("p2", uid="uid-2")))
    assert store_allocations(data, "sec-pool") == {} and store_allocations(data, "primary") == {}
    assert sorted(links_in(ns1)) == ["lo"] and sorted(links_in(ns2)) == ["lo"]
    assert not os.path.exists(sc.status_path("p1"))
