"""End to end: NADs and pods in a real kube-apiserver (the session's `kube_cluster`), meta-cni reading them
through its Kubernetes source, driven by real CNI clients (podman 4.3 with its CNI backend, cnitool), in
both modes:

- thick: a real `metactl daemon` subprocess (watch caches, `--kubeconfig` = the cluster's admin kubeconfig)
  on a unix socket, and the config's `daemonSocket` pointing at it, so `meta-cni` is only the shim;
- thin: no `daemonSocket`, everything runs in the exec'd `meta-cni` process.

One `E2E` world per test: the primary network is a conf in meta-cni's confDir (reference bridge +
host-local, exec'd); NAD 1 is a secondary bridge of the built-in type `meta-bridge` (in-process, with the
reference host-local exec'd as its IPAM); NAD 2 a macvlan of the reference plugin with host-local. The NADs
and the pods are in namespace `default` (podman passes only K8S_POD_NAME) under names unique per test; the
pods are bound to a node of their own (`spec.nodeName`) so that the daemon's pod watch cache holds them.

Host link names start with `mce2` and subnets are inside 10.244.0.0/16, because other suites run on the same
host with other ranges. Teardown removes everything, also after a failure: whatever meta-cni still has in
its cache is DELeted (thin, straight from the cache), then the daemon, pods, NADs, links and files go.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import kubernetes.client
import pytest

from tests.conftest import META_CNI, delete_host_link, host_local_reservations, host_third_octets, run_plugin
from tests.daemon.conftest import Daemon
from tests.infra.kube_cluster import KubeCluster
from tests.interop.conftest import Topology, bridge_ports, clean_env, macvlans_on  # noqa: F401 (clean_env: fixture)
from tests.kube.conftest import GROUP, PLURAL, VERSION
from tests.kube.test_source import create_nad, create_pod, delete_pod, pod_annotations

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
SUPERNET = ipaddress.ip_network("10.244.0.0/16")
NETWORKS = "k8s.v1.cni.cncf.io/networks"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
NAMESPACE = "default"
PRIMARY = "primary"
# Budget of one Kubernetes API operation, retries included (the config's apiTimeout in thin mode, the
# daemon's --api-timeout in thick mode): how long an ADD waits for an API server that is down before it
# answers code 11. A budget of the code under test, not a timing assertion.
API_TIMEOUT = 5
MODES = ("thick", "thin")


def cache_files(cni_dir: Path) -> list[str]:
    """What meta-cni holds in its cniDir for attachments: cache entries `<network>/<container>/<ifname>.json`
    and spooled DELs `pending-del/*.del`. The top-level dot files (`.schema-memo.json`) are not per pod."""
    if not cni_dir.is_dir():
        return []
    return sorted(str(p.relative_to(cni_dir)) for p in cni_dir.rglob("*")
                  if p.is_file() and not (p.parent == cni_dir and p.name.startswith(".")))


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    """The session's API server with the NAD CRD from crds/ (Established)."""
    kube_cluster.apply(CRDS)
    return kube_cluster


@contextlib.contextmanager
def api_server_down(cluster: KubeCluster) -> Iterator[None]:
    """kube-apiserver stopped (etcd keeps the data) for the block, started again (and ready) afterwards,
    also when the block fails."""
    cluster.stop_apiserver()
    try:
        yield
    finally:
        cluster.start_apiserver()


