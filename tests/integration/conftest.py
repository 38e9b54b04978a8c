"""Integration scenarios: meta-cni run as a binary over real netns and the reference plugins.

`scenario` builds one throw-away standalone installation under tmp_path (confDir with the primary
network, manifestsDir with NADs and pods, cniDir, host-local dataDir) and removes every host bridge it
named at teardown: the reference bridge plugin never deletes its bridge.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PluginRun, delete_host_link, host_local_reservations, host_third_octets, links_in, run_plugin

META_NAME = "meta"
POD_NS = "default"
POD_NAME = "p1"
NAD_API = "k8s.cni.cncf.io/v1"


def ipv4_of(link: dict[str, Any]) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"]


def default_routes4(netns: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", Path(netns).name, "-4", "-j", "route", "show", "default"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def in_netns(netns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", Path(netns).name, *cmd], capture_output=True, text=True)


class Scenario:
    """One standalone meta-cni setup; the helpers return what the runtime would see."""

    def __init__(self, root: Path, meta_cni: Path, plugins: Path) -> None:
        self.root = root
        self.meta_cni = meta_cni
        self.plugins = plugins
        self.conf_dir = root / "net.d"
        self.manifests_dir = root / "manifests"
        self.cni_dir = root / "cni"
        self.data_dir = root / "ipam"
        self.devinfo_dir = root / "devinfo"
        for d in (self.conf_dir, self.manifests_dir, self.data_dir, self.devinfo_dir):
            d.mkdir()
        self.bridges: list[str] = []
        self._octets: set[int] = set()

    # --- naming ---------------------------------------------------------------------------------------

    def bridge_name(self) -> str:
        """A fresh `mcit` bridge name (random, so concurrent runs never share a bridge)."""
        name = f"mcit{uuid.uuid4().hex[:8]}"
        self.bridges.append(name)
        return name

    def subnet(self) -> ipaddress.IPv4Network:
        """A /24 inside 10.240.0.0/16 that neither this scenario nor the host uses yet."""
        taken = self._octets | host_third_octets(ipaddress.ip_network("10.240.0.0/16"))
        octet = random.choice([o for o in range(1, 255) if o not in taken])
        self._octets.add(octet)
        return ipaddress.ip_network(f"10.240.{octet}.0/24")

    # --- delegate configs -----------------------------------------------------------------------------

    def ipam(self, subnet: ipaddress.IPv4Network) -> dict[str, Any]:
        return {"type": "host-local", "subnet": str(subnet), "dataDir": str(self.data_dir)}

    def bridge_plugin(self, subnet: ipaddress.IPv4Network, **extra: Any) -> dict[str, Any]:
        return {"type": "bridge", "bridge": self.bridge_name(), "ipam": self.ipam(subnet), **extra}

    def macvlan_plugin(self, master: str, subnet: ipaddress.IPv4Network) -> dict[str, Any]:
        return {"type": "macvlan", "master": master, "mode": "bridge", "ipam": self.ipam(subnet)}

    def write_primary(self, subnet: ipaddress.IPv4Network | None = None, **bridge_extra: Any) -> ipaddress.IPv4Network:
        """confDir/10-primary.conflist, the network named by clusterNetwork."""
        subnet = subnet or self.subnet()
        conf = {"cniVersion": "1.0.0", "name": "primary", "plugins": [self.bridge_plugin(subnet, **bridge_extra)]}
        (self.conf_dir / "10-primary.conflist").write_text(json.dumps(conf))
        return subnet

    def nad_path(self, name: str, namespace: str = POD_NS) -> Path:
        return self.manifests_dir / f"nad-{namespace}-{name}.yaml"

    def add_nad(self, name: str, config: dict[str, Any], namespace: str = POD_NS,
                annotations: dict[str, str] | None = None, cni_version: str = "1.0.0") -> Path:
        """A NetworkAttachmentDefinition; `config` is one plugin, or a conflist when it has `plugins`."""
        config = {"cniVersion": cni_version, **config}
        meta: dict[str, Any] = {"name": name, "namespace": namespace}
        if annotations:
            meta["annotations"] = annotations
        obj = {"apiVersion": NAD_API, "kind": "NetworkAttachmentDefinition", "metadata": meta,
               "spec": {"config": json.dumps(config)}}
        path = self.nad_path(name, namespace)
        path.write_text(yaml.safe_dump(obj))
        return path

    def pod_path(self, name: str = POD_NAME, namespace: str = POD_NS) -> Path:
        return self.manifests_dir / f"pod-{namespace}-{name}.yaml"

    def add_pod(self, networks: str | list[dict[str, Any]] | None, name: str = POD_NAME, namespace: str = POD_NS,
                uid: str | None = None) -> Path:
        meta: dict[str, Any] = {"name": name, "namespace": namespace}
        if uid:
            meta["uid"] = uid
        if networks is not None:
            value = networks if isinstance(networks, str) else json.dumps(networks)
            meta["annotations"] = {"k8s.v1.cni.cncf.io/networks": value}
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        path = self.pod_path(name, namespace)
        path.write_text(yaml.safe_dump(obj))
        return path

    # --- meta-cni -------------------------------------------------------------------------------------

    def config(self, cni_version: str = "1.0.0", **overrides: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": cni_version, "name": META_NAME, "type": "meta-cni", "clusterNetwork": "primary",
            "confDir": str(self.conf_dir), "manifestsDir": str(self.manifests_dir), "cniDir": str(self.cni_dir),
            "deviceInfoDir": str(self.devinfo_dir),
        }
        conf.update(overrides)
        return conf

    @staticmethod
    def pod_args(name: str = POD_NAME, namespace: str = POD_NS, uid: str | None = None) -> str:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
        return args + (f";K8S_POD_UID={uid}" if uid else "")

    def run(self, command: str, container_id: str = "", netns: str = "", *, ifname: str = "eth0",
            cni_version: str = "1.0.0", cni_args: str | None = None, config: dict[str, Any] | None = None,
            **overrides: Any) -> PluginRun:
        return run_plugin(self.meta_cni, command, config or self.config(cni_version, **overrides),
                          container_id=container_id, netns=netns, ifname=ifname,
                          cni_args=self.pod_args() if cni_args is None else cni_args, path=str(self.plugins))

    def add(self, container_id: str, netns: str, **kw: Any) -> PluginRun:
        return self.run("ADD", container_id, netns, **kw)

    def delete(self, container_id: str, netns: str, **kw: Any) -> PluginRun:
        return self.run("DEL", container_id, netns, **kw)

    def cache_path(self, container_id: str, ifname: str = "eth0") -> Path:
        return self.cni_dir / META_NAME / container_id / f"{ifname}.json"

    def cache_record(self, container_id: str, ifname: str = "eth0") -> dict[str, Any]:
        return json.loads(self.cache_path(container_id, ifname).read_text())  # type: ignore[no-any-return]

    def status_path(self, name: str = POD_NAME, namespace: str = POD_NS) -> Path:
        return self.manifests_dir / "network-status" / f"{namespace}.{name}.json"

    def status(self, name: str = POD_NAME, namespace: str = POD_NS) -> list[dict[str, Any]]:
        return json.loads(self.status_path(name, namespace).read_text())  # type: ignore[no-any-return]

    def reserved_ips(self) -> list[str]:
        return host_local_reservations(self.data_dir)

    def assert_nothing_left(self, container_id: str, netns: str, name: str = POD_NAME, namespace: str = POD_NS) -> None:
        """The state after a complete teardown (or a failed ADD): only lo, no reservation, no cache, no status."""
        assert sorted(links_in(netns)) == ["lo"]
        assert self.reserved_ips() == [], "host-local reservations leaked"
        assert not self.cache_path(container_id).exists(), "meta-cni cache entry left behind"
        assert not self.status_path(name, namespace).exists(), "network-status file left behind"

    def cleanup(self) -> None:
        for br in self.bridges:
            delete_host_link(br)


@pytest.fixture
def scenario(tmp_path: Path, meta_cni: Path, reference_plugins: Path) -> Iterator[Scenario]:
    assert os.geteuid() == 0, "integration tests create network namespaces: run as root"
    sc = Scenario(tmp_path, meta_cni, reference_plugins)
    yield sc
    sc.cleanup()


@pytest.fixture
def master_name() -> Callable[[], str]:
    """Unique `mcitm` names for veth macvlan masters (15-char Linux limit, peer gets a `p` suffix)."""
    return lambda: f"mcitm{uuid.uuid4().hex[:8]}"
