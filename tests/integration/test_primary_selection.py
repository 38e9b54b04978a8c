"""Where the primary and the always-attached networks come from: clusterNetwork in its forms,
defaultNetworks (not for system namespaces), and the v1.multus-cni.io/default-network override."""
from __future__ import annotations

import json
from collections.abc import Callable

import yaml

from tests.conftest import links_in
from tests.integration.conftest import Scenario, ipv4_of


def subnet_of(netns: str, ifname: str) -> str:
    return ipv4_of(links_in(netns)[ifname])[0].rsplit(".", 1)[0]


def test_default_networks_come_after_the_primary_and_before_the_annotation(
        scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    primary = scenario.write_primary()
    always, picked = scenario.subnet(), scenario.subnet()
    scenario.add_nad("always", scenario.bridge_plugin(always), namespace="kube-system")
    scenario.add_nad("picked", scenario.bridge_plugin(picked))
    scenario.add_pod("picked")
    ns = netns_factory()
    r = scenario.add("c1", ns, defaultNetworks=["always"])
    assert r.rc == 0, r.stdout
    assert subnet_of(ns, "eth0") == str(primary.network_address).rsplit(".", 1)[0]
    assert subnet_of(ns, "net1") == str(always.network_address).rsplit(".", 1)[0]
    assert subnet_of(ns, "net2") == str(picked.network_address).rsplit(".", 1)[0]
    names = [(e["name"], e["interface"], e["default"]) for e in scenario.status()]
    assert names == [("primary", "eth0", True), ("kube-system/always", "net1", False), ("default/picked", "net2", False)]
    assert scenario.delete("c1", ns, defaultNetworks=["always"]).rc == 0
    scenario.assert_nothing_left("c1", ns)


def test_system_namespace_pods_get_no_default_networks(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    scenario.write_primary()
    scenario.add_nad("always", scenario.bridge_plugin(scenario.subnet()), namespace="kube-system")
    scenario.add_pod(None, name="coredns", namespace="kube-system")
    ns = netns_factory()
    args = scenario.pod_args("coredns", "kube-system")
    assert scenario.add("c1", ns, cni_args=args, defaultNetworks=["always"]).rc == 0
    assert sorted(links_in(ns)) == ["eth0", "lo"]
    assert scenario.delete("c1", ns, cni_args=args, defaultNetworks=["always"]).rc == 0


def test_cluster_network_as_nad_and_as_path(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    nad_subnet, file_subnet = scenario.subnet(), scenario.subnet()
    scenario.add_nad("podnet", scenario.bridge_plugin(nad_subnet), namespace="kube-system")
    path = scenario.root / "primary.conf"
    path.write_text(json.dumps({"cniVersion": "0.4.0", "name": "filenet", **scenario.bridge_plugin(file_subnet)}))
    scenario.add_pod(None)
    for cluster, subnet, status_name in (("podnet", nad_subnet, "kube-system/podnet"),
                                         (str(path), file_subnet, "filenet")):
        ns = netns_factory()
        assert scenario.add("c1", ns, clusterNetwork=cluster).rc == 0
        assert subnet_of(ns, "eth0") == str(subnet.network_address).rsplit(".", 1)[0]
        assert [e["name"] for e in scenario.status()] == [status_name]
        assert scenario.delete("c1", ns, clusterNetwork=cluster).rc == 0
        scenario.assert_nothing_left("c1", ns)


def test_default_network_annotation_replaces_the_primary(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    scenario.write_primary()
    special = scenario.subnet()
    scenario.add_nad("special", scenario.bridge_plugin(special), namespace="kube-system")
    pod = scenario.add_pod(None)
    obj = yaml.safe_load(pod.read_text())
    obj["metadata"]["annotations"] = {"v1.multus-cni.io/default-network": "special"}
    pod.write_text(yaml.safe_dump(obj))
    ns = netns_factory()
    assert scenario.add("c1", ns).rc == 0
    assert sorted(links_in(ns)) == ["eth0", "lo"]
    assert subnet_of(ns, "eth0") == str(special.network_address).rsplit(".", 1)[0]
    assert scenario.status()[0]["name"] == "kube-system/special" and scenario.status()[0]["default"] is True
    assert scenario.delete("c1", ns).rc == 0
    scenario.assert_nothing_left("c1", ns)


def test_cluster_network_that_resolves_nowhere_is_a_config_error(scenario: Scenario,
                                                                 netns_factory: Callable[[], str]) -> None:
    scenario.add_pod(None)
    ns = netns_factory()
    r = scenario.add("c1", ns, clusterNetwork="nowhere")
    assert r.rc == 1
    err = r.json
    assert err["code"] == 7 and "clusterNetwork" in err["msg"] and "nowhere" in err["msg"]
    scenario.assert_nothing_left("c1", ns)
