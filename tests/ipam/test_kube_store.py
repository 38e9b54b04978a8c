"""The IPAM store against a real kube-apiserver v1.20.2 + etcd: the meta-ipam CRDs (structural, printer
columns, object size of full blocks), a conformance suite of the Store protocol run over KubeStore and
FileStore alike, and KubeStore's behaviour when the API is slow, down, restarted, or refuses the caller."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta.cni.errors import INTERNAL, INVALID_CONFIG, CNIError
from meta.ipam import admin
from meta.ipam.filestore import FileStore
from meta.ipam.kubestore import NODE_LABEL, POOL_LABEL, KubeStore, label_value
from meta.ipam.store import BLOCK, POOL, Conflict, Store, Unavailable, Versioned
from meta.sources.kube import Action
from tests.infra.kube_cluster import KubeCluster

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "meta-ipam.yaml"
GROUP, VERSION = "ipam.meta-cni.dev", "v1alpha1"
# etcd's default request limit (--max-request-bytes); an object must stay far below it.
ETCD_LIMIT = int(1.5 * 1024 * 1024)


# --- helpers (test_kube_allocation.py has its own: test modules here are not a package) ----------------

def kube_store(cluster: KubeCluster, timeout: float = 5.0, token: str | None = None) -> KubeStore:
    return KubeStore.from_token(cluster.host, token or cluster.token, str(cluster.ca_file), timeout)


def http(cluster: KubeCluster, path: str, accept: str = "application/json") -> tuple[int, bytes]:
    """A raw GET as the admin: the exact bytes the API server sends."""
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    req = urllib.request.Request(cluster.host + path, headers={"Authorization": f"Bearer {cluster.token}",
                                                               "Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def etcd_value(cluster: KubeCluster, key: str) -> bytes:
    """The bytes etcd holds under `key` (what counts against etcd's request and database limits)."""
    p = subprocess.run(["etcdctl", f"--endpoints={cluster.etcd_url}", "get", key, "--print-value-only"],
                       capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, check=True, timeout=30)
    return p.stdout.rstrip(b"\n")


def owner(i: int, node: str = "worker-017.eu-west-1.compute.internal") -> dict[str, Any]:
    """A realistic owner record: a 64-hex container ID, a Deployment pod's name, a UID, a long node name."""
    return {"containerID": uuid.UUID(int=i).hex * 2, "ifname": "net1", "podNamespace": "payments-production-eu",
            "podName": f"payments-api-backend-7f9c8d6b5-{i:05x}", "podUID": str(uuid.UUID(int=i + 1)),
            "network": "payments-macvlan", "node": node, "static": False, "claim": None, "released": False}


def block(pool: str, cidr: str, node: str = "", full: bool = False) -> dict[str, Any]:
    net = ipaddress.ip_network(cidr)
    allocations = {str(ip): owner(i, node or "n0") for i, ip in enumerate(net)} if full else {}
    return {"pool": pool, "cidr": cidr, "node": node, "used": len(allocations), "allocations": allocations}


def pool_data(pool: str) -> dict[str, Any]:
    return {"pool": pool, "ranges": ["10.1.0.0/16", "fd00:1::/112"], "blockPrefix": {"4": 26, "6": 122}}


def unique(prefix: str = "net") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- fixtures -------------------------------------------------------------------------------------------

def delete_all(cluster: KubeCluster) -> None:
    """Remove every IPPool and IPBlock: a consistent LIST costs the API server time for every object of
    the resource in etcd (whatever the label selector), so later tests must not pay for these."""
    s = kube_store(cluster, timeout=30.0)
    for plural in ("ipblocks", "ippools"):
        s.api.call("DELETE", f"/apis/{GROUP}/{VERSION}/{plural}", Action("deletecollection", plural, None, plural))
    s.close()


@pytest.fixture(scope="module")
def ipam_crds(kube_cluster: KubeCluster) -> Iterator[list[dict[str, Any]]]:
    """The two CRDs of crds/meta-ipam.yaml, Established on the session's API server."""
    crds = kube_cluster.apply(CRD_FILE)
    yield crds
    delete_all(kube_cluster)


@pytest.fixture
def cluster(kube_cluster: KubeCluster, ipam_crds: list[dict[str, Any]]) -> KubeCluster:
    return kube_cluster


@pytest.fixture(params=["kube", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each store in turn: the protocol promises the allocator the same behaviour from both."""
    if request.param == "kube":
        s = kube_store(request.getfixturevalue("cluster"))
        yield s
        s.close()
    else:
        yield FileStore(tmp_path / "ipam")


@pytest.fixture
def pool() -> str:
    """A network name of its own per test: objects are cluster-wide and the session's server is shared."""
    return unique()


# --- the Store protocol, for every store ----------------------------------------------------------------

def test_create_then_get(store: Store, pool: str) -> None:
    made = store.create(BLOCK, f"{pool}-0a010000", block(pool, "10.1.0.0/26", "n1"))
    assert made.kind == BLOCK and made.name == f"{pool}-0a010000" and made.version
    assert made.data == block(pool, "10.1.0.0/26", "n1")
    got = store.get(BLOCK, made.name)
    assert got == made and got is not None and got.data == made.data


def test_get_of_a_missing_object_is_none(store: Store, pool: str) -> None:
    assert store.get(BLOCK, f"{pool}-nothing") is None
    assert store.get(POOL, pool) is None


def test_create_of_an_existing_object_conflicts_and_keeps_the_first(store: Store, pool: str) -> None:
    first = store.create(POOL, pool, pool_data(pool))
    with pytest.raises(Conflict):
        store.create(POOL, pool, {**pool_data(pool), "ranges": ["10.9.0.0/16"]})
    got = store.get(POOL, pool)
    assert got is not None and got.version == first.version and got.data == pool_data(pool)


def test_kinds_do_not_share_names(store: Store, pool: str) -> None:
    store.create(POOL, pool, pool_data(pool))
    store.create(BLOCK, pool, block(pool, "10.1.0.0/26"))
    assert store.get(POOL, pool).data == pool_data(pool)  # type: ignore[union-attr]
    assert store.get(BLOCK, pool).data == block(pool, "10.1.0.0/26")  # type: ignore[union-attr]
    assert [v.name for v in store.list(POOL, pool)] == [pool]


def test_list_by_pool_and_by_node(store: Store, pool: str) -> None:
    other = unique()
    store.create(POOL, pool, pool_data(pool))
    made = {name: store.create(BLOCK, name, block(p, cidr, node)) for name, p, cidr, node in [
        (f"{pool}-a", pool, "10.1.0.0/26", "n1"), (f"{pool}-b", pool, "10.1.0.64/26", "n2"),
        (f"{pool}-c", pool, "10.1.0.128/26", ""), (f"{pool}-d", pool, "fd00:1::/122", "n1"),
        (f"{other}-a", other, "10.1.0.0/26", "n1")]}

    def names(found: list[Versioned]) -> list[str]:
        assert all(v.kind == BLOCK for v in found)
        return sorted(v.name for v in found)

    assert names(store.list(BLOCK, pool)) == [f"{pool}-a", f"{pool}-b", f"{pool}-c", f"{pool}-d"]
    assert names(store.list(BLOCK, pool, "n1")) == [f"{pool}-a", f"{pool}-d"]
    assert names(store.list(BLOCK, pool, "n2")) == [f"{pool}-b"]
    assert names(store.list(BLOCK, pool, "")) == [f"{pool}-c"]  # unleased blocks
    assert store.list(BLOCK, pool, "n3") == []
    assert names(store.list(BLOCK, other)) == [f"{other}-a"]
    assert [v.name for v in store.list(POOL, pool)] == [pool] and store.list(POOL, other) == []
    # What a list returns can be written: it carries the current version.
    (listed,) = store.list(BLOCK, pool, "n2")
    assert listed == made[f"{pool}-b"] and listed.data == made[f"{pool}-b"].data
    store.update(listed, {**listed.data, "used": 1})


def test_an_update_moves_a_block_between_node_lists(store: Store, pool: str) -> None:
    b = store.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26", ""))
    b = store.update(b, {**b.data, "node": "n1"})
    assert [v.name for v in store.list(BLOCK, pool, "n1")] == [b.name] and store.list(BLOCK, pool, "") == []
    b = store.update(b, {**b.data, "node": "n2"})
    assert store.list(BLOCK, pool, "n1") == [] and [v.name for v in store.list(BLOCK, pool, "n2")] == [b.name]


def test_update_needs_the_current_version(store: Store, pool: str) -> None:
    v1 = store.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26", "n1"))
    data = block(pool, "10.1.0.0/26", "n1")
    data["allocations"]["10.1.0.5"] = owner(5, "n1")
    data["used"] = 1
    v2 = store.update(v1, data)
    assert v2.version != v1.version and v2.data == data
    assert store.get(BLOCK, v1.name) == v2
    with pytest.raises(Conflict):
        store.update(v1, block(pool, "10.1.0.0/26", "n9"))  # stale: someone wrote since v1
    got = store.get(BLOCK, v1.name)
    assert got is not None and got.version == v2.version and got.data == data  # the loser wrote nothing


def test_update_of_a_deleted_object_conflicts(store: Store, pool: str) -> None:
    v1 = store.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26"))
    store.delete(v1)
    with pytest.raises(Conflict):
        store.update(v1, block(pool, "10.1.0.0/26", "n1"))
    assert store.get(BLOCK, v1.name) is None  # not re-created by the update


def test_delete_needs_the_current_version_and_tolerates_gone_objects(store: Store, pool: str) -> None:
    v1 = store.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26"))
    v2 = store.update(v1, {**v1.data, "node": "n1"})
    with pytest.raises(Conflict):
        store.delete(v1)
    assert store.get(BLOCK, v1.name) == v2
    store.delete(v2)
    assert store.get(BLOCK, v1.name) is None and store.list(BLOCK, pool) == []
    store.delete(v2)  # gone already: nothing happens
    again = store.create(BLOCK, v1.name, block(pool, "10.1.0.0/26"))  # the name is free again
    with pytest.raises(Conflict):
        store.delete(v2)  # an old version of a deleted object never deletes its successor
    assert store.get(BLOCK, v1.name) == again


def test_a_full_block_round_trips_exactly(store: Store, pool: str) -> None:
    data = block(pool, "fd00:1::40/122", "n1", full=True)
    data["allocations"]["fd00:1::41"].update(static=True, claim="ns1/claim-1", released=True)
    made = store.create(BLOCK, f"{pool}-fd000001", data)
    got = store.get(BLOCK, made.name)
    assert got is not None and got.data == data and got.data["used"] == 64
    assert got.data["allocations"]["fd00:1::40"]["claim"] is None


def test_pools_whose_names_are_no_label_values_stay_apart(store: Store) -> None:
    odd = f"my net/{uuid.uuid4().hex[:6]}:x"
    lookalike = label_value(odd)  # a real network name equal to the other's label value
    long = "n" * 80 + uuid.uuid4().hex[:6]
    for i, p in enumerate((odd, lookalike, long)):
        store.create(BLOCK, f"{unique('odd')}-{i}", block(p, "10.1.0.0/26", long))
    for p in (odd, lookalike, long):
        found = store.list(BLOCK, p)
        assert [v.data["pool"] for v in found] == [p]
        assert [v.data["pool"] for v in store.list(BLOCK, p, long)] == [p] and store.list(BLOCK, p, "") == []


def test_concurrent_read_modify_write_loses_no_update(store: Store, pool: str) -> None:
    """Writers that re-read on Conflict: every increment lands once, however they interleave."""
    name = f"{pool}-counter"
    store.create(BLOCK, name, block(pool, "10.1.0.0/26"))
    threads, rounds = 4, 10
    conflicts: list[int] = []

    def writer(t: int) -> None:
        lost = 0
        for r in range(rounds):
            while True:
                cur = store.get(BLOCK, name)
                assert cur is not None
                data = json.loads(json.dumps(cur.data))
                data["used"] += 1
                data["allocations"][f"10.1.0.{t * rounds + r}"] = owner(t * rounds + r)
                try:
                    store.update(cur, data)
                    break
                except Conflict:
                    lost += 1
        conflicts.append(lost)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    final = store.get(BLOCK, name)
    assert final is not None and final.data["used"] == threads * rounds
    assert len(final.data["allocations"]) == threads * rounds and len(conflicts) == threads


def test_metactl_ipam_pools_enumerates_pools_over_the_cluster_store(cluster: KubeCluster, pool: str) -> None:
    """admin.pools without a pool name needs list_all, which KubeStore has beside the protocol."""
    s = kube_store(cluster)
    s.create(POOL, pool, pool_data(pool))
    s.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26", "n1", full=True))
    assert pool in [v.data["pool"] for v in s.list_all(POOL)]
    assert f"{pool}-a" in [v.name for v in s.list_all(BLOCK)]
    line = next(x for x in admin.pools(s).splitlines() if x.startswith(pool))
    assert line.split()[:2] == [pool, "10.1.0.0/16;"] and "n1=1" in line


# --- the CRDs -------------------------------------------------------------------------------------------

def test_crds_are_established_structural_and_cluster_scoped(ipam_crds: list[dict[str, Any]]) -> None:
    by_name = {c["metadata"]["name"]: c for c in ipam_crds}
    assert set(by_name) == {f"ippools.{GROUP}", f"ipblocks.{GROUP}"}
    for name, kind, short in ((f"ippools.{GROUP}", "IPPool", "mipool"), (f"ipblocks.{GROUP}", "IPBlock", "miblock")):
        crd = by_name[name]
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
        assert "NonStructuralSchema" not in conditions
        assert crd["spec"]["scope"] == "Cluster"
        accepted = crd["status"]["acceptedNames"]
        assert (accepted["kind"], accepted["shortNames"], accepted["categories"]) == (kind, [short], ["meta-ipam"])
        (version,) = crd["spec"]["versions"]
        assert version["name"] == VERSION and version["storage"]
        # Unknown fields are pruned, nowhere preserved: the schema is the data contract.
        assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(version["schema"])


def test_printer_columns_show_pool_cidr_node_and_used(cluster: KubeCluster, pool: str) -> None:
    s = kube_store(cluster)
    s.create(BLOCK, f"{pool}-0a010040", block(pool, "10.1.0.64/26", "node-7", full=True))
    s.create(POOL, pool, pool_data(pool))
    table_type = "application/json;as=Table;v=v1;g=meta.k8s.io"
    code, body = http(cluster, f"/apis/{GROUP}/{VERSION}/ipblocks/{pool}-0a010040", accept=table_type)
    assert code == 200, body
    table = json.loads(body)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == ["Name", "Pool", "CIDR", "Node", "Used", "Age"]
    assert table["rows"][0]["cells"][:5] == [f"{pool}-0a010040", pool, "10.1.0.64/26", "node-7", 64]
    code, body = http(cluster, f"/apis/{GROUP}/{VERSION}/ippools/{pool}", accept=table_type)
    table = json.loads(body)
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Pool", "Ranges", "Age"]
    assert table["rows"][0]["cells"][1] == pool and "10.1.0.0/16" in table["rows"][0]["cells"][2]


def test_objects_carry_the_index_labels(cluster: KubeCluster, pool: str) -> None:
    s = kube_store(cluster)
    node = "node." + "x" * 70  # a valid node name longer than a label value may be
    s.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26", node))
    s.create(POOL, pool, pool_data(pool))
    _, body = http(cluster, f"/apis/{GROUP}/{VERSION}/ipblocks/{pool}-a")
    labels = json.loads(body)["metadata"]["labels"]
    assert labels == {POOL_LABEL: pool, NODE_LABEL: label_value(node)} and len(labels[NODE_LABEL]) <= 63
    _, body = http(cluster, f"/apis/{GROUP}/{VERSION}/ippools/{pool}")
    assert json.loads(body)["metadata"]["labels"] == {POOL_LABEL: pool}


@pytest.mark.parametrize("cidr", ["10.1.0.64/26", "fd00:1::40/122"])
def test_a_full_block_stays_far_below_the_etcd_limit(cluster: KubeCluster, pool: str, cidr: str) -> None:
    """64 allocations with realistic owners, written one by one as the allocator does (so that whatever
    the server adds per write is there): the object as served, and as etcd stores it."""
    s = kube_store(cluster)
    full = block(pool, cidr, "worker-017.eu-west-1.compute.internal", full=True)
    cur = s.create(BLOCK, f"{pool}-blk", {**full, "used": 0, "allocations": {}})
    for i, (ip, who) in enumerate(full["allocations"].items()):
        cur = s.update(cur, {**cur.data, "used": i + 1, "allocations": {**cur.data["allocations"], ip: who}})
    code, served = http(cluster, f"/apis/{GROUP}/{VERSION}/ipblocks/{pool}-blk")
    stored = etcd_value(cluster, f"/registry/{GROUP}/ipblocks/{pool}-blk")
    assert code == 200 and json.loads(served)["spec"] == full
    # Measured (kube-apiserver 1.20.2): 24,392 bytes served and 24,367 in etcd for the /26, 24,430 / 24,405
    # for the /122 (1.6 % of etcd's limit; ~380 bytes per allocation, the spec alone is 23.7 KB as compact
    # JSON). The spec is an atomic map, so managedFields is one 281-byte entry instead of one entry per
    # field of every allocation (which added 12 KB).
    assert 20_000 < len(stored) <= len(served) < 26 * 1024, (len(served), len(stored))
    assert len(served) < ETCD_LIMIT // 50
    managed = json.loads(served)["metadata"]["managedFields"]
    assert len(json.dumps(managed)) < 1024


def test_the_largest_block_allowed_fits_too(cluster: KubeCluster, pool: str) -> None:
    """meta.ipam.ranges allows blocks up to /22 (1024 addresses): full, it must still fit with room."""
    s = kube_store(cluster, timeout=30.0)
    full = block(pool, "10.4.0.0/22", "worker-017.eu-west-1.compute.internal", full=True)
    cur = s.create(BLOCK, f"{pool}-big", full)
    s.update(cur, {**cur.data, "node": "worker-018.eu-west-1.compute.internal"})
    stored = etcd_value(cluster, f"/registry/{GROUP}/ipblocks/{pool}-big")
    s.delete(s.get(BLOCK, f"{pool}-big"))  # type: ignore[arg-type]  # later LISTs would read it every time
    # Measured: 379,163 bytes in etcd, 24 % of its request limit.
    assert 300_000 < len(stored) < ETCD_LIMIT // 4, len(stored)


# --- the schema guards the data -------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(used="three"), "spec.used"),
    (lambda d: d.update(used=-1), "spec.used"),
    (lambda d: d.pop("cidr"), "spec.cidr"),
    (lambda d: d["allocations"]["10.1.0.1"].update(static="yes"), "static"),
    (lambda d: d["allocations"].update({"10.1.0.2": "c1"}), "allocations"),
])
def test_the_schema_refuses_malformed_blocks(cluster: KubeCluster, pool: str,
                                             change: Callable[[dict[str, Any]], Any], field: str) -> None:
    data = block(pool, "10.1.0.0/26", "n1")
    data["allocations"]["10.1.0.1"] = owner(1, "n1")
    change(data)
    with pytest.raises(CNIError) as e:
        kube_store(cluster).create(BLOCK, f"{pool}-bad", data)
    assert e.value.code == INTERNAL and "422" in e.value.msg and field in e.value.msg


def test_a_field_the_crd_does_not_know_fails_the_write_loudly(cluster: KubeCluster, pool: str) -> None:
    s = kube_store(cluster)
    data = {**block(pool, "10.1.0.0/26", "n1"), "leaseExpires": "2030-01-01T00:00:00Z"}
    with pytest.raises(CNIError) as e:
        s.create(BLOCK, f"{pool}-new", data)
    assert e.value.code == INTERNAL and "spec.leaseExpires" in e.value.msg and "crds/meta-ipam.yaml" in e.value.msg


# --- KubeStore: credentials, rights, slow and absent API servers ----------------------------------------

def test_from_kubeconfig(cluster: KubeCluster, pool: str, tmp_path: Path) -> None:
    s = KubeStore.from_kubeconfig(str(cluster.kubeconfig), 5.0)
    s.create(POOL, pool, pool_data(pool))
    assert [v.name for v in s.list(POOL, pool)] == [pool]
    with pytest.raises(CNIError) as e:
        KubeStore.from_kubeconfig(str(tmp_path / "missing"), 5.0)
    assert e.value.code == INVALID_CONFIG and "missing" in e.value.msg


def test_a_user_without_rights_gets_a_config_error_naming_the_right(cluster: KubeCluster, pool: str) -> None:
    s = kube_store(cluster, token=cluster.user_token)
    with pytest.raises(CNIError) as e:
        s.list(BLOCK, pool, "n1")
    assert e.value.code == INVALID_CONFIG and "list ipblocks.ipam.meta-cni.dev" in e.value.msg
    with pytest.raises(CNIError) as e:
        s.create(POOL, pool, pool_data(pool))
    assert e.value.code == INVALID_CONFIG and "create ippools.ipam.meta-cni.dev" in e.value.msg


# What meta-ipam needs, and nothing more: no watch (lists are consistent reads), no patch (writes are PUTs).
IPAM_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: meta-ipam-test}
rules:
  - apiGroups: [ipam.meta-cni.dev]
    resources: [ippools, ipblocks]
    verbs: [get, list, create, update, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: meta-ipam-test}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: meta-ipam-test}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: USER}
