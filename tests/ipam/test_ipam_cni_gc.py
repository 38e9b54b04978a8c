"""CNI GC (spec 1.1.0) reaching meta-ipam: the exec'd `meta-ipam`, the exec'd built-in `meta-bridge` passing GC on
to its IPAM, and meta-cni (thin mode) forwarding GC to a built-in bridge whose meta-ipam runs in-process.

Two networks share one pool (network_name): GC of one never frees the other's addresses. Released sticky
addresses, other nodes' allocations and entries written before networks were recorded survive. Standalone
store (files); real namespaces; bridges named `mcig…` (no addresses on the host); pools in 10.232.94.0/23."""
from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta.ipam.filestore import FileStore
from meta.ipam.store import BLOCK
from tests.conftest import META_CNI, PluginRun, delete_host_link, run_plugin

pytestmark = pytest.mark.integration

BIN = Path(sys.prefix) / "bin"
NODE = "mcig-node-a"
POOL = "mcig-shared"


def ok(r: PluginRun) -> Any:
    assert r.rc == 0, r.stdout + r.stderr
    return r.json


def held(data: Path, pool: str = POOL) -> dict[str, dict[str, Any]]:
    return {ip: e for b in FileStore(data).list(BLOCK, pool) for ip, e in b.data["allocations"].items()}


def owners(data: Path, pool: str = POOL) -> dict[tuple[str, str], tuple[str | None, str, bool]]:
    """(containerID, ifname) -> (network, node, released) of every allocation in the pool."""
    return {(e["containerID"], e["ifname"]): (e.get("network"), e["node"], e["released"])
            for e in held(data, pool).values()}