@attrs.define
class E2E:
    """One test's world: the meta-cni installation (paths, links, subnets), its NADs and pods in the API
    server, the daemon in thick mode, and the assertions every test shares."""

    mode: str                          # "thick" or "thin"
    cluster: KubeCluster
    topo: Topology                     # the paths, bridges, macvlan master and subnets (primary, net1, net2)
    node: str                          # spec.nodeName of our pods; the daemon's --node-name
    nads: tuple[str, str]              # (bridge NAD, macvlan NAD) in namespace default
    daemon: Daemon | None              # thick mode only
    new_netns: Callable[[], str]       # a fresh named netns (deleted after this world's teardown)
    pods: list[str] = attrs.field(factory=list)
    networks: list[str] = attrs.field(factory=list)  # CNI network names of the conflists written

    @property
    def socket(self) -> Path:
        return self.topo.root / "d.sock"

    def meta_plugin(self) -> dict[str, Any]:
        """The meta-cni plugin entry of a conflist; thick mode adds `daemonSocket`."""
        plugin: dict[str, Any] = {
            "type": "meta-cni", "clusterNetwork": PRIMARY, "confDir": str(self.topo.conf_dir),
            "cniDir": str(self.topo.cni_dir), "deviceInfoDir": str(self.topo.devinfo_dir),
            "kubeconfig": str(self.cluster.kubeconfig), "apiTimeout": API_TIMEOUT,
        }
        if self.daemon is not None:
            plugin["daemonSocket"] = str(self.daemon.socket)
        return plugin

    def netconf(self, network: str, cni_version: str = "1.0.0") -> dict[str, Any]:
        """What libcni hands the plugin of a one-plugin conflist (name and cniVersion come from the list)."""
        return {"cniVersion": cni_version, "name": network, **self.meta_plugin()}

    def write_conflist(self, directory: Path, network: str, cni_version: str = "1.0.0") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{network}.conflist"
        path.write_text(json.dumps({"cniVersion": cni_version, "name": network, "plugins": [self.meta_plugin()]}))
        self.networks.append(network)
        return path

    def new_pod(self, prefix: str = "mce2") -> str:
        """A Pod in namespace default asking for both NADs (`k8s.v1.cni.cncf.io/networks`); its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        create_pod(self.cluster, NAMESPACE, name, {NETWORKS: ",".join(self.nads)}, node=self.node)
        self.pods.append(name)
        return name

    def network_status(self, pod: str) -> list[dict[str, Any]] | None:
        """The pod object's network-status annotation as the API server has it (None when absent)."""
        value = pod_annotations(self.cluster, NAMESPACE, pod).get(NETWORK_STATUS)
        return json.loads(value) if value is not None else None

    def expected_entries(self) -> list[tuple[str, str, bool]]:
        """(name, interface, default) of the network-status, in attachment order."""
        return [(PRIMARY, "eth0", True), (f"{NAMESPACE}/{self.nads[0]}", "net1", False),
                (f"{NAMESPACE}/{self.nads[1]}", "net2", False)]

    def assert_served(self, container_id: str, *expected: tuple[str, str]) -> None:
        """Thick mode: the daemon itself served these (command, result) for the container, per its log (an
        unreachable daemon would have made the shim fail the ADD, or spool the DEL). Thin mode: nothing to see."""
        if self.daemon is None:
            return
        served = [(e.get("command"), e.get("result")) for e in self.daemon.log_lines()
                  if e.get("msg") == "request served" and e.get("containerID") == container_id]
        for pair in expected:
            assert pair in served, f"daemon did not serve {pair} for {container_id}: {served}{self.diagnostics()}"

    def diagnostics(self) -> str:
        """For assertion messages: the tail of the daemon's log (thick mode)."""
        if self.daemon is None:
            return ""
        return "\n--- daemon log (tail) ---\n" + "\n".join(self.daemon.log_text().splitlines()[-30:])

    def assert_status(self, pod: str, ips: dict[str, str], macs: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The pod's network-status names the three attachments with the addresses (and MACs) the sandbox has."""
        status = self.network_status(pod)
        assert status is not None, f"no {NETWORK_STATUS} on pod {NAMESPACE}/{pod}" + self.diagnostics()
        assert [(s["name"], s["interface"], s["default"]) for s in status] == self.expected_entries(), status
        assert {s["interface"]: s.get("ips") for s in status} == {i: [ip] for i, ip in ips.items()}, status
        if macs is not None:
            assert {s["interface"]: s.get("mac") for s in status} == macs, status
        return status

    def assert_host_clean(self) -> None:
        """Nothing of any sandbox left on the host: no veth on our bridges, no macvlan on the master, no
        host-local reservation, no meta-cni cache entry or spooled DEL."""
        topo = self.topo
        assert bridge_ports(topo.primary_bridge) == [], "host veth left on the primary bridge"
        assert bridge_ports(topo.secondary_bridge) == [], "host veth left on the secondary bridge"
        assert macvlans_on(topo.master) == [], "macvlan left in the host netns"
        assert host_local_reservations(topo.ipam_dir) == [], "host-local still holds addresses"
        assert cache_files(topo.cni_dir) == [], "meta-cni cache (cniDir) not empty"

    # --- teardown -------------------------------------------------------------------------------------

    def delete_leftovers(self) -> None:
        """After a failed test: DEL every attachment meta-cni still has cached (thin, from the cache; the
        daemon need not run), so no veth, macvlan or reservation survives the test."""
        for network in self.networks:
            for entry in sorted((self.topo.cni_dir / network).glob("*/*.json")):
                try:
                    record = json.loads(entry.read_text())
                except (OSError, ValueError):
                    continue
                pod = record.get("pod") or {}
                plugin = {k: v for k, v in self.netconf(network).items() if k != "daemonSocket"}
                args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod['namespace']};K8S_POD_NAME={pod['name']}" \
                    if pod.get("name") and pod.get("namespace") else ""
                run_plugin(META_CNI, "DEL", plugin, container_id=record["containerId"], netns=record.get("netns", ""),
                           ifname=record["ifName"], cni_args=args, path=self.topo.cni_path)