"""


def test_the_store_needs_get_list_create_update_delete_only(cluster: KubeCluster, pool: str) -> None:
    """The ClusterRole a node needs (samples/deploy should grant exactly this), proven with a real user."""
    import kubernetes.client

    cluster.apply(IPAM_RBAC.replace("USER", cluster.user_name))
    try:
        s = kube_store(cluster, token=cluster.user_token)
        deadline = time.monotonic() + 30
        while True:  # the authorizer's cache learns the binding a moment later
            try:
                s.get(POOL, pool)
                break
            except CNIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        p = s.create(POOL, pool, pool_data(pool))
        b = s.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26"))
        b = s.update(b, {**b.data, "node": "n1"})
        assert [v.name for v in s.list(BLOCK, pool, "n1")] == [b.name] and s.list_all(POOL)
        s.delete(b)
        s.delete(p)
        assert s.get(BLOCK, b.name) is None
    finally:
        rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api_client())
        rbac.delete_cluster_role_binding("meta-ipam-test")
        rbac.delete_cluster_role("meta-ipam-test")


def test_a_server_that_never_answers_is_unavailable() -> None:
    """Accepts connections (the kernel does, from the backlog) and never says a word: every call gives
    up after its budget with Unavailable, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        s = KubeStore.from_token(f"https://127.0.0.1:{silent.getsockname()[1]}", "token", None, timeout=1.0)
        for call in (lambda: s.get(BLOCK, "b"), lambda: s.list(BLOCK, "p", "n"),
                     lambda: s.create(BLOCK, "b", block("p", "10.1.0.0/26"))):
            with pytest.raises(Unavailable, match="timed out"):
                call()
        s.close()


