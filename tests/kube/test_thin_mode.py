"""meta-cni exec'd as a runtime does, with a config whose `kubeconfig` points at a real kube-apiserver:
pods and NADs come from the API, the network-status lands on the pod object, a failed attachment leaves a
Warning event on the pod, and DEL completes from the local cache while the API server is down."""
from __future__ import annotations

import ipaddress
import json
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PluginRun, delete_host_link, host_local_reservations, links_in, run_plugin
from tests.infra.kube_cluster import KubeCluster
from tests.kube.test_source import NETWORKS, create_nad, create_pod, pod_annotations, pod_events, unique

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
META_NAME = "meta"
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def used_third_octets() -> set[int]:
    """Third octets of 10.242.x.y addresses already on the host (a concurrent run's bridges)."""
    out = subprocess.run(["ip", "-4", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    used = set()
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if ip in ipaddress.ip_network("10.242.0.0/16"):
                used.add(int(str(ip).split(".")[2]))
    return used


def ipv4_of(link: dict[str, Any]) -> list[ipaddress.IPv4Interface]:
    return [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}") for a in link.get("addr_info", [])
            if a.get("family") == "inet"]


class KubeScenario:
    """One thin-mode installation: confDir with the primary network, cniDir, host-local dataDir, and a
    meta-cni config reading pods and NADs from the cluster; bridges are `mcks*`, subnets in 10.242.0.0/16."""

    def __init__(self, root: Path, cluster: KubeCluster, namespace: str, meta_cni: Path, plugins: Path) -> None:
        self.root = root
        self.cluster = cluster
        self.namespace = namespace
        self.meta_cni = meta_cni
        self.plugins = plugins
        self.conf_dir = root / "net.d"
        self.cni_dir = root / "cni"
        self.data_dir = root / "ipam"
        self.conf_dir.mkdir()
        self.data_dir.mkdir()
        self.bridges: list[str] = []
        self.octets: set[int] = set()

    def bridge_name(self) -> str:
        name = f"mcks{uuid.uuid4().hex[:8]}"
        self.bridges.append(name)
        return name

    def subnet(self) -> ipaddress.IPv4Network:
        taken = self.octets | used_third_octets()
        octet = random.choice([o for o in range(1, 255) if o not in taken])
        self.octets.add(octet)
        return ipaddress.IPv4Network(f"10.242.{octet}.0/24")

    def bridge_plugin(self, subnet: ipaddress.IPv4Network) -> dict[str, Any]:
        return {"type": "bridge", "bridge": self.bridge_name(),
                "ipam": {"type": "host-local", "subnet": str(subnet), "dataDir": str(self.data_dir)}}

    def write_primary(self) -> ipaddress.IPv4Network:
        subnet = self.subnet()
        conf = {"cniVersion": "1.0.0", "name": "primary", "plugins": [self.bridge_plugin(subnet)]}
        (self.conf_dir / "10-primary.conflist").write_text(json.dumps(conf))
        return subnet

    def add_nad(self, name: str) -> ipaddress.IPv4Network:
        subnet = self.subnet()
        create_nad(self.cluster, self.namespace, name, {"cniVersion": "1.0.0", **self.bridge_plugin(subnet)})
        return subnet

    def add_pod(self, name: str, networks: str) -> str:
        return str(create_pod(self.cluster, self.namespace, name, {NETWORKS: networks})["metadata"]["uid"])

    def config(self) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": META_NAME, "type": "meta-cni", "clusterNetwork": "primary",
                "confDir": str(self.conf_dir), "cniDir": str(self.cni_dir), "deviceInfoDir": str(self.root / "devinfo"),
                "kubeconfig": str(self.cluster.kubeconfig), "apiTimeout": 3}

    def run(self, command: str, container_id: str, netns: str, pod: str, uid: str | None) -> PluginRun:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={pod}"
        if uid:
            args += f";K8S_POD_UID={uid}"
        return run_plugin(self.meta_cni, command, self.config(), container_id=container_id, netns=netns,
                          ifname="eth0", cni_args=args, path=str(self.plugins))

    def cache_path(self, container_id: str) -> Path:
        return self.cni_dir / META_NAME / container_id / "eth0.json"

    def cleanup(self) -> None:
        for br in self.bridges:
            delete_host_link(br)


@pytest.fixture
def kube_scenario(tmp_path: Path, kube_cluster: KubeCluster, nad_crd: dict[str, Any], meta_cni: Path,
                  reference_plugins: Path) -> Iterator[KubeScenario]:
    assert os.geteuid() == 0, "thin-mode tests create network namespaces: run as root"
    ns = unique()
    kube_cluster.ensure_namespace(ns)
    sc = KubeScenario(tmp_path, kube_cluster, ns, meta_cni, reference_plugins)
    yield sc
    sc.cleanup()


@pytest.fixture
def api_restored(kube_cluster: KubeCluster) -> Iterator[KubeCluster]:
    yield kube_cluster
    kube_cluster.start_apiserver()


