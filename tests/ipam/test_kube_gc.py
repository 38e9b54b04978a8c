"""The daemon's meta-ipam garbage collector (meta/daemon/ipamgc.py) against a real kube-apiserver v1.20.2 + etcd:
one round frees exactly what pods that no longer exist hold (deleted, never created, recreated under another
UID) and nothing else; a stopped API server or a token that may not read pods frees nothing, and the round
after the API is back frees; a node process SIGKILLed in the middle of its allocations, then GC: no address
leaks, none is held twice.

Pods are created in the API (they stay Pending: no scheduler, no kubelet) in namespace mcig-gc, bound to nodes
named mcig-…; pools in 10.232.96.0/22."""
from __future__ import annotations

import contextlib
import ipaddress
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes
import pytest

from meta.daemon import ipamgc
from meta.daemon.metrics import Metrics
from meta.ipam import config
from meta.ipam.allocator import Allocator
from meta.ipam.kubestore import KubeStore
from meta.ipam.store import BLOCK, POOL
from meta.sources.kube import KubeSource
from tests.daemon.conftest import metric
from tests.infra.kube_cluster import KubeCluster
from tests.kube.test_source import create_pod, delete_pod
from test_kube_allocation import run_nodes, stored  # tests/ipam is not a package: its directory is on sys.path

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"  # meta-ipam's, and the NADs' (the daemon's watch caches list NADs too)
NS = "mcig-gc"
NETWORK = "mcig-net"
# A node process needs ~1-3 s to start (imports) and, on a loaded machine, much longer for its work.
DEADLINE = 300.0


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.apply(CRDS)
    kube_cluster.ensure_namespace(NS)
    return kube_cluster


@pytest.fixture
def pool(store: KubeStore) -> Iterator[str]:
    """A fresh pool name; its objects are deleted afterwards (every list of IPBlocks reads them all)."""
    name = f"mcig-{uuid.uuid4().hex[:8]}"
    yield name
    for kind in (BLOCK, POOL):
        for obj in store.list(kind, name):
            store.delete(obj)


@pytest.fixture
def pods(cluster: KubeCluster) -> Iterator[Callable[..., dict[str, Any]]]:
    """`pods(name, node=...)`: a pod created in namespace mcig-gc; what is left is deleted afterwards."""
    made: list[str] = []

    def make(name: str, node: str | None = None) -> dict[str, Any]:
        made.append(name)
        return create_pod(cluster, NS, name, node=node)

    yield make
    for name in made:
        delete_pod(cluster, NS, name)


@pytest.fixture
def node() -> str:
    return f"mcig-n-{uuid.uuid4().hex[:8]}"


def uid_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["uid"])


def owner(cid: str, name: str, uid: str) -> config.Owner:
    return config.Owner(cid, "net1", NS, name, uid, NETWORK)


def entries(store: KubeStore, pool: str) -> dict[str, dict[str, Any]]:
    """Every allocation of the pool by address; none may be held twice."""
    found = stored(store, pool)
    assert all(len(v) == 1 for v in found.values()), found
    return {ip: v[0] for ip, v in found.items()}


def by_container(store: KubeStore, pool: str) -> dict[str, tuple[str, bool]]:
    """containerID -> (node, released)."""
    return {e["containerID"]: (e["node"], e["released"]) for e in entries(store, pool).values()}


def watching(cluster: KubeCluster, node: str) -> KubeSource:
    """The daemon's pod lookup: watch caches of `node`'s pods (and NADs), synced."""
    src = KubeSource.watching(str(cluster.kubeconfig), node, 10.0)
    deadline = time.monotonic() + DEADLINE
    while not src.ready():
        assert time.monotonic() < deadline, "watch caches never synced"
        time.sleep(0.05)
    return src


def collector(cluster: KubeCluster, node: str, lookup: ipamgc.PodLookup, token: str | None = None,
              timeout: float = 10.0, metrics: Metrics | None = None) -> ipamgc.IpamCollector:
    return ipamgc.IpamCollector(
        node, lambda: KubeStore.from_token(cluster.host, token or cluster.token, str(cluster.ca_file), timeout),
        lambda: lookup, metrics or Metrics())


def spec(pool: str, cidr: str) -> config.PoolSpec:
    return config.parse({"type": "meta-ipam", "range": cidr, "network_name": pool, "sticky": True}, NETWORK).pool


