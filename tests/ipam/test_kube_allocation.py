"""The allocator over KubeStore against a real kube-apiserver v1.20.2 + etcd, with real concurrency:
node processes (this file run as a script, each its own Allocator and KubeStore) allocating from one pool
at once; exhaustion of a small pool; exclusions, IPv6 and dual stack; static addresses contended across
nodes; a node process killed with SIGKILL in the middle of its allocations; the API server stopped and
started again under a running allocation loop.

After every scenario the store is read back: no address is held twice, every allocation carries its
complete owner (the container, interface, pod and node that asked), and what the nodes were answered is
exactly what the store holds."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "meta-ipam.yaml"
OWNER_FIELDS = ("containerID", "ifname", "podNamespace", "podName", "podUID", "node")
# A node process needs ~1-3 s to start (imports) and, on a loaded machine, much longer for its work.
PROCESS_DEADLINE = 300.0


# --- the node process (this file run as a script) -------------------------------------------------------

def node_process(spec: dict[str, Any]) -> None:
    """Allocate (or release) for each owner of `spec` in turn, printing one JSON line per answer.

    Prints {"ready": true} once set up, then waits for `start_file` so that all nodes begin together."""
    sys.path.insert(0, str(ROOT))
    from meta.cni.errors import CNIError
    from meta.ipam import config
    from meta.ipam.allocator import Allocator
    from meta.ipam.kubestore import KubeStore

    store = KubeStore.from_token(spec["host"], spec["token"], spec["ca"], spec["timeout"])
    allocator = Allocator(store, spec["node"])
    pool = config.parse(spec["ipam"], spec["network"]).pool
    print(json.dumps({"ready": True}), flush=True)
    while not os.path.exists(spec["start_file"]):
        time.sleep(0.01)
    for o in spec["owners"]:
        owner = config.Owner(container_id=o["cid"], ifname=o["ifname"], pod_namespace=o["ns"], pod_name=o["name"],
                             pod_uid=o["uid"])
        try:
            if spec["op"] == "add":
                static = [ipaddress.ip_address(s) for s in o.get("static", [])]
                leases = allocator.allocate(pool, owner, static=static)
                print(json.dumps({"ok": o["cid"], "ips": [str(x.address) for x in leases]}), flush=True)
            else:
                freed = allocator.release(pool, owner)
                print(json.dumps({"freed": o["cid"], "ips": [str(a) for a in freed]}), flush=True)
        except CNIError as e:
            print(json.dumps({"err": o["cid"], "code": e.code, "msg": e.msg}), flush=True)
        time.sleep(spec.get("pause", 0.0))


if __name__ == "__main__":
    node_process(json.loads(sys.argv[1]))
    sys.exit(0)


# --- test side ------------------------------------------------------------------------------------------

from meta.cni.errors import CNIError  # noqa: E402
from meta.ipam import config  # noqa: E402
from meta.ipam.allocator import Allocator  # noqa: E402
from meta.ipam.kubestore import KubeStore  # noqa: E402
from meta.ipam.ranges import pool_object_name  # noqa: E402
from meta.ipam.store import BLOCK, POOL  # noqa: E402
from meta.sources.kube import Action  # noqa: E402
from tests.infra.kube_cluster import KubeCluster  # noqa: E402


def owner(tag: str, k: int, static: list[str] | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"cid": f"{uuid.uuid4().hex}{uuid.uuid4().hex}", "ifname": "net1", "ns": "ipam-test",
                         "name": f"pod-{tag}-{k:03d}", "uid": str(uuid.uuid4())}
    if static:
        o["static"] = static
    return o


class Node:
    """One node process: its answers as they come, in `lines`."""

    def __init__(self, cluster: KubeCluster, name: str, network: str, ipam: dict[str, Any],
                 owners: list[dict[str, Any]], start_file: Path, op: str = "add", timeout: float = 30.0,
                 pause: float = 0.0) -> None:
        self.name = name
        self.owners = owners
        spec = {"host": cluster.host, "token": cluster.token, "ca": str(cluster.ca_file), "timeout": timeout,
                "node": name, "network": network, "ipam": ipam, "owners": owners, "op": op,
                "start_file": str(start_file), "pause": pause}
        self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._stderr: list[str] = []
        # Both pipes are drained by threads, so the answers can be watched while the process runs.
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._drain, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self.ready.set()
            else:
                self.lines.append(msg)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait(self, deadline: float = PROCESS_DEADLINE) -> None:
        try:
            self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._readers:
            t.join(timeout=10)
        assert self.proc.returncode == 0, f"node {self.name} exited {self.proc.returncode}: {self.stderr[-3000:]}"

    def ok(self) -> dict[str, list[str]]:
        return {m["ok"]: m["ips"] for m in self.lines if "ok" in m}

    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.lines if "err" in m]


def run_nodes(cluster: KubeCluster, tmp_path: Path, network: str, ipam: dict[str, Any],
              owners: dict[str, list[dict[str, Any]]], op: str = "add", timeout: float = 30.0,
              pause: float = 0.0, wait: bool = True) -> list[Node]:
    """Start one process per node, let them all begin at once; with `wait`, until all are done."""
    start = tmp_path / f"start-{uuid.uuid4().hex[:6]}"
    nodes = [Node(cluster, name, network, ipam, own, start, op, timeout, pause) for name, own in owners.items()]
    for n in nodes:
        if not n.ready.wait(PROCESS_DEADLINE):
            n.proc.kill()
            n.wait()  # raises with the process's stderr
    start.touch()
    if wait:
        for n in nodes:
            n.wait()
    return nodes


def stored(store: KubeStore, network: str) -> dict[str, list[dict[str, Any]]]:
    """Every allocation of the pool: address -> the entries holding it (more than one would be a duplicate)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for b in store.list(BLOCK, network):
        net = ipaddress.ip_network(b.data["cidr"])
        assert b.data["used"] == len(b.data["allocations"]), b.name
        for ip, entry in b.data["allocations"].items():
            assert ipaddress.ip_address(ip) in net, (b.name, ip)
            found.setdefault(ip, []).append(entry)
    return found