def cni_error(run: PluginRun) -> dict[str, Any]:
    assert run.rc != 0, f"expected an error, got rc 0: {run.stdout}"
    err = run.json
    assert isinstance(err, dict) and "code" in err, f"not a CNI error: {run.stdout!r} {run.stderr!r}"
    return err


def test_add_attaches_from_the_api_and_publishes_the_status(kube_scenario: KubeScenario,
                                                            netns_factory: Any) -> None:
    sc = kube_scenario
    primary = sc.write_primary()
    blue = sc.add_nad("blue")
    uid = sc.add_pod("p1", "blue")
    netns = netns_factory()

    add = sc.run("ADD", "c1", netns, "p1", uid)
    assert add.rc == 0, add.stdout + add.stderr
    links = links_in(netns)
    assert sorted(links) == ["eth0", "lo", "net1"]
    (eth0_ip,) = ipv4_of(links["eth0"])
    (net1_ip,) = ipv4_of(links["net1"])
    assert eth0_ip.ip in primary and net1_ip.ip in blue

    status = json.loads(pod_annotations(sc.cluster, sc.namespace, "p1")[NETWORK_STATUS])
    assert [(s["name"], s["interface"], s["default"]) for s in status] == [
        ("primary", "eth0", True), (f"{sc.namespace}/blue", "net1", False)]
    assert status[0]["ips"] == [str(eth0_ip.ip)] and status[1]["ips"] == [str(net1_ip.ip)]
    assert status[1]["mac"] == links["net1"]["address"]

    delete = sc.run("DEL", "c1", netns, "p1", uid)
    assert delete.rc == 0, delete.stdout + delete.stderr
    assert sorted(links_in(netns)) == ["lo"]
    assert host_local_reservations(sc.data_dir) == []
    assert not sc.cache_path("c1").exists()
    assert NETWORK_STATUS not in pod_annotations(sc.cluster, sc.namespace, "p1")


def test_missing_nad_fails_the_add_and_leaves_a_warning_event(kube_scenario: KubeScenario,
                                                              netns_factory: Any) -> None:
    sc = kube_scenario
    sc.write_primary()
    uid = sc.add_pod("p2", "nope")
    netns = netns_factory()

    add = sc.run("ADD", "c2", netns, "p2", uid)
    err = cni_error(add)
    assert err["code"] == 7 and f"NetworkAttachmentDefinition {sc.namespace}/nope not found" in err["msg"]
    assert sorted(links_in(netns)) == ["lo"] and host_local_reservations(sc.data_dir) == []
    (ev,) = pod_events(sc.cluster, sc.namespace, "p2")
    assert ev.type == "Warning" and ev.reason == "AttachmentFailed" and "nope" in (ev.message or "")
    assert ev.involved_object.uid == uid and ev.source is not None and ev.source.component == "meta-cni"
    assert NETWORK_STATUS not in pod_annotations(sc.cluster, sc.namespace, "p2")


def test_uid_of_another_pod_is_refused(kube_scenario: KubeScenario, netns_factory: Any) -> None:
    sc = kube_scenario
    sc.write_primary()
    sc.add_pod("p3", "")
    netns = netns_factory()
    err = cni_error(sc.run("ADD", "c3", netns, "p3", "00000000-0000-0000-0000-000000000000"))
    assert err["code"] == 3 and "differs from K8S_POD_UID" in err["msg"]
    assert sorted(links_in(netns)) == ["lo"]


def test_del_completes_while_the_api_server_is_down(kube_scenario: KubeScenario, netns_factory: Any,
                                                    api_restored: KubeCluster) -> None:
    sc = kube_scenario
    sc.write_primary()
    sc.add_nad("blue")
    uid = sc.add_pod("p4", "blue")
    netns = netns_factory()
    add = sc.run("ADD", "c4", netns, "p4", uid)
    assert add.rc == 0, add.stdout + add.stderr
    assert sorted(links_in(netns)) == ["eth0", "lo", "net1"] and len(host_local_reservations(sc.data_dir)) == 2

    sc.cluster.stop_apiserver()
    # A new ADD cannot learn the pod's networks: try again later, and nothing is left behind.
    other = netns_factory()
    err = cni_error(sc.run("ADD", "c5", other, "p4", uid))
    assert err["code"] == 11 and sc.cluster.host in err["msg"] and f"pod {sc.namespace}/p4" in err["msg"]
    assert sorted(links_in(other)) == ["lo"]

    delete = sc.run("DEL", "c4", netns, "p4", uid)
    assert delete.rc == 0, delete.stdout + delete.stderr
    assert sorted(links_in(netns)) == ["lo"]
    assert host_local_reservations(sc.data_dir) == []
    assert not sc.cache_path("c4").exists()

    sc.cluster.start_apiserver()
    # The status could not be cleared while the API was down; it is informational, DEL did not wait for it.
    assert NETWORK_STATUS in pod_annotations(sc.cluster, sc.namespace, "p4")