def test_one_round_frees_exactly_what_gone_pods_hold(cluster: KubeCluster, store: KubeStore, pool: str,
                                                     pods: Callable[..., dict[str, Any]], node: str) -> None:
    p = spec(pool, "10.232.96.0/26")
    a = Allocator(store, node)
    live = pods("live", node)                      # on this node: judged from the watch cache
    elsewhere = pods("moved")                      # not bound to the node: judged by a GET
    deleted = pods("deleted", node)
    old = pods("renamed", node)
    a.allocate(p, owner("c-live", "live", uid_of(live)))
    a.allocate(p, owner("c-moved", "moved", uid_of(elsewhere)))
    a.allocate(p, owner("c-deleted", "deleted", uid_of(deleted)))
    a.allocate(p, owner("c-renamed", "renamed", uid_of(old)))
    a.allocate(p, owner("c-never", "never", str(uuid.uuid4())))
    a.allocate(p, owner("c-web", "web-0", str(uuid.uuid4())), claim=f"{NS}/web-0")  # sticky, pod gone
    a.allocate(p, config.Owner("c-nopod", "net1", network=NETWORK))  # cnitool: no pod to ask about
    Allocator(store, "mcig-other").allocate(p, owner("c-far", "far", str(uuid.uuid4())))  # another node's
    delete_pod(cluster, NS, "deleted")
    delete_pod(cluster, NS, "renamed")
    new = pods("renamed", node)  # a namesake: another UID
    assert uid_of(new) != uid_of(old)
    src = watching(cluster, node)
    try:
        m = Metrics()
        done = collector(cluster, node, src, metrics=m).run_once()
        assert done.result == ipamgc.OK, done.error
        assert sorted((h.container_id, h.outcome) for h in done.freed) == [
            ("c-deleted", "freed"), ("c-never", "freed"), ("c-renamed", "freed"), ("c-web", "released")]
        assert by_container(store, pool) == {"c-live": (node, False), "c-moved": (node, False), "c-web": (node, True),
                                             "c-nopod": (node, False), "c-far": ("mcig-other", False)}
        assert metric(m.render().decode(), "meta_cni_ipam_gc_freed_addresses_total") == 3
        # Nothing more to free; the freed addresses are allocatable again, the released one only for its claim.
        assert collector(cluster, node, src).run_once().freed == ()
        got = a.allocate(p, owner("c-web2", "web-0", str(uuid.uuid4())), claim=f"{NS}/web-0")
        web = next(ip for ip, e in entries(store, pool).items() if e["containerID"] == "c-web2")
        assert str(got[0].address) == web
    finally:
        src.close()


def test_nothing_is_freed_while_the_api_cannot_be_read(cluster: KubeCluster, store: KubeStore, pool: str,
                                                      pods: Callable[..., dict[str, Any]], node: str) -> None:
    p = spec(pool, "10.232.97.0/26")
    a = Allocator(store, node)
    gone = pods("gone", node)
    live = pods("alive", node)
    a.allocate(p, owner("c-gone", "gone", uid_of(gone)))
    a.allocate(p, owner("c-alive", "alive", uid_of(live)))
    delete_pod(cluster, NS, "gone")
    before = entries(store, pool)
    src = watching(cluster, node)
    m = Metrics()
    gc = collector(cluster, node, src, timeout=2.0, metrics=m)
    try:
        cluster.stop_apiserver()
        try:
            down = gc.run_once()
        finally:
            cluster.start_apiserver()
        assert (down.result, down.freed) == (ipamgc.API_UNREADABLE, ())
        assert "did not answer" in down.error, down.error
        assert entries(store, pool) == before
        # A token that may read and write the blocks but not read pods: no pod can be judged.
        with _token_without_pods(cluster) as no_pods:
            lookup = KubeSource(_transport(cluster, no_pods), 5.0, "the token without pods")
            forbidden = collector(cluster, node, lookup, token=no_pods, metrics=m).run_once()
        assert (forbidden.result, forbidden.freed) == (ipamgc.API_UNREADABLE, ()), forbidden
        assert "403 Forbidden" in forbidden.error and "get pods" in forbidden.error, forbidden.error
        assert entries(store, pool) == before
        text = m.render().decode()
        assert metric(text, "meta_cni_ipam_gc_rounds_total", result="api-unreadable") == 2
        assert metric(text, "meta_cni_ipam_gc_last_success_timestamp_seconds") == 0
        # Back: the next round frees the gone pod's address, and only it.
        back = gc.run_once()
        assert back.result == ipamgc.OK and [h.container_id for h in back.freed] == ["c-gone"]
        assert by_container(store, pool) == {"c-alive": (node, False)}
        assert metric(m.render().decode(), "meta_cni_ipam_gc_last_success_timestamp_seconds") > 0
    finally:
        src.close()


def _transport(cluster: KubeCluster, token: str) -> Any:
    from meta.sources.kube import UrllibTransport

    return UrllibTransport(cluster.configuration(token))


