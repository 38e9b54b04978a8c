"""The daemon's meta-ipam garbage collector (meta/daemon/ipamgc.py) over the file store with a fake pod
lookup: what a round frees, that an unreadable API frees nothing, its metrics, and a write that races."""
from __future__ import annotations

import ipaddress
import threading
from pathlib import Path
from typing import Any

import pytest

from meta.cni.errors import INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from meta.daemon import ipamgc
from meta.daemon.metrics import Metrics
from meta.ipam import collect, config
from meta.ipam.allocator import Allocator
from meta.ipam.filestore import FileStore
from meta.ipam.kubestore import NotInstalled
from meta.ipam.store import BLOCK
from meta.sources import Pod
from tests.daemon.conftest import metric

IPAM = {"type": "meta-ipam", "range": "10.232.92.0/26", "sticky": True}


class Pods:
    """A pod lookup: pods by (namespace, name) -> UID; `fail` makes every lookup after the first `ok` fail."""

    def __init__(self, pods: dict[tuple[str, str], str], fail: CNIError | None = None, ok: int = 0) -> None:
        self.pods = pods
        self.fail = fail
        self.ok = ok
        self.asked: list[tuple[str, str, str | None]] = []

    def get_pod(self, namespace: str, name: str, uid: str | None = None) -> Pod | None:
        self.asked.append((namespace, name, uid))
        if self.fail is not None and len(self.asked) > self.ok:
            raise self.fail
        found = self.pods.get((namespace, name))
        return Pod(namespace, name, found) if found is not None else None


def held(store: FileStore, pool: str = "gcpool") -> dict[str, dict[str, Any]]:
    return {ip: e for b in store.list(BLOCK, pool) for ip, e in b.data["allocations"].items()}


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "ipam")
    pool = config.parse({**IPAM, "network_name": "gcpool"}, "blue").pool
    a, other = Allocator(s, "n1"), Allocator(s, "n2")
    for name in ("live", "gone", "renamed", "web-0"):
        claim = "ns/web-0" if name == "web-0" else None
        a.allocate(pool, config.Owner(f"c-{name}", "net1", "ns", name, f"uid-{name}", "blue"), claim=claim)
    a.allocate(pool, config.Owner("c-nopod", "net1", network="blue"))  # cnitool: no pod
    other.allocate(pool, config.Owner("c-far", "net1", "ns", "far", "uid-far", "blue"))  # another node's
    return s


def collector(store: FileStore, pods: Pods, metrics: Metrics | None = None) -> ipamgc.IpamCollector:
    return ipamgc.IpamCollector("n1", lambda: store, lambda: pods, metrics or Metrics())


def owners(store: FileStore) -> dict[str, tuple[str, bool]]:
    return {e["podName"] or e["containerID"]: (e["node"], bool(e["released"])) for e in held(store).values()}


def test_a_round_frees_exactly_what_gone_pods_hold(store: FileStore) -> None:
    # "renamed" exists under another UID (recreated): gone as well; web-0 is gone but has a sticky claim.
    pods = Pods({("ns", "live"): "uid-live", ("ns", "renamed"): "uid-new", ("ns", "far"): "x"})
    m = Metrics()
    done = collector(store, pods, m).run_once()
    assert done.result == ipamgc.OK
    assert sorted((h.pod_name, h.outcome) for h in done.freed) == [
        ("gone", "freed"), ("renamed", "freed"), ("web-0", "released")]
    assert owners(store) == {"live": ("n1", False), "web-0": ("n1", True), "c-nopod": ("n1", False),
                             "far": ("n2", False)}
    # Other nodes' pods and pod-less entries are never asked about.
    assert sorted(name for _, name, _ in pods.asked) == ["gone", "live", "renamed", "web-0"]
    text = m.render().decode()
    assert metric(text, "meta_cni_ipam_gc_freed_addresses_total") == 2  # released ones are not free
    assert metric(text, "meta_cni_ipam_gc_rounds_total", result="ok") == 1
    assert metric(text, "meta_cni_ipam_gc_last_success_timestamp_seconds") > 0
    # A second round finds nothing more to do.
    assert collector(store, pods, m).run_once().freed == ()


@pytest.mark.parametrize("failure", [
    CNIError(TRY_AGAIN_LATER, "Kubernetes API https://127.0.0.1:1 did not answer (connection refused)"),
    CNIError(INVALID_CONFIG, "forbidden: get pods in namespace ns"),
], ids=["down", "forbidden"])
def test_nothing_is_freed_when_any_pod_cannot_be_judged(store: FileStore, failure: CNIError) -> None:
    before = held(store)
    m = Metrics()
    # The first lookup answers (its pod is gone), the next fails: the round must not free the first either.
    done = collector(store, Pods({}, fail=failure, ok=1), m).run_once()
    assert (done.result, done.freed) == (ipamgc.API_UNREADABLE, ())
    assert failure.msg in done.error
    assert held(store) == before
    text = m.render().decode()
    assert metric(text, "meta_cni_ipam_gc_rounds_total", result="api-unreadable") == 1
    assert metric(text, "meta_cni_ipam_gc_last_success_timestamp_seconds") == 0


