"""GC, STATUS, refused ADDs, per-element requests (static IPs, namespaces) and device allocation."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import links_in
from tests.integration.conftest import Scenario, ipv4_of

pytestmark = pytest.mark.integration


def cid() -> str:
    return f"mcit-{uuid.uuid4().hex[:12]}"


def test_gc_removes_only_invalid_attachments(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    sec = sc.subnet()
    sc.add_nad("sec", sc.bridge_plugin(sec))  # delegates stay at 1.0.0: the reference plugins stop there
    sc.add_pod("sec", name="p1")
    sc.add_pod("sec", name="p2")
    (ns1, c1), (ns2, c2) = (netns_factory(), cid()), (netns_factory(), cid())
    for ns, c, pod in ((ns1, c1, "p1"), (ns2, c2, "p2")):
        r = sc.add(c, ns, cni_version="1.1.0", cni_args=sc.pod_args(pod))
        assert r.rc == 0, r.stdout + r.stderr
        assert r.json["cniVersion"] == "1.1.0"
    before1 = links_in(ns1)
    kept_ips = {str(ipaddress.ip_interface(a).ip) for n in ("eth0", "net1") for a in ipv4_of(before1[n])}
    assert len(sc.reserved_ips()) == 4

    gc = sc.run("GC", cni_version="1.1.0", cni_args="",
                **{"cni.dev/valid-attachments": [{"containerID": c1, "ifname": "eth0"}]})
    assert gc.rc == 0, gc.stdout + gc.stderr

    assert sorted(links_in(ns2)) == ["lo"]
    assert not sc.cache_path(c2).exists()
    assert not sc.status_path("p2").exists()
    # Only the first container's two addresses remain reserved.
    assert set(sc.reserved_ips()) == kept_ips
    after1 = links_in(ns1)
    assert sorted(after1) == ["eth0", "lo", "net1"]
    assert {n: ipv4_of(after1[n]) for n in after1} == {n: ipv4_of(before1[n]) for n in before1}
    assert sc.cache_path(c1).exists() and sc.status_path("p1").exists()

    assert sc.delete(c1, ns1, cni_version="1.1.0", cni_args=sc.pod_args("p1")).rc == 0
    sc.assert_nothing_left(c1, ns1, name="p1")


def test_status(scenario: Scenario, tmp_path: Path) -> None:
    sc = scenario
    sc.write_primary()
    ok = sc.run("STATUS", cni_version="1.1.0", cni_args="")
    assert ok.rc == 0, ok.stdout + ok.stderr
    not_a_dir = tmp_path / "manifests-file"
    not_a_dir.write_text("")
    bad = sc.run("STATUS", cni_version="1.1.0", cni_args="", manifestsDir=str(not_a_dir))
    assert bad.rc == 1 and bad.json["code"] == 50, bad.stdout
    assert str(not_a_dir) in bad.json["msg"]


def test_missing_nad(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    sc.add_nad("sec", sc.bridge_plugin(sc.subnet()))
    sc.add_pod("sec,missing")
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns)
    assert r.rc == 1 and r.json["code"] == 7, r.stdout
    assert "default/p1" in r.json["msg"] and "default/missing" in r.json["msg"]
    sc.assert_nothing_left(c, ns)


@pytest.mark.parametrize("annotation", ['[{"name": "sec", "bogus": 1}]', "[not json", "Sec_Net!"])
def test_malformed_annotation(scenario: Scenario, netns_factory: Callable[[], str], annotation: str) -> None:
    sc = scenario
    sc.write_primary()
    sc.add_nad("sec", sc.bridge_plugin(sc.subnet()))
    sc.add_pod(annotation)
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns)
    assert r.rc == 1 and r.json["code"] == 7, r.stdout
    assert "k8s.v1.cni.cncf.io/networks" in r.json["msg"]
    sc.assert_nothing_left(c, ns)


def test_existing_interface_is_refused_and_kept(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    sc.add_nad("sec", sc.bridge_plugin(sc.subnet()))
    sc.add_pod("sec")
    ns, c = netns_factory(), cid()
    # A veth pair entirely inside the netns stands in for an interface someone else owns.
    subprocess.run(["ip", "-n", Path(ns).name, "link", "add", "net1", "type", "veth", "peer", "name", "other1"],
                   check=True)
    r = sc.add(c, ns)
    assert r.rc == 1, r.stdout
    assert "net1" in r.json["msg"] and "default/sec" in r.json["msg"]
    assert sorted(links_in(ns)) == ["lo", "net1", "other1"], "the pre-existing interface must survive"
    assert sc.reserved_ips() == [] and not sc.cache_path(c).exists() and not sc.status_path().exists()


def test_namespace_isolation(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    sc.add_nad("shared", sc.bridge_plugin(sc.subnet()), namespace="b")
    sc.add_pod("b/shared", namespace="a")
    args = sc.pod_args(namespace="a")
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns, cni_args=args, namespaceIsolation=True)
    assert r.rc == 1 and r.json["code"] == 7, r.stdout
    assert "b/shared" in r.json["msg"]
    sc.assert_nothing_left(c, ns, namespace="a")

    # The same reference is fine once "b" is a global namespace.
    ok = sc.add(c, ns, cni_args=args, namespaceIsolation=True, globalNamespaces=["b"])
    assert ok.rc == 0, ok.stdout + ok.stderr
    assert [e["name"] for e in sc.status(namespace="a")] == ["primary", "b/shared"]
    assert sc.delete(c, ns, cni_args=args, namespaceIsolation=True, globalNamespaces=["b"]).rc == 0
    sc.assert_nothing_left(c, ns, namespace="a")


def test_static_ip_request(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    sc.write_primary()
    static, plain = sc.subnet(), sc.subnet()
    wanted = f"{static.network_address + 77}/24"
    sc.add_nad("static", sc.bridge_plugin(static, capabilities={"ips": True}))
    sc.add_pod([{"name": "static", "ips": [wanted]}])
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns)
    assert r.rc == 0, r.stdout + r.stderr
    assert ipv4_of(links_in(ns)["net1"]) == [wanted]
    assert sc.status()[1]["ips"] == [wanted.split("/")[0]]
    assert sc.delete(c, ns).rc == 0
    sc.assert_nothing_left(c, ns)

    # Without the capability the request cannot be honoured: refuse rather than hand out another address.
    sc.add_nad("plain", sc.bridge_plugin(plain))
    sc.add_pod([{"name": "plain", "ips": [f"{plain.network_address + 77}/24"]}])
    c2 = cid()
    bad = sc.add(c2, ns)
    assert bad.rc == 1 and bad.json["code"] == 7, bad.stdout
    assert ".ips" in bad.json["msg"] and "default/plain" in bad.json["msg"]
    sc.assert_nothing_left(c2, ns)


RECORDER = """\
import json, os, sys
conf = json.load(sys.stdin)
with open(os.path.join({out!r}, os.environ["CNI_IFNAME"] + "." + os.environ["CNI_COMMAND"] + ".json"), "w") as f:
    json.dump(conf, f)
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