def pod_args(name: str, uid: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={uid}"


def net_conf(name: str, data: Path, *, node: str = NODE, version: str = "1.1.0", plugin: str = "meta-bridge",
             **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": name, "type": plugin, "bridge": "mcig0",
            "ipam": {"type": "meta-ipam", "network_name": POOL, "range": "10.232.94.0/26", "dataDir": str(data),
                     "nodeName": node, "sticky": True, **ipam}}


def gc_conf(conf: dict[str, Any], valid: list[tuple[str, str]]) -> dict[str, Any]:
    return {**conf, "cni.dev/valid-attachments": [{"containerID": c, "ifname": i} for c, i in valid]}


@pytest.fixture
def bridges() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(f"mcig{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield make
    for name in made:
        delete_host_link(name)


def test_meta_ipam_gc_frees_only_this_networks_stale_attachments_on_this_node(
        tmp_path: Path, netns_factory: Callable[[], str]) -> None:
    data = tmp_path / "ipam"
    ns = netns_factory()
    blue, red = net_conf("blue", data), net_conf("red", data)
    far = net_conf("blue", data, node="mcig-node-b")

    def add(conf: dict[str, Any], cid: str, pod: str, ifname: str = "net1") -> None:
        ok(run_plugin(BIN / "meta-ipam", "ADD", conf, container_id=cid, netns=ns, ifname=ifname,
                      cni_args=pod_args(pod, f"uid-{pod}")))

    add(blue, "c-keep", "keep")
    add(blue, "c-stale", "stale")
    add(blue, "c-keep", "keep", ifname="net2")  # the same container's other interface is another attachment
    add(blue, "c-sticky", "web-0")  # a StatefulSet pod: DEL keeps its address for the claim
    ok(run_plugin(BIN / "meta-ipam", "DEL", blue, container_id="c-sticky", ifname="net1",
                  cni_args=pod_args("web-0", "uid-web-0")))
    add(red, "c-red", "red")  # red shares the pool
    add(far, "c-far", "far")  # blue on another node
    # An entry written before allocations recorded their network: never freed by CNI GC (it might be red's).
    store = FileStore(data)
    obj = next(b for b in store.list(BLOCK, POOL) if "c-stale" in json.dumps(b.data))
    body = json.loads(json.dumps(obj.data))
    legacy_ip = next(ip for ip, e in body["allocations"].items() if e["containerID"] == "c-stale")
    legacy = {**body["allocations"][legacy_ip], "containerID": "c-legacy"}
    del legacy["network"]
    spare = "10.232.94.60"
    body["allocations"][spare] = legacy
    store.update(obj, body)
    before = owners(data)
    assert before[("c-sticky", "net1")] == ("blue", NODE, True)

    # GC of blue keeps its listed attachment only.
    ok(run_plugin(BIN / "meta-ipam", "GC", gc_conf(blue, [("c-keep", "net1")])))
    after = owners(data)
    assert set(before) - set(after) == {("c-stale", "net1"), ("c-keep", "net2")}
    assert after == {k: v for k, v in before.items() if k in after}  # nothing else changed
    assert held(data)[spare]["containerID"] == "c-legacy"
    # GC of red with an empty list frees red's, and only red's.
    ok(run_plugin(BIN / "meta-ipam", "GC", gc_conf(red, [])))
    assert set(after) - set(owners(data)) == {("c-red", "net1")}
    # The older key of the spec-v1.1.0 tag is understood too; GC is idempotent.
    old_key = {**blue, "cni.dev/attachments": [{"containerID": "c-keep", "ifname": "net1"}]}
    ok(run_plugin(BIN / "meta-ipam", "GC", old_key))
    assert ("c-keep", "net1") in owners(data)
    # Errors: GC before 1.1.0 is refused as skel does; a malformed list frees nothing.
    r = run_plugin(BIN / "meta-ipam", "GC", {**gc_conf(blue, []), "cniVersion": "1.0.0"})
    assert r.rc == 1 and r.json["code"] == 1 and "does not allow GC" in r.json["msg"]
    r = run_plugin(BIN / "meta-ipam", "GC", {**blue, "cni.dev/valid-attachments": [{"containerID": "c-keep"}]})
    assert r.rc == 1 and r.json["code"] == 7 and "cni.dev/valid-attachments" in r.json["msg"]
    assert ("c-keep", "net1") in owners(data)
    assert set(owners(data)) == {("c-keep", "net1"), ("c-sticky", "net1"), ("c-far", "net1"), ("c-legacy", "net1")}


def test_the_builtin_bridge_binary_passes_gc_to_its_exec_d_ipam(tmp_path: Path, netns_factory: Callable[[], str],
                                                                 bridges: Callable[[], str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "meta-ipam").symlink_to(BIN / "meta-ipam")
    data = tmp_path / "ipam"
    conf = {**net_conf("blue", data), "bridge": bridges()}
    ns = netns_factory()
    for cid in ("c1", "c2"):
        ok(run_plugin(BIN / "meta-ipam", "ADD", conf, container_id=cid, netns=ns, ifname="net1",
                      cni_args=pod_args(cid, f"uid-{cid}"), path=str(bin_dir)))
    ok(run_plugin(BIN / "meta-bridge", "GC", gc_conf(conf, [("c1", "net1")]), path=str(bin_dir)))
    assert set(owners(data)) == {("c1", "net1")}
    # The IPAM's own failure is the bridge's (the spec: GC reports errors).
    (tmp_path / "file").write_text("")
    broken = {**conf, "ipam": {**conf["ipam"], "dataDir": str(tmp_path / "file" / "ipam")}}
    r = run_plugin(BIN / "meta-bridge", "GC", gc_conf(broken, []), path=str(bin_dir))
    assert r.rc == 1 and r.json["code"] == 11 and "ipam meta-ipam" in r.json["msg"], r.stdout


def test_meta_cni_gc_reaches_meta_ipam_through_a_builtin_bridge(tmp_path: Path, netns_factory: Callable[[], str],
                                                                 bridges: Callable[[], str]) -> None:
    """meta-cni's GC deletes the cached attachments that are no longer valid (their DEL frees their addresses)
    and forwards GC to every 1.1.0 network with its valid attachments: meta-bridge in-process, meta-ipam
    in-process, which frees what leaked without a cache entry (an allocation whose ADD never finished).
    Another network sharing the pool, which meta-cni has no attachment of, keeps its addresses."""
    from tests.integration.conftest import Scenario

    empty = tmp_path / "plugins"
    empty.mkdir()
    (tmp_path / "meta").mkdir()
    sc = Scenario(tmp_path / "meta", META_CNI, empty)
    data = sc.data_dir
    primary_ipam = {"type": "meta-ipam", "range": "10.232.95.0/26", "dataDir": str(data), "nodeName": NODE}
    primary = {"cniVersion": "1.1.0", "name": "mcig-primary",
               "plugins": [{"type": "meta-bridge", "bridge": bridges(), "ipam": primary_ipam}]}
    (sc.conf_dir / "10-primary.conflist").write_text(json.dumps(primary))
    sec = {k: v for k, v in net_conf("sec", data).items() if k not in ("cniVersion", "name")}
    sc.add_nad("sec", {"name": "sec", **sec, "bridge": bridges()}, cni_version="1.1.0")
    for pod in ("p1", "p2"):
        sc.add_pod("sec", name=pod, uid=f"uid-{pod}")
    ns1, ns2 = netns_factory(), netns_factory()
    for cid, ns, pod in (("c1", ns1, "p1"), ("c2", ns2, "p2")):
        ok(sc.add(cid, ns, cni_version="1.1.0", cni_args=Scenario.pod_args(pod, uid=f"uid-{pod}"),
                  clusterNetwork="mcig-primary"))
    # Leaks: an ADD that never got as far as meta-cni's cache, in both networks; and network sec2, which
    # shares sec's pool and that this meta-cni never attached.
    leak_ns = netns_factory()
    sec_conf = {**net_conf("sec", data), "bridge": "unused"}
    primary_conf = {**primary["plugins"][0], "cniVersion": "1.1.0", "name": "mcig-primary"}
    for conf, ifname in ((sec_conf, "net1"), (primary_conf, "eth0")):
        ok(run_plugin(BIN / "meta-ipam", "ADD", conf, container_id="c-leak", netns=leak_ns, ifname=ifname,
                      cni_args=pod_args("leak", "uid-leak")))
    ok(run_plugin(BIN / "meta-ipam", "ADD", {**sec_conf, "name": "sec2"}, container_id="c-other", netns=leak_ns,
                  ifname="net1", cni_args=pod_args("other", "uid-other")))
    assert set(owners(data)) == {("c1", "net1"), ("c2", "net1"), ("c-leak", "net1"), ("c-other", "net1")}

    gc = sc.run("GC", cni_version="1.1.0", cni_args="", clusterNetwork="mcig-primary",
                **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})
    assert gc.rc == 0, gc.stdout + gc.stderr
    assert set(owners(data)) == {("c1", "net1"), ("c-other", "net1")}
    assert owners(data)[("c-other", "net1")][0] == "sec2"
    assert set(owners(data, "mcig-primary")) == {("c1", "eth0")}
    assert not sc.cache_path("c2").exists() and sc.cache_path("c1").exists()
    ok(sc.delete("c1", ns1, cni_version="1.1.0", cni_args=Scenario.pod_args("p1", uid="uid-p1"),
                 clusterNetwork="mcig-primary"))
    assert set(owners(data)) == {("c-other", "net1")} and owners(data, "mcig-primary") == {}


def test_meta_cni_gc_of_an_edited_nad_keeps_the_attachments_of_both_versions(
        tmp_path: Path, netns_factory: Callable[[], str], bridges: Callable[[], str]) -> None:
    """A NAD edited between two pods' ADDs leaves two configs of one network in meta-cni's cache. GC goes to
    each config, and each must hear of every valid attachment of the network: meta-ipam collects by network
    name, so a list of one config's attachments only would free the other's addresses."""
    from tests.integration.conftest import Scenario

    empty = tmp_path / "plugins"
    empty.mkdir()
    (tmp_path / "meta").mkdir()
    sc = Scenario(tmp_path / "meta", META_CNI, empty)
    data = sc.data_dir
    primary = {"cniVersion": "1.1.0", "name": "mcig-primary", "plugins": [{"type": "meta-bridge", "bridge": bridges()}]}
    (sc.conf_dir / "10-primary.conflist").write_text(json.dumps(primary))
    sec = {k: v for k, v in net_conf("sec", data).items() if k not in ("cniVersion", "name")}
    for pod in ("p1", "p2"):
        sc.add_pod("sec", name=pod, uid=f"uid-{pod}")
    made = []
    for cid, pod in (("c1", "p1"), ("c2", "p2")):
        sc.add_nad("sec", {"name": "sec", **sec, "bridge": bridges()}, cni_version="1.1.0")  # edited: a new bridge
        ns = netns_factory()
        ok(sc.add(cid, ns, cni_version="1.1.0", cni_args=Scenario.pod_args(pod, uid=f"uid-{pod}"),
                  clusterNetwork="mcig-primary"))
        made.append((cid, ns, pod))
    assert sc.cache_record("c1") != sc.cache_record("c2")
    gc = sc.run("GC", cni_version="1.1.0", cni_args="", clusterNetwork="mcig-primary",
                **{"cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c, _, _ in made]})
    assert gc.rc == 0, gc.stdout + gc.stderr
    assert set(owners(data)) == {("c1", "net1"), ("c2", "net1")}
    for cid, ns, pod in made:
        ok(sc.delete(cid, ns, cni_version="1.1.0", cni_args=Scenario.pod_args(pod, uid=f"uid-{pod}"),
                     clusterNetwork="mcig-primary"))
    assert owners(data) == {}