def test_nothing_is_freed_when_the_blocks_cannot_be_listed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    broken = FileStore(tmp_path / "file" / "ipam")  # its directory cannot be made
    done = collector(broken, Pods({})).run_once()
    assert done.result == ipamgc.API_UNREADABLE and "IPAM data dir" in done.error


def test_a_cluster_without_meta_ipam_crds_has_nothing_to_collect(tmp_path: Path) -> None:
    """No IPBlock resource at all (404): not an unreadable API, and no warning every round."""
    class Bare(FileStore):
        def list_all(self, kind: str) -> list[Any]:
            raise NotInstalled(INVALID_CONFIG, "Kubernetes API https://x has no ipblocks.ipam.meta-cni.dev")

    m = Metrics()
    done = collector(Bare(tmp_path / "ipam"), Pods({}), m).run_once()
    assert (done.result, done.freed, done.error) == (ipamgc.OK, (), "")
    assert metric(m.render().decode(), "meta_cni_ipam_gc_rounds_total", result="ok") == 1


def test_an_entry_that_changed_hands_after_the_list_is_kept(store: FileStore) -> None:
    """The round judged pod "gone", then (before its write) the address was freed by DEL and handed to a new
    pod: the write conflicts, the block is read again, and the new holder keeps it."""
    pool = config.parse({**IPAM, "network_name": "gcpool"}, "blue").pool
    listed = store.list_all(BLOCK)
    target = next(h for h in collect.pod_candidates(listed, "n1") if h.pod_name == "gone")
    a = Allocator(store, "n1")
    a.release(pool, config.Owner("c-gone", "net1", "ns", "gone", "uid-gone", "blue"))
    newcomer = config.Owner("c-new", "net1", "ns", "new", "uid-new", "blue")
    got = a.allocate(pool, newcomer, static=[ipaddress.ip_address(target.ip)])
    assert str(got[0].address) == target.ip
    freed = Allocator(store, "n1", sleep=lambda _: None).free("gcpool", [target], {o.name: o for o in listed})
    assert freed == []
    assert held(store)[target.ip]["containerID"] == "c-new"


def test_the_loop_runs_rounds_until_stopped(store: FileStore) -> None:
    stop = threading.Event()
    rounds: list[ipamgc.Round] = []
    gc = collector(store, Pods({}))
    real = gc.run_once

    def counted() -> ipamgc.Round:
        rounds.append(real())
        if len(rounds) == 2:
            stop.set()
        return rounds[-1]

    gc.run_once = counted  # type: ignore[method-assign]
    t = threading.Thread(target=gc.run, args=(stop, 0.01, 0.0))
    t.start()
    t.join(60)
    assert not t.is_alive() and len(rounds) == 2
    # Nothing is left for the second round: everything with a pod was gone in the first.
    assert len(rounds[0].freed) == 4 and rounds[1].freed == ()


def test_a_round_covers_every_pool(store: FileStore) -> None:
    other = config.parse({"type": "meta-ipam", "range": "10.232.93.0/28"}, "red").pool
    a = Allocator(store, "n1")
    a.allocate(other, config.Owner("c-red", "net1", "ns", "red", "uid-red", "red"))
    a.allocate(other, config.Owner("c-red2", "net1", "ns", "red2", "uid-red2", "red"))
    done = collector(store, Pods({("ns", "red2"): "uid-red2", ("ns", "live"): "uid-live"})).run_once()
    assert sorted(h.pod_name for h in done.freed) == ["gone", "red", "renamed", "web-0"]
    assert [e["podName"] for e in held(store, "red").values()] == ["red2"]


@pytest.mark.parametrize("options, runs", [
    ({"kubeconfig": "/etc/nonexistent/kubeconfig"}, True),
    ({"in_cluster": True}, True),
    ({"kubeconfig": "/etc/nonexistent/kubeconfig", "ipam_gc_interval": 0.0}, False),  # turned off
    ({}, False),  # no credentials of its own: it could not list every pool or ask about pods
], ids=["kubeconfig", "in-cluster", "off", "no-credentials"])
def test_the_daemon_collects_only_with_credentials_of_its_own(tmp_path: Path, options: dict[str, Any],
                                                              runs: bool) -> None:
    from meta.daemon import app

    opts = app.Options(socket=tmp_path / "d.sock", metrics_address=None, node_name="n7",
                       **{"in_cluster": False, **options})
    d = app.Daemon(opts)
    assert (d.ipam_gc is not None) == runs
    if d.ipam_gc is not None:
        assert d.ipam_gc.node == "n7"  # the node meta-ipam records (its nodeName default is the same)
