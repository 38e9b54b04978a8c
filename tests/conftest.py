"""Shared fixtures: real network namespaces, and running `meta-cni` exactly as a runtime does."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

if TYPE_CHECKING:
    import kubernetes.client

    from tests.infra.kube_cluster import KubeCluster

REFERENCE_PLUGINS = Path("/usr/lib/cni")
META_CNI = Path(sys.prefix) / "bin" / "meta-cni"
CACHE = Path(os.environ.get("META_CNI_CACHE", Path.home() / ".cache" / "meta-cni"))
CNITOOL = CACHE / "bin" / "cnitool"
KUBE_APISERVER = CACHE / "bin" / "kube-apiserver"


@attrs.frozen
class PluginRun:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


def run_plugin(binary: Path | str, command: str, config: dict[str, Any] | bytes | str, *, container_id: str = "",
               netns: str = "", ifname: str = "", cni_args: str = "", path: str = str(REFERENCE_PLUGINS),
               extra_env: dict[str, str] | None = None) -> PluginRun:
    """Exec a CNI plugin with the six CNI_* variables set (possibly empty), as libcni does."""
    stdin = config if isinstance(config, bytes) else (config if isinstance(config, str) else json.dumps(config)).encode()
    env = dict(os.environ)
    env.update(CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns, CNI_IFNAME=ifname,
               CNI_ARGS=cni_args, CNI_PATH=path)
    env.update(extra_env or {})
    p = subprocess.run([str(binary)], input=stdin, capture_output=True, env=env, timeout=120)
    return PluginRun(p.returncode, p.stdout.decode(), p.stderr.decode())


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], str]]:
    """Create fresh named network namespaces (`ip netns add`); all are deleted at teardown."""
    made: list[str] = []

    def make() -> str:
        name = f"mct-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return f"/var/run/netns/{name}"

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def links_in(netns: str) -> dict[str, dict[str, Any]]:
    """Interfaces of a netns by name, from `ip -j addr` (addresses included)."""
    out = subprocess.run(["ip", "-n", Path(netns).name, "-j", "addr"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def host_third_octets(supernet: ipaddress.IPv4Network) -> set[int]:
    """Third octets of the host's IPv4 addresses inside `supernet` (a /16): a lane picks /24s outside them so
    that its bridges never overlap those of a concurrent run."""
    out = subprocess.run(["ip", "-4", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    used = set()
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if ip in supernet:
                used.add(int(str(ip).split(".")[2]))
    return used


def host_local_reservations(data_dir: Path) -> list[str]:
    """Addresses host-local holds under `data_dir`: one file per address, named by it (its other files,
    lock and last_reserved_ip.N, are bookkeeping)."""
    found = []
    for p in data_dir.rglob("*") if data_dir.exists() else []:
        try:
            ipaddress.ip_address(p.name)
        except ValueError:
            continue
        found.append(p.name)
    return sorted(found)


def host_link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def delete_host_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
def veth_master() -> Iterator[Callable[[str], str]]:
    """Create an up veth pair on the host whose first end serves as a macvlan master."""
    made: list[str] = []

    def make(name: str) -> str:
        delete_host_link(name)
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
        for n in (name, name + "p"):
            subprocess.run(["ip", "link", "set", n, "up"], check=True)
        made.append(name)
        return name

    yield make
    for name in made:
        delete_host_link(name)


@pytest.fixture(scope="session")
def reference_plugins() -> Path:
    assert (REFERENCE_PLUGINS / "bridge").is_file(), "containernetworking-plugins missing: run `make test`, which installs it"
    return REFERENCE_PLUGINS


@pytest.fixture(scope="session")
def meta_cni() -> Path:
    assert META_CNI.is_file(), f"{META_CNI} missing: install the package (make test does)"
    return META_CNI


@pytest.fixture(scope="session")
def cnitool() -> Path:
    assert CNITOOL.is_file(), f"{CNITOOL} missing: tests/infra/provision.sh builds it"
    return CNITOOL


def which(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} not installed"
    return found


def require_kube_apiserver() -> Path:
    """The cached kube-apiserver binary; its absence is a set-up failure, never a skip."""
    assert KUBE_APISERVER.is_file() and os.access(KUBE_APISERVER, os.X_OK), \
        f"{KUBE_APISERVER} missing: run `make provision` (tests/infra/provision.sh builds it, ~200 s)"
    return KUBE_APISERVER


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """A real etcd + kube-apiserver (RBAC, static tokens) on loopback for the whole session."""
    # Imported here so that sessions without API tests do not pay for importing the kubernetes client.
    from tests.infra.kube_cluster import KubeCluster

    with KubeCluster(require_kube_apiserver()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def custom(kube_cluster: KubeCluster) -> kubernetes.client.CustomObjectsApi:
    """The kubernetes client's API for custom resources (NADs, meta-ipam's objects), as the admin."""
    import kubernetes.client

    return kubernetes.client.CustomObjectsApi(kube_cluster.api_client())
