"""A meta-cni world for real CNI clients: host links, a primary config, NAD/Pod manifests, a plugin dir.

Everything lives in a per-test tmp dir; host link names start with `mcio` and subnets are inside
10.241.0.0/16, because other suites run concurrently on the same host.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from tests.conftest import META_CNI, REFERENCE_PLUGINS, delete_host_link

LIBCNI_RESULTS = Path("/var/lib/cni/results")
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"


@attrs.frozen
class Topology:
    """One test's networks: primary bridge (eth0), NAD `br-a` (bridge) and NAD `mv-a` (macvlan)."""

    root: Path
    bin_dir: Path          # holds only the `meta-cni` symlink; the runtime searches it before /usr/lib/cni
    conf_dir: Path         # meta-cni's confDir: the primary config, never the runtime's own config dir
    manifests_dir: Path
    cni_dir: Path          # meta-cni's cache
    ipam_dir: Path         # host-local dataDir
    devinfo_dir: Path
    primary_bridge: str
    secondary_bridge: str
    master: str            # veth end used as the macvlan master
    subnets: tuple[str, str, str]  # primary, br-a, mv-a

    @property
    def cni_path(self) -> str:
        return f"{self.bin_dir}:{REFERENCE_PLUGINS}"

    @property
    def prefixes(self) -> dict[str, str]:
        """Interface name -> expected IPv4 /24 prefix (`10.241.N.`)."""
        return {ifname: subnet.rsplit(".", 1)[0] + "." for ifname, subnet in zip(("eth0", "net1", "net2"), self.subnets)}

    def meta_plugin(self) -> dict[str, Any]:
        """The meta-cni plugin entry of a conflist (name and cniVersion come from the list)."""
        return {"type": "meta-cni", "clusterNetwork": "primary", "confDir": str(self.conf_dir),
                "manifestsDir": str(self.manifests_dir), "cniDir": str(self.cni_dir),
                "deviceInfoDir": str(self.devinfo_dir)}

    def write_conflist(self, directory: Path, name: str, cni_version: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.conflist"
        path.write_text(json.dumps({"cniVersion": cni_version, "name": name, "plugins": [self.meta_plugin()]}))
        return path

    def add_pod(self, name: str, networks: str, namespace: str = "default") -> None:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "annotations": {NETWORKS_ANNOTATION: networks}},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        (self.manifests_dir / f"pod-{namespace}-{name}.yaml").write_text(yaml.safe_dump(pod))

    def add_nad(self, name: str, config: dict[str, Any], namespace: str = "default") -> None:
        nad = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
               "metadata": {"name": name, "namespace": namespace}, "spec": {"config": json.dumps(config)}}
        (self.manifests_dir / f"nad-{namespace}-{name}.yaml").write_text(yaml.safe_dump(nad))

    def status_file(self, pod: str, namespace: str = "default") -> Path:
        return self.manifests_dir / "network-status" / f"{namespace}.{pod}.json"

    def cached_containers(self, network: str) -> list[str]:
        """Container IDs meta-cni still holds a cache entry for, in network `network`."""
        d = self.cni_dir / network
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def bridge_ports(bridge: str) -> list[str]:
    """Host interfaces enslaved to `bridge` (the host ends of pod veths)."""
    out = subprocess.run(["ip", "-j", "link", "show", "master", bridge], capture_output=True, text=True)
    if out.returncode != 0:  # the bridge does not exist (yet): nothing attached
        return []
    return [link["ifname"] for link in json.loads(out.stdout or "[]")]


def macvlans_on(master: str) -> list[str]:
    """Host-side macvlan links whose parent is `master` (a macvlan left in the host netns is a leak)."""
    out = subprocess.run(["ip", "-j", "-d", "link", "show", "type", "macvlan"], capture_output=True, text=True, check=True)
    return [link["ifname"] for link in json.loads(out.stdout or "[]") if link.get("link") == master]


def remove_libcni_results(network: str, container_id: str | None = None) -> None:
    """Drop libcni's cached ADD results of `network` (and one container) that a failed test may leave."""
    pattern = f"{network}-{container_id}-*" if container_id else f"{network}-*"
    if LIBCNI_RESULTS.is_dir():
        for p in LIBCNI_RESULTS.glob(pattern):
            p.unlink(missing_ok=True)


@pytest.fixture
def topology(tmp_path: Path, veth_master: Callable[[str], str]) -> Iterator[Callable[[int], Topology]]:
    """Factory: `topology(octet)` uses subnets 10.241.{octet,octet+1,octet+2}.0/24.

    Each test passes its own octet so that tests never share a subnet (a second bridge with the same
    subnet would add a conflicting host route).
    """
    made: list[Topology] = []

    def make(octet: int) -> Topology:
        assert 0 <= octet <= 253
        tag = uuid.uuid4().hex[:6]
        root = tmp_path / f"topo-{tag}"
        bin_dir = root / "bin"
        for d in ("bin", "conf", "manifests", "cache", "ipam", "devinfo"):
            (root / d).mkdir(parents=True)
        (bin_dir / "meta-cni").symlink_to(META_CNI)
        subnets = (f"10.241.{octet}.0/24", f"10.241.{octet + 1}.0/24", f"10.241.{octet + 2}.0/24")
        topo = Topology(root=root, bin_dir=bin_dir, conf_dir=root / "conf", manifests_dir=root / "manifests",
                        cni_dir=root / "cache", ipam_dir=root / "ipam", devinfo_dir=root / "devinfo",
                        primary_bridge=f"mcio{tag}p", secondary_bridge=f"mcio{tag}s",
                        master=veth_master(f"mciom{tag}"), subnets=subnets)
        made.append(topo)

        def ipam(subnet: str) -> dict[str, Any]:
            return {"type": "host-local", "subnet": subnet, "dataDir": str(topo.ipam_dir)}

        (topo.conf_dir / "primary.conf").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "primary", "type": "bridge", "bridge": topo.primary_bridge,
            "isGateway": True, "ipam": ipam(subnets[0])}))
        topo.add_nad("br-a", {"cniVersion": "1.0.0", "type": "bridge", "bridge": topo.secondary_bridge,
                              "ipam": ipam(subnets[1])})
        topo.add_nad("mv-a", {"cniVersion": "1.0.0", "type": "macvlan", "master": topo.master, "mode": "bridge",
                              "ipam": ipam(subnets[2])})
        return topo

    yield make
    for topo in made:
        for bridge in (topo.primary_bridge, topo.secondary_bridge):
            for port in bridge_ports(bridge):  # only after a failed DEL: the test already reported it
                delete_host_link(port)
            delete_host_link(bridge)
        shutil.rmtree(topo.root, ignore_errors=True)


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The caller's environment without CNI_* variables that would leak into the client under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CNI_") and k not in ("NETCONFPATH", "CAP_ARGS")}