def assert_consistent(store: KubeStore, network: str, answered: dict[str, list[str]],
                      owners: dict[str, dict[str, Any]], nodes_of: dict[str, str],
                      maybe: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """No duplicates, complete owners, and the store holds exactly what was answered (plus, for the owners
    in `maybe` whose answer was lost, what they may hold). Returns address -> entry."""
    held = stored(store, network)
    dup_answers = [ip for ip, n in Counter(ip for ips in answered.values() for ip in ips).items() if n > 1]
    assert not dup_answers, f"addresses answered twice: {dup_answers}"
    assert all(len(v) == 1 for v in held.values()), {ip: v for ip, v in held.items() if len(v) > 1}
    entries = {ip: v[0] for ip, v in held.items()}
    for ip, e in entries.items():
        assert all(isinstance(e.get(f), str) and e[f] for f in OWNER_FIELDS), f"{ip} has no complete owner: {e}"
        o = owners.get(e["containerID"])
        assert o is not None, f"{ip} is held by a container nobody asked for: {e}"
        assert (e["ifname"], e["podNamespace"], e["podName"], e["podUID"]) == \
            (o["ifname"], o["ns"], o["name"], o["uid"])
        assert e["node"] == nodes_of[e["containerID"]] and e["released"] is False
    for cid, ips in answered.items():
        for ip in ips:
            assert ip in entries and entries[ip]["containerID"] == cid, \
                f"{ip} answered to {cid[:12]}, stored {held.get(ip)}"
    unanswered = {ip: e for ip, e in entries.items() if e["containerID"] not in answered}
    assert all(e["containerID"] in maybe for e in unanswered.values()), f"stored but never answered: {unanswered}"
    return entries


def pool_of(ipam: dict[str, Any], network: str) -> config.PoolSpec:
    return config.parse(ipam, network).pool


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> Iterator[KubeCluster]:
    kube_cluster.apply(CRD_FILE)
    delete_all(kube_cluster)
    yield kube_cluster
    delete_all(kube_cluster)


@pytest.fixture
def network() -> str:
    return f"kalloc-{uuid.uuid4().hex[:8]}"


def release_all(store: KubeStore, network: str, ipam: dict[str, Any], owners: list[dict[str, Any]],
                hints: dict[str, list[str]] | None = None) -> list[str]:
    """DEL of every owner as the plugin does it: by owner, wherever the address is; `hints` are the
    addresses the ADD answered (the plugin's prevResult), which spare the allocator a pool-wide search."""
    allocator = Allocator(store, "node-cleanup")
    pool = pool_of(ipam, network)
    freed: list[str] = []
    for o in owners:
        who = config.Owner(o["cid"], o["ifname"], o["ns"], o["name"], o["uid"])
        near = [ipaddress.ip_address(ip) for ip in (hints or {}).get(o["cid"], [])]
        freed += [str(a) for a in allocator.release(pool, who, hints=near)]
    return freed


def delete_all(cluster: KubeCluster) -> None:
    """Remove every IPPool and IPBlock: a consistent LIST costs the API server time for every object of
    the resource in etcd (whatever the label selector), so later tests must not pay for these."""
    s = KubeStore.from_token(cluster.host, cluster.token, str(cluster.ca_file), 30.0)
    for plural in ("ipblocks", "ippools"):
        s.api.call("DELETE", f"/apis/ipam.meta-cni.dev/v1alpha1/{plural}",
                   Action("deletecollection", plural, None, plural))
    s.close()


# --- scenarios ------------------------------------------------------------------------------------------

def test_ten_nodes_allocate_at_once_without_a_duplicate(cluster: KubeCluster, store: KubeStore, network: str,
                                                        tmp_path: Path) -> None:
    """10 node processes x 30 pods from a /23 in /26 blocks: 8 blocks for 10 nodes, so nodes lease, race for
    the same unleased blocks, and borrow from each other."""
    ipam = {"type": "meta-ipam", "range": "10.70.0.0/23"}
    owners = {f"node-{i}": [owner(f"n{i}", k) for k in range(30)] for i in range(10)}
    nodes = run_nodes(cluster, tmp_path, network, ipam, owners)
    answered = {cid: ips for n in nodes for cid, ips in n.ok().items()}
    assert [e for n in nodes for e in n.errors()] == [] and len(answered) == 300
    assert all(len(ips) == 1 for ips in answered.values())
    by_cid = {o["cid"]: o for own in owners.values() for o in own}
    nodes_of = {o["cid"]: name for name, own in owners.items() for o in own}
    entries = assert_consistent(store, network, answered, by_cid, nodes_of)
    assert len(entries) == 300
    blocks = store.list(BLOCK, network)
    assert len(blocks) == 8 and all(b.data["node"] for b in blocks)  # every block leased, none twice
    pool = store.get(POOL, pool_object_name(network))
    assert pool is not None and pool.data == pool_of(ipam, network).data()
    # Releasing by owner frees everything; the emptied blocks stay leased to their nodes.
    freed = release_all(store, network, ipam, list(by_cid.values()), answered)
    assert sorted(freed) == sorted(entries)
    assert stored(store, network) == {}


def test_a_small_pool_is_filled_to_the_last_address_and_then_refuses_cleanly(
        cluster: KubeCluster, store: KubeStore, network: str, tmp_path: Path) -> None:
    """A /27 (30 addresses) in four /29 blocks. First each of 4 nodes makes one pod, which leases it a block
    of its own (a node leases another block only when its own are full). Then, all at once, node-0 asks for
    15 more pods and the others for 5 each (34 in all): the others fit in their blocks, node-0 does not and
    must borrow from theirs, so every address is handed out; the 4 pods too many get a clean error and
    hold nothing."""
    ipam = {"type": "meta-ipam", "range": "10.71.0.0/27", "block_size": {"4": 29}}
    first = {f"node-{i}": [owner(f"f{i}", 0)] for i in range(4)}
    nodes = run_nodes(cluster, tmp_path, network, ipam, first)
    assert all(len(n.ok()) == 1 for n in nodes)
    leases = {b.data["cidr"]: b.data["node"] for b in store.list(BLOCK, network)}
    assert sorted(leases.values()) == ["node-0", "node-1", "node-2", "node-3"], leases
    more = {f"node-{i}": [owner(f"n{i}", k) for k in range(15 if i == 0 else 5)] for i in range(4)}
    nodes += run_nodes(cluster, tmp_path, network, ipam, more)
    answered = {cid: ips for n in nodes for cid, ips in n.ok().items()}
    errors = [e for n in nodes for e in n.errors()]
    assert len(answered) == 30 and len(errors) == 4
    for e in errors:
        assert e["code"] == 999 and "no addresses available in range 10.71.0.0/27" in e["msg"], e
    owners = {name: first[name] + more[name] for name in first}
    by_cid = {o["cid"]: o for own in owners.values() for o in own}
    nodes_of = {o["cid"]: name for name, own in owners.items() for o in own}
    entries = assert_consistent(store, network, answered, by_cid, nodes_of)
    assert sorted(entries, key=ipaddress.ip_address) == [f"10.71.0.{i}" for i in range(1, 31)]
    # Borrowed: the others asked for 18 at most, so node-0 holds at least 12, more than its block's 8 at
    # most; the rest of its addresses lie in blocks leased to other nodes (the leases did not move).
    assert {b.data["cidr"]: b.data["node"] for b in store.list(BLOCK, network)} == leases
    block_of = {ip: next(c for c in leases if ipaddress.ip_address(ip) in ipaddress.ip_network(c)) for ip in entries}
    node0 = [ip for ip, e in entries.items() if e["node"] == "node-0"]
    borrowed = [ip for ip in node0 if leases[block_of[ip]] != "node-0"]
    assert len(node0) >= 12 and len(borrowed) >= len(node0) - 8, (node0, leases)
    freed = release_all(store, network, ipam, list(by_cid.values()), answered)
    assert len(freed) == 30 and stored(store, network) == {}


def test_exclusions_gateway_and_dual_stack(store: KubeStore, network: str) -> None:
    """Exclusions and the gateway are never handed out; a dual-stack pool gives every pod one address per
    family (v6 blocks are /122), and releasing frees both."""
    # v6 first: the pod refused for want of a v4 address has got its v6 one already (all or nothing).
    ipam = {"type": "meta-ipam", "ipRanges": [
        {"range": "fd00:72::/120", "range_start": "fd00:72::10", "range_end": "fd00:72::18"},
        {"range": "10.72.0.0/28", "exclude": ["10.72.0.4/30", "10.72.0.10"], "gateway": "10.72.0.1"}]}
    pool = pool_of(ipam, network)
    a, b = Allocator(store, "node-a"), Allocator(store, "node-b")
    got: dict[str, list[str]] = {}
    for k in range(8):  # v4: .2 .3 .8 .9 .11 .12 .13 .14 = 8 addresses
        o = config.Owner(f"c{k}", "net1", "ns", f"p{k}", f"u{k}")
        got[o.container_id] = [str(x.address) for x in (a if k % 2 else b).allocate(pool, o)]
    v6 = sorted((ips[0] for ips in got.values()), key=ipaddress.ip_address)
    v4 = sorted((ips[1] for ips in got.values()), key=ipaddress.ip_address)
    assert v4 == ["10.72.0.2", "10.72.0.3", "10.72.0.8", "10.72.0.9", "10.72.0.11", "10.72.0.12", "10.72.0.13",
                  "10.72.0.14"]
    assert len(set(v6)) == 8 and all(0x10 <= int(ipaddress.IPv6Address(x)) - int(ipaddress.IPv6Address("fd00:72::"))
                                     <= 0x18 for x in v6)
    with pytest.raises(CNIError) as e:
        a.allocate(pool, config.Owner("c-extra", "net1", "ns", "p-extra", "u-extra"))
    assert "no addresses available in range 10.72.0.0/28" in e.value.msg
    # All or nothing: the v6 address the refused pod got first was given back.
    held = stored(store, network)
    assert len(held) == 16 and not any(v[0]["containerID"] == "c-extra" for v in held.values())
    cidrs = sorted(blk.data["cidr"] for blk in store.list(BLOCK, network))
    assert cidrs == ["10.72.0.0/28", "fd00:72::/122"]
    freed = b.release(pool, config.Owner("c3", "net1", "ns", "p3", "u3"))
    assert [str(x) for x in freed] == sorted(got["c3"], key=lambda s: ipaddress.ip_address(s).version)
    for cid in got:
        a.release(pool, config.Owner(cid, "net1", "ns", f"p{cid[1:]}", f"u{cid[1:]}"))
    assert stored(store, network) == {}


def test_static_addresses_contended_across_nodes(cluster: KubeCluster, store: KubeStore, network: str,
                                                 tmp_path: Path) -> None:
    """Three nodes ask for the same static addresses at once: each goes to exactly one pod, the others get
    an error naming the holder; a static address inside another node's leased block is reserved there, and
    dynamic allocation never hands it out."""
    ipam = {"type": "meta-ipam", "range": "10.73.0.0/26", "block_size": {"4": 28}}
    wanted = ["10.73.0.5", "10.73.0.20", "10.73.0.40", "10.73.0.60"]
    owners = {f"node-{i}": [owner(f"s{i}", k, [ip]) for k, ip in enumerate(wanted)] for i in range(3)}
    nodes = run_nodes(cluster, tmp_path, network, ipam, owners)
    answered = {cid: ips for n in nodes for cid, ips in n.ok().items()}
    errors = [e for n in nodes for e in n.errors()]
    assert sorted(ip for ips in answered.values() for ip in ips) == sorted(wanted) and len(errors) == 8
    assert all("is taken by pod ipam-test/pod-s" in e["msg"] for e in errors), errors
    by_cid = {o["cid"]: o for own in owners.values() for o in own}
    nodes_of = {o["cid"]: name for name, own in owners.items() for o in own}
    entries = assert_consistent(store, network, answered, by_cid, nodes_of)
    assert all(e["static"] for e in entries.values())
    # Fill the rest dynamically from another node: 62 assignable - 4 static = 58, none of them static ones.
    pool = pool_of(ipam, network)
    d = Allocator(store, "node-d")
    dyn = [str(d.allocate(pool, config.Owner(f"d{k}", "net1", "ns", f"d{k}", f"ud{k}"))[0].address) for k in range(58)]
    assert not set(dyn) & set(wanted) and len(set(dyn)) == 58
    with pytest.raises(CNIError, match="no addresses available"):
        d.allocate(pool, config.Owner("d-extra", "net1", "ns", "d-extra", "ud-extra"))
    # A static request for an address held dynamically is refused, naming the holder.
    with pytest.raises(CNIError, match="is taken by pod ns/d0"):
        d.allocate(pool, config.Owner("s-late", "net1", "ns", "s-late", "us-late"),
                   static=[ipaddress.ip_address(dyn[0])])


def test_a_node_killed_mid_allocation_leaves_no_duplicate_and_no_ownerless_address(
        cluster: KubeCluster, store: KubeStore, network: str, tmp_path: Path) -> None:
    """SIGKILL of a node process in the middle of its run (while two others keep allocating): what it wrote
    is whole, with its owner, and releasing its pods by owner frees every address it held."""
    ipam = {"type": "meta-ipam", "range": "10.74.0.0/24", "block_size": {"4": 27}}
    owners = {f"node-{i}": [owner(f"k{i}", k) for k in range(60)] for i in range(3)}
    nodes = run_nodes(cluster, tmp_path, network, ipam, owners, wait=False)
    victim = nodes[0]
    deadline = time.monotonic() + PROCESS_DEADLINE
    while len(victim.lines) < 15 and victim.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=30)
    assert victim.proc.returncode == -signal.SIGKILL and len(victim.lines) < 60
    for n in nodes[1:]:
        n.wait()
    answered = {cid: ips for n in nodes for cid, ips in n.ok().items()}
    assert [e for n in nodes for e in n.errors()] == []
    by_cid = {o["cid"]: o for own in owners.values() for o in own}
    nodes_of = {o["cid"]: name for name, own in owners.items() for o in own}
    # The pod being allocated when the kill came may or may not hold its address: never half of one.
    in_flight = frozenset(o["cid"] for o in victim.owners[len(victim.lines):len(victim.lines) + 1])
    entries = assert_consistent(store, network, answered, by_cid, nodes_of, maybe=in_flight)
    assert len(entries) - len(answered) in (0, 1)
    # DEL of the dead node's pods (kubelet retries them after the node comes back): by owner, all of it.
    freed = release_all(store, network, ipam, victim.owners)
    assert sorted(freed) == sorted(ip for ip, e in entries.items() if e["node"] == victim.name)
    left = stored(store, network)
    assert {v[0]["node"] for v in left.values()} == {"node-1", "node-2"} and len(left) == 120
    release_all(store, network, ipam, [o for n in nodes[1:] for o in n.owners], answered)
    assert stored(store, network) == {}