@contextlib.contextmanager
def _token_without_pods(cluster: KubeCluster) -> Iterator[str]:
    """The plain user's token, granted (for the block only: other tests rely on that user having no rights)
    what the collector needs on IPBlocks and IPPools, and nothing on pods."""
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api_client())
    name = f"mcig-ipam-only-{uuid.uuid4().hex[:6]}"
    rbac.create_cluster_role(cast(Any, {"metadata": {"name": name}, "rules": [
        {"apiGroups": ["ipam.meta-cni.dev"], "resources": ["ipblocks", "ippools"],
         "verbs": ["get", "list", "update", "delete"]}]}))
    try:
        rbac.create_cluster_role_binding(cast(Any, {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "User", "name": cluster.user_name, "apiGroup": "rbac.authorization.k8s.io"}]}))
        try:
            yield cluster.user_token
        finally:
            rbac.delete_cluster_role_binding(name)
    finally:
        rbac.delete_cluster_role(name)


def test_a_node_killed_mid_allocation_then_gc_leaves_no_leak_and_no_duplicate(
        cluster: KubeCluster, store: KubeStore, pool: str, pods: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    """A node process allocating for its pods is SIGKILLed half-way while another node keeps allocating. The
    dead node's pods are then deleted, as when a node dies (no DEL ever comes), except those it had answered
    before the kill and whose pods stay. One GC round on the dead node frees every address of a deleted pod
    (the one in flight included, if its write landed) and nothing of a live pod; no address is held twice,
    and the freed addresses are handed out again without a duplicate."""
    ipam = {"type": "meta-ipam", "range": "10.232.98.0/24", "block_size": {"4": 27}, "network_name": pool}
    victim, other = f"mcig-v-{uuid.uuid4().hex[:6]}", f"mcig-o-{uuid.uuid4().hex[:6]}"
    owners: dict[str, list[dict[str, Any]]] = {}
    for node, prefix, count in ((victim, "v", 30), (other, "o", 15)):
        owners[node] = []
        for k in range(count):
            pod = pods(f"{prefix}{k:02d}", node)
            owners[node].append({"cid": uuid.uuid4().hex * 2, "ifname": "net1", "ns": NS, "name": f"{prefix}{k:02d}",
                                 "uid": uid_of(pod)})
    nodes = run_nodes(cluster, tmp_path, NETWORK, ipam, owners, pause=0.05, wait=False)
    dead = next(n for n in nodes if n.name == victim)
    deadline = time.monotonic() + DEADLINE
    while len(dead.lines) < 10 and dead.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(timeout=30)
    assert dead.proc.returncode == -signal.SIGKILL and 10 <= len(dead.lines) < 30
    for n in nodes:
        if n is not dead:
            n.wait()
    answered = {m["ok"]: m["ips"] for n in nodes for m in n.lines if "ok" in m}
    assert [m for n in nodes for m in n.lines if "err" in m] == []
    # The node died: its pods without an answer are deleted, and so are its first 5 answered ones (deleted
    # while it was down, so their DEL never came). Its other answered pods stay.
    mine = owners[victim]
    answered_mine = [o for o in mine if o["cid"] in answered]
    deleted = answered_mine[:5] + [o for o in mine if o["cid"] not in answered]
    for o in deleted:
        delete_pod(cluster, NS, o["name"])
    stored_before = entries(store, pool)
    in_flight = [ip for ip, e in stored_before.items() if e["node"] == victim and e["containerID"] not in answered]
    assert len(in_flight) <= 1  # the allocation cut short holds one address or none, never half of one

    src = KubeSource.from_kubeconfig(str(cluster.kubeconfig), 10.0)  # thin: every pod judged by a GET
    done = collector(cluster, victim, src).run_once()
    assert done.result == ipamgc.OK, done.error
    deleted_cids = {o["cid"] for o in deleted}
    assert sorted(h.ip for h in done.freed) == sorted(
        ip for ip, e in stored_before.items() if e["containerID"] in deleted_cids)
    assert len(done.freed) in (5, 6)
    after = entries(store, pool)
    # No leak: every address left belongs to a live pod that was answered; no duplicate anywhere.
    assert {e["containerID"] for e in after.values()} == set(answered) - deleted_cids
    for cid, ips in answered.items():
        if cid not in deleted_cids:
            assert all(after[ip]["containerID"] == cid for ip in ips)
    # The survivor node takes over the deleted pods' work: the freed addresses may come back, never twice.
    again = [{"cid": uuid.uuid4().hex * 2, "ifname": "net1", "ns": NS, "name": f"r{k:02d}", "uid": str(uuid.uuid4())}
             for k in range(len(deleted))]
    (rerun,) = run_nodes(cluster, tmp_path, NETWORK, ipam, {other: again})
    assert [m for m in rerun.lines if "err" in m] == [] and len(rerun.lines) == len(again)
    final = entries(store, pool)
    counts = Counter(ip for m in rerun.lines for ip in m["ips"])
    assert all(c == 1 for c in counts.values()) and all(ip in final for ip in counts)
    assert len(final) == len(after) + len(again)
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.232.98.0/24") for ip in final)