def delete_nad(cluster: KubeCluster, name: str) -> None:
    custom = kubernetes.client.CustomObjectsApi(cluster.api_client())
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture(params=MODES)
def e2e(request: pytest.FixtureRequest, cluster: KubeCluster, meta_cni: Path, reference_plugins: Path,
        veth_master: Callable[[str], str], netns_factory: Callable[[], str]) -> Iterator[E2E]:
    """One world per test, in thick mode (a ready daemon) or thin mode. It depends on netns_factory so that
    the namespaces outlive its teardown (leftover DELs run with their netns still there)."""
    mode: str = request.param
    tag = uuid.uuid4().hex[:6]
    # Short, under /tmp: the daemon's socket path must stay far below the unix-socket limit.
    root = Path(tempfile.mkdtemp(prefix="mce2-", dir="/tmp"))
    world: E2E | None = None
    try:
        for d in ("bin", "conf", "manifests", "cache", "ipam", "devinfo"):
            (root / d).mkdir()
        (root / "bin" / "meta-cni").symlink_to(meta_cni)
        octets = random.sample(sorted(set(range(1, 255)) - host_third_octets(SUPERNET)), 3)
        subnets = tuple(f"10.244.{o}.0/24" for o in octets)
        topo = Topology(root=root, bin_dir=root / "bin", conf_dir=root / "conf", manifests_dir=root / "manifests",
                        cni_dir=root / "cache", ipam_dir=root / "ipam", devinfo_dir=root / "devinfo",
                        primary_bridge=f"mce2{tag}p", secondary_bridge=f"mce2{tag}s", master=veth_master(f"mce2{tag}m"),
                        subnets=(subnets[0], subnets[1], subnets[2]))
        nads = (f"mce2-br-{tag}", f"mce2-mv-{tag}")
        world = E2E(mode=mode, cluster=cluster, topo=topo, node=f"mce2-node-{tag}", nads=nads, daemon=None,
                    new_netns=netns_factory)

        def ipam(subnet: str) -> dict[str, Any]:
            return {"type": "host-local", "subnet": subnet, "dataDir": str(topo.ipam_dir)}

        (topo.conf_dir / "primary.conf").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": PRIMARY, "type": "bridge", "bridge": topo.primary_bridge,
            "isGateway": True, "ipam": ipam(subnets[0])}))
        create_nad(cluster, NAMESPACE, nads[0], {"cniVersion": "1.0.0", "type": "meta-bridge",
                                                 "bridge": topo.secondary_bridge, "ipam": ipam(subnets[1])})
        create_nad(cluster, NAMESPACE, nads[1], {"cniVersion": "1.0.0", "type": "macvlan", "master": topo.master,
                                                 "mode": "bridge", "ipam": ipam(subnets[2])})
        if mode == "thick":
            # Daemon.start() polls /healthz, then /readyz (watch caches synced, spooled DELs replayed) over
            # the socket: no ADD before the daemon is ready. The last --metrics-address wins: none.
            world.daemon = Daemon(world.socket, root / "daemon.log", [
                "--metrics-address", "", "--kubeconfig", str(cluster.kubeconfig), "--node-name", world.node,
                "--cni-dir", str(topo.cni_dir), "--api-timeout", str(API_TIMEOUT)]).start()
        yield world
    finally:
        if not cluster.apiserver_running:
            cluster.start_apiserver()
        if world is not None:
            world.delete_leftovers()
            if world.daemon is not None and world.daemon.running:
                try:
                    world.daemon.stop()
                except Exception:
                    world.daemon.kill()
            for pod in world.pods:
                delete_pod(cluster, NAMESPACE, pod)
            for nad in world.nads:
                delete_nad(cluster, nad)
            for bridge in (world.topo.primary_bridge, world.topo.secondary_bridge):
                for port in bridge_ports(bridge):
                    delete_host_link(port)
                delete_host_link(bridge)
        shutil.rmtree(root, ignore_errors=True)