def test_api_server_down_is_unavailable_and_back_up_works_again(cluster: KubeCluster, pool: str) -> None:
    s = kube_store(cluster, timeout=1.0)
    b = s.create(BLOCK, f"{pool}-a", block(pool, "10.1.0.0/26", "n1"))
    cluster.stop_apiserver()
    try:
        calls: list[Callable[[], Any]] = [
            lambda: s.get(BLOCK, b.name), lambda: s.list(BLOCK, pool), lambda: s.list(BLOCK, pool, "n1"),
            lambda: s.create(BLOCK, f"{pool}-b", block(pool, "10.1.0.64/26")),
            lambda: s.update(b, {**b.data, "used": 1}), lambda: s.delete(b)]
        for call in calls:
            with pytest.raises(Unavailable) as e:
                call()
            assert "connection refused" in str(e.value) and "try again later" in str(e.value)
    finally:
        cluster.start_apiserver()
    # The same store (its connection pool held connections to the old process) works again, and nothing
    # was written while the server was away.
    assert s.get(BLOCK, b.name) == b and s.get(BLOCK, f"{pool}-b") is None
    b2 = s.update(b, {**b.data, "used": 1})
    assert [v.version for v in s.list(BLOCK, pool, "n1")] == [b2.version]
    s.delete(b2)
