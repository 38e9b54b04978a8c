"""The daemon with a watching KubeSource against a real kube-apiserver: /readyz waits for the watch caches,
pods and NADs come from the API, the network-status lands on the pod object."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import links_in
from tests.daemon.conftest import START_BUDGET, Daemon, DaemonScenario, metric, run_thick
from tests.infra.kube_cluster import KubeCluster
from tests.kube.test_source import create_nad, create_pod, delete_pod, pod_annotations, unique

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]
CRDS = Path(__file__).resolve().parents[2] / "crds"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.apply(CRDS)
    return kube_cluster


def test_not_ready_while_the_api_is_unreachable(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                cluster: KubeCluster, netns_factory: Callable[[], str],
                                                tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    dead = cluster.kubeconfig_for(cluster.token, tmp_path / "dead.kubeconfig")
    dead.write_text(dead.read_text().replace(cluster.configuration().host, f"https://127.0.0.1:{port}"))
    d = daemon("--kubeconfig", str(dead), "--node-name", "n1", "--api-timeout", "1", start=False)
    d.start(wait_ready=False)
    # "not started" just after start-up (the socket serves before the watches are set up), then "not synced"
    # for as long as the API cannot be listed.
    end = time.monotonic() + START_BUDGET
    while True:
        status, body = d.get("/readyz")
        reasons = json.loads(body)["reasons"]
        assert status == 503 and any("watch" in r for r in reasons), body
        if any("not synced" in r for r in reasons) or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert any("not synced" in r for r in reasons), reasons
    assert metric(d.metrics(), "meta_cni_ready") == 0

    sc = dsc
    sc.write_primary()
    ns = netns_factory()
    c = f"mcdm-{uuid.uuid4().hex[:12]}"
    r = run_thick(sc, "ADD", c, ns, config=sc.thick(kubeconfig=str(dead)))
    assert r.rc == 1 and json.loads(r.stdout)["code"] == 11, r.stdout
    assert sorted(links_in(ns)) == ["lo"] and not sc.cache_path(c).exists()


def test_watching_source_end_to_end(dsc: DaemonScenario, daemon: Callable[..., Daemon], cluster: KubeCluster,
                                    netns_factory: Callable[[], str]) -> None:
    sc = dsc
    node, namespace = unique("mcdm-node"), unique("mcdm")
    cluster.ensure_namespace(namespace)
    sc.write_primary()
    sec, mv = sc.subnet(), sc.subnet()
    create_nad(cluster, namespace, "sec", {"cniVersion": "1.0.0", "name": "sec", "type": "meta-bridge",
                                           "bridge": sc.bridge_name(), "ipam": sc.ipam(sec)})
    create_nad(cluster, namespace, "mv", {"cniVersion": "1.0.0", "name": "mv", "type": "meta-macvlan",
                                          "master": sc.master(), "mode": "bridge", "ipam": sc.ipam(mv)})
    pod: dict[str, Any] = create_pod(cluster, namespace, "p1", {"k8s.v1.cni.cncf.io/networks": "sec,mv"}, node=node)

    d = daemon("--kubeconfig", str(cluster.kubeconfig), "--node-name", node)  # ready: the watches synced
    m = d.metrics()
    assert metric(m, "meta_cni_ready") == 1
    assert "meta_cni_source_cache_age_seconds{cache=\"pods\",source=\"kube\"}" in m
    assert "meta_cni_source_cache_age_seconds{cache=\"nads\",source=\"kube\"}" in m

    config = sc.thick(kubeconfig=str(cluster.kubeconfig))
    args = sc.pod_args("p1", namespace, pod["metadata"]["uid"])
    ns, c = netns_factory(), f"mcdm-{uuid.uuid4().hex[:12]}"
    r = run_thick(sc, "ADD", c, ns, config=config, cni_args=args)
    assert r.rc == 0, r.stdout + r.stderr
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"]
    status = json.loads(pod_annotations(cluster, namespace, "p1")[NETWORK_STATUS])
    assert [(e["name"], e["interface"]) for e in status] == [
        ("primary", "eth0"), (f"{namespace}/sec", "net1"), (f"{namespace}/mv", "net2")]
    assert run_thick(sc, "DEL", c, ns, config=config, cni_args=args).rc == 0
    assert sorted(links_in(ns)) == ["lo"] and sc.reserved_ips() == [] and not sc.cache_path(c).exists()
    assert NETWORK_STATUS not in pod_annotations(cluster, namespace, "p1")
    delete_pod(cluster, namespace, "p1")
    assert d.stop() == 0
