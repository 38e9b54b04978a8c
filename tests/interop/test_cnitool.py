"""cnitool (the real libcni, Debian golang-github-appc-cni 1.1.2) drives meta-cni end to end.

This cnitool knows only add/check/del: GC and STATUS arrived in libcni 1.2, so they are not exercised here.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import links_in

from .conftest import LIBCNI_RESULTS, Topology, bridge_ports, macvlans_on, remove_libcni_results

pytestmark = pytest.mark.interop

NETWORK = "metanet"
POD = "pod-a"


def cnitool_container_id(netns: str) -> str:
    """The container ID cnitool derives from the netns path (cnitool.go: first 20 hex of its sha512)."""
    return "cnitool-" + hashlib.sha512(netns.encode()).hexdigest()[:20]


@attrs.frozen
class Client:
    """cnitool bound to one NETCONFPATH and plugin path."""

    binary: Path
    netconf: Path
    cni_path: str
    base_env: dict[str, str]
    seen: list[str] = attrs.field(factory=list)  # container IDs used, for teardown

    def __call__(self, command: str, netns: str, cni_args: str = "") -> subprocess.CompletedProcess[str]:
        self.seen.append(cnitool_container_id(netns))
        env = dict(self.base_env, NETCONFPATH=str(self.netconf), CNI_PATH=self.cni_path, CNI_ARGS=cni_args)
        return subprocess.run([str(self.binary), command, NETWORK, netns], capture_output=True, text=True,
                              env=env, timeout=120)


@pytest.fixture
def world(topology: Callable[[int], Topology], cnitool: Path, reference_plugins: Path,
          clean_env: dict[str, str]) -> Iterator[tuple[Topology, Callable[[str], Client]]]:
    """A topology plus a factory of cnitool clients, one NETCONFPATH per cniVersion."""
    topo = topology(10)
    clients: list[Client] = []

    def client(cni_version: str) -> Client:
        netconf = topo.root / f"netconf-{cni_version}"
        topo.write_conflist(netconf, NETWORK, cni_version)
        clients.append(Client(cnitool, netconf, topo.cni_path, clean_env))
        return clients[-1]

    yield topo, client
    # libcni's result cache is global (/var/lib/cni): drop whatever a failed test left behind.
    for c in clients:
        for cid in set(c.seen):
            remove_libcni_results(NETWORK, cid)


def pod_args(name: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"


def ipv4_of(link: dict[str, Any]) -> list[str]:
    return [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]


def link_kinds(netns: str) -> dict[str, str | None]:
    """Interface name -> link kind (veth, macvlan...) inside a netns."""
    out = subprocess.run(["ip", "-n", Path(netns).name, "-d", "-j", "link"], capture_output=True, text=True, check=True)
    return {link["ifname"]: (link.get("linkinfo") or {}).get("info_kind") for link in json.loads(out.stdout)}


def assert_clean(topo: Topology, netns: str) -> None:
    """The netns holds only lo and nothing meta-cni or libcni made for it survives."""
    assert set(links_in(netns)) == {"lo"}
    cid = cnitool_container_id(netns)
    assert not (topo.cni_dir / NETWORK / cid).exists(), "meta-cni cache entry left behind"
    assert not list(LIBCNI_RESULTS.glob(f"{NETWORK}-{cid}-*")), "libcni result cache left behind"
    assert bridge_ports(topo.primary_bridge) == [] and bridge_ports(topo.secondary_bridge) == []
    assert macvlans_on(topo.master) == []


# 0.4.0 is what podman and older runtimes send; 1.0.0 is cnitool's newest.
@pytest.mark.parametrize("cni_version", ["0.4.0", "1.0.0"])
def test_add_check_del(world: tuple[Topology, Callable[[str], Client]], netns_factory: Callable[[], str],
                       cni_version: str) -> None:
    topo, client = world
    topo.add_pod(POD, "br-a, mv-a")
    cni = client(cni_version)
    netns = netns_factory()
    cid = cnitool_container_id(netns)

    add = cni("add", netns, pod_args(POD))
    assert add.returncode == 0, add.stderr + add.stdout
    result = json.loads(add.stdout)
    assert result["cniVersion"] == cni_version
    sandbox = [i["name"] for i in result["interfaces"] if i.get("sandbox")]
    assert sandbox == ["eth0", "net1", "net2"]
    assert [ip["address"].rsplit(".", 1)[0] + "." for ip in result["ips"]] == [topo.prefixes["eth0"]]

    links = links_in(netns)
    assert set(links) == {"lo", "eth0", "net1", "net2"}
    for ifname, prefix in topo.prefixes.items():
        addrs = ipv4_of(links[ifname])
        assert len(addrs) == 1 and addrs[0].startswith(prefix), (ifname, addrs)
    assert link_kinds(netns) == {"lo": None, "eth0": "veth", "net1": "veth", "net2": "macvlan"}
    assert (LIBCNI_RESULTS / f"{NETWORK}-{cid}-eth0").is_file()
    assert (topo.cni_dir / NETWORK / cid / "eth0.json").is_file()
    status = json.loads(topo.status_file(POD).read_text())
    assert [(s["name"], s["interface"], s["default"]) for s in status] == [
        ("primary", "eth0", True), ("default/br-a", "net1", False), ("default/mv-a", "net2", False)]
    assert [s["ips"][0] for s in status] == [ipv4_of(links[i])[0] for i in ("eth0", "net1", "net2")]

    check = cni("check", netns, pod_args(POD))
    assert check.returncode == 0, check.stderr + check.stdout

    delete = cni("del", netns, pod_args(POD))
    assert delete.returncode == 0, delete.stderr + delete.stdout
    assert_clean(topo, netns)
    assert not topo.status_file(POD).exists()
    # host-local released every address it handed out
    assert sorted(p.name for p in topo.ipam_dir.rglob("10.241.*")) == []


def test_two_pods_talk_over_secondaries(world: tuple[Topology, Callable[[str], Client]],
                                        netns_factory: Callable[[], str]) -> None:
    """Two netns attached through cnitool reach each other over the secondary bridge and the macvlan."""
    topo, client = world
    cni = client("1.0.0")
    pods = {}
    for name in ("pod-a", "pod-b"):
        topo.add_pod(name, "br-a, mv-a")
        netns = netns_factory()
        add = cni("add", netns, pod_args(name))
        assert add.returncode == 0, add.stderr + add.stdout
        pods[name] = netns
    b_links = links_in(pods["pod-b"])
    for ifname in ("net1", "net2"):
        target = ipv4_of(b_links[ifname])[0]
        ping = subprocess.run(["ip", "netns", "exec", Path(pods["pod-a"]).name, "ping", "-c", "1", "-W", "5",
                               "-I", ifname, target], capture_output=True, text=True)
        assert ping.returncode == 0, f"ping over {ifname}: {ping.stdout}{ping.stderr}"
    for name, netns in pods.items():
        delete = cni("del", netns, pod_args(name))
        assert delete.returncode == 0, delete.stderr + delete.stdout
    for netns in pods.values():
        assert set(links_in(netns)) == {"lo"}
    assert topo.cached_containers(NETWORK) == []
    assert bridge_ports(topo.primary_bridge) == [] and bridge_ports(topo.secondary_bridge) == []


def test_missing_nad_fails_add_with_meta_message(world: tuple[Topology, Callable[[str], Client]],
                                                 netns_factory: Callable[[], str]) -> None:
    topo, client = world
    topo.add_pod(POD, "br-a, no-such-net")
    cni = client("1.0.0")
    netns = netns_factory()

    add = cni("add", netns, pod_args(POD))
    assert add.returncode != 0
    # cnitool prints libcni's error, which carries meta-cni's error message verbatim.
    output = add.stderr + add.stdout
    assert "NetworkAttachmentDefinition default/no-such-net not found" in output, output
    assert f"pod default/{POD}" in output, output
    assert_clean(topo, netns)
    assert not topo.status_file(POD).exists()


def test_failing_delegate_rolls_back(world: tuple[Topology, Callable[[str], Client]],
                                     netns_factory: Callable[[], str]) -> None:
    """The last delegate fails (bad macvlan mode): the earlier attachments are undone before cnitool returns."""
    topo, client = world
    topo.add_nad("mv-broken", {"cniVersion": "1.0.0", "type": "macvlan", "master": topo.master, "mode": "bogus",
                               "ipam": {"type": "host-local", "subnet": "10.241.250.0/24", "dataDir": str(topo.ipam_dir)}})
    topo.add_pod(POD, "br-a, mv-broken")
    cni = client("1.0.0")
    netns = netns_factory()

    add = cni("add", netns, pod_args(POD))
    assert add.returncode != 0
    output = add.stderr + add.stdout
    assert "network default/mv-broken (net2): macvlan ADD" in output and "bogus" in output, output
    assert_clean(topo, netns)
    assert sorted(p.name for p in topo.ipam_dir.rglob("10.241.*")) == []
    # DEL after a failed ADD (what a runtime does) is harmless.
    delete = cni("del", netns, pod_args(POD))
    assert delete.returncode == 0, delete.stderr + delete.stdout


def test_delegate_failing_add_and_del_does_not_stick(world: tuple[Topology, Callable[[str], Client]],
                                                     netns_factory: Callable[[], str]) -> None:
    """macvlan 1.1.1 fails DEL as well as ADD while its master is missing. Its DEL error during the
    rollback must not keep the pod: the runtime's DEL then succeeds and nothing is left behind."""
    topo, client = world
    topo.add_nad("mv-late", {"cniVersion": "1.0.0", "type": "macvlan", "master": topo.master + "x", "mode": "bridge",
                             "ipam": {"type": "host-local", "subnet": "10.241.250.0/24", "dataDir": str(topo.ipam_dir)}})
    topo.add_pod(POD, "br-a, mv-late")
    cni = client("1.0.0")
    netns = netns_factory()

    add = cni("add", netns, pod_args(POD))
    assert add.returncode != 0
    output = add.stderr + add.stdout
    assert "network default/mv-late (net2): macvlan ADD" in output, output
    assert_clean(topo, netns)
    assert sorted(p.name for p in topo.ipam_dir.rglob("10.241.*")) == []
    delete = cni("del", netns, pod_args(POD))
    assert delete.returncode == 0, delete.stderr + delete.stdout
    assert_clean(topo, netns)
