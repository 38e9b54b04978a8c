"""`metactl daemon` runs meta-ipam's garbage collector on its own: with --kubeconfig and a short
--ipam-gc-interval it frees, round after round, the addresses of this node's pods that are gone from the API,
keeps the live pods' ones, and says so in its metrics and logs."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meta.ipam import config
from meta.ipam.allocator import Allocator
from meta.ipam.kubestore import KubeStore
from meta.ipam.store import BLOCK, POOL
from tests.daemon.conftest import START_BUDGET, Daemon, DaemonScenario, metric
from tests.infra.kube_cluster import KubeCluster
from tests.kube.test_source import create_pod, delete_pod, unique

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]
CRDS = Path(__file__).resolve().parents[2] / "crds"
NS = "mcig-daemon"


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.apply(CRDS)
    kube_cluster.ensure_namespace(NS)
    return kube_cluster


def held(store: KubeStore, pool: str) -> dict[str, dict[str, Any]]:
    return {ip: e for b in store.list(BLOCK, pool) for ip, e in b.data["allocations"].items()}


def test_the_daemon_frees_the_addresses_of_gone_pods_on_its_own(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                                 cluster: KubeCluster) -> None:
    node, pool = unique("mcig-dn"), f"mcig-{uuid.uuid4().hex[:8]}"
    store = KubeStore.from_token(cluster.host, cluster.token, str(cluster.ca_file), 30.0)
    spec = config.parse({"type": "meta-ipam", "range": "10.232.99.0/26", "network_name": pool}, "mcig-dnet").pool
    allocator = Allocator(store, node)
    live = create_pod(cluster, NS, unique("live"), node=node)
    gone = create_pod(cluster, NS, unique("gone"), node=node)
    pods = {"live": live, "gone": gone}
    try:
        for tag, pod in pods.items():
            meta = pod["metadata"]
            allocator.allocate(spec, config.Owner(f"c-{tag}", "net1", NS, meta["name"], meta["uid"], "mcig-dnet"))
        d = daemon("--kubeconfig", str(cluster.kubeconfig), "--node-name", node, "--ipam-gc-interval", "1")
        delete_pod(cluster, NS, gone["metadata"]["name"])
        deadline = time.monotonic() + START_BUDGET
        while any(e["containerID"] == "c-gone" for e in held(store, pool).values()):
            assert d.running and time.monotonic() < deadline, f"the gone pod's address was never freed:\n{d.log_text()}"
            time.sleep(0.2)
        assert [e["containerID"] for e in held(store, pool).values()] == ["c-live"]
        m = d.metrics()
        assert metric(m, "meta_cni_ipam_gc_freed_addresses_total") == 1
        assert metric(m, "meta_cni_ipam_gc_rounds_total", result="ok") >= 1
        assert metric(m, "meta_cni_ipam_gc_last_success_timestamp_seconds") > 0
        freed = [e for e in d.log_lines() if e.get("msg", "").startswith("ipam gc: freed")]
        assert [(e["pool"], e["node"]) for e in freed] == [(pool, node)]
        assert gone["metadata"]["uid"] in freed[0]["owner"]
        # It keeps going: another round ends without freeing the live pod's address.
        rounds = metric(m, "meta_cni_ipam_gc_rounds_total", result="ok")
        while metric(d.metrics(), "meta_cni_ipam_gc_rounds_total", result="ok") <= rounds:
            assert d.running and time.monotonic() < deadline, d.log_text()
            time.sleep(0.2)
        assert [e["containerID"] for e in held(store, pool).values()] == ["c-live"]
        assert d.stop() == 0  # the collector thread ends with the daemon
    finally:
        delete_pod(cluster, NS, live["metadata"]["name"])
        for kind in (BLOCK, POOL):
            for obj in store.list(kind, pool):
                store.delete(obj)
        store.close()