def recorder_plugin(bin_dir: Path, out: Path) -> str:
    """A chained plugin that records the stdin it gets and passes prevResult on: what a delegate sees."""
    bin_dir.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    plugin = bin_dir / "mcit-recorder"
    plugin.write_text(f"#!{sys.executable}\n" + RECORDER.format(out=str(out)))
    plugin.chmod(0o755)
    return plugin.name


def test_resource_name_device_allocation(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    sc = scenario
    bin_dir, seen = sc.root / "bin", sc.root / "seen"
    recorder = recorder_plugin(bin_dir, seen)
    sc.write_primary()
    uid = str(uuid.uuid4())
    devices = ["0000:03:00.2", "0000:03:00.5"]
    checkpoint = sc.root / "kubelet_internal_checkpoint"
    checkpoint.write_text(json.dumps({"Data": {"PodDeviceEntries": [
        # Another pod's allocation of the same resource must not be picked.
        {"PodUID": str(uuid.uuid4()), "ContainerName": "c", "ResourceName": "example.com/dev",
         "DeviceIDs": {"0": ["0000:03:00.9"]}, "AllocResp": ""},
        {"PodUID": uid, "ContainerName": "c", "ResourceName": "example.com/dev",
         "DeviceIDs": {"0": devices}, "AllocResp": ""},
    ], "RegisteredDevices": {"example.com/dev": ["0000:03:00.2", "0000:03:00.5", "0000:03:00.9"]}}, "Checksum": 0}))
    res = {"k8s.v1.cni.cncf.io/resourceName": "example.com/dev"}
    # bridge ignores deviceID; the recorder chained after it shows what a device-aware plugin would get.
    sc.add_nad("dev-a", {"name": "dev-a", "plugins": [
        sc.bridge_plugin(sc.subnet()), {"type": recorder, "capabilities": {"deviceID": True}}]}, annotations=res)
    sc.add_nad("dev-b", sc.bridge_plugin(sc.subnet(), capabilities={"deviceID": True}), annotations=res)
    sc.add_pod("dev-a,dev-b", uid=uid)
    ns, c = netns_factory(), cid()
    r = sc.add(c, ns, cni_args=sc.pod_args(uid=uid), kubeletCheckpoint=str(checkpoint), binDir=str(bin_dir))
    assert r.rc == 0, r.stdout + r.stderr
    got_conf = json.loads((seen / "net1.ADD.json").read_text())
    assert got_conf["deviceID"] == devices[0]
    assert got_conf["runtimeConfig"]["deviceID"] == devices[0]

    status = sc.status()
    assert "device-info" not in status[0]
    got = [e["device-info"] for e in status[1:]]
    assert got == [{"type": "pci", "version": "1.1.0", "pci": {"pci-address": d}} for d in devices]
    atts = sc.cache_record(c)["attachments"]
    assert [a["deviceID"] for a in atts] == [None, *devices]
    assert [a["capabilityArgs"].get("deviceID") for a in atts] == [None, *devices]
    assert sc.delete(c, ns, kubeletCheckpoint=str(checkpoint), binDir=str(bin_dir)).rc == 0
    # DEL reaches the delegate with the same device, from the cache.
    assert json.loads((seen / "net1.DEL.json").read_text())["deviceID"] == devices[0]
    sc.assert_nothing_left(c, ns)