def test_api_server_outage_during_allocation(cluster: KubeCluster, store: KubeStore, network: str,
                                             tmp_path: Path) -> None:
    """Two nodes allocate in a loop while the API server is stopped and started again: allocations during
    the outage fail with CNI error 11 (try again later), the others succeed, and the store holds exactly
    the successful ones, each with its owner; DEL of every pod (failed ADDs included, as the runtime does)
    leaves the pool empty."""
    ipam = {"type": "meta-ipam", "range": "10.75.0.0/24", "block_size": {"4": 27}}
    owners = {f"node-{i}": [owner(f"o{i}", k) for k in range(100)] for i in range(2)}
    nodes = run_nodes(cluster, tmp_path, network, ipam, owners, timeout=1.5, pause=0.02, wait=False)
    deadline = time.monotonic() + PROCESS_DEADLINE
    while min(len(n.lines) for n in nodes) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    cluster.stop_apiserver()
    try:
        while min(len(n.errors()) for n in nodes) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        cluster.start_apiserver()
    for n in nodes:
        n.wait()
    errors = [e for n in nodes for e in n.errors()]
    assert errors and all(e["code"] == 11 and "try again later" in e["msg"] for e in errors), errors[:3]
    for n in nodes:
        # Successes before and after the outage: the same allocator (and connection pool) recovered.
        kinds = ["ok" if "ok" in m else "err" for m in n.lines]
        assert kinds[0] == "ok" and kinds[-1] == "ok" and "err" in kinds, kinds
    answered = {cid: ips for n in nodes for cid, ips in n.ok().items()}
    by_cid = {o["cid"]: o for own in owners.values() for o in own}
    nodes_of = {o["cid"]: name for name, own in owners.items() for o in own}
    failed = frozenset(e["err"] for e in errors)
    entries = assert_consistent(store, network, answered, by_cid, nodes_of, maybe=failed)
    # A failed ADD holds nothing, unless its write landed and only the answer was lost (then DEL frees it).
    lost_answers = [ip for ip, e in entries.items() if e["containerID"] in failed]
    assert len(lost_answers) <= len(nodes), lost_answers
    release_all(store, network, ipam, list(by_cid.values()), answered)
    assert stored(store, network) == {}
