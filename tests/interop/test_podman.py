"""podman 4.3 (CNI backend, its vendored libcni) runs containers on a network whose conflist is meta-cni.

podman passes CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>, so a container named like a pod
manifest in namespace default gets that pod's secondary networks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tests.infra.podman_env import PODMAN_RUN_FLAGS, ensure_image, make_podman_env

from .conftest import LIBCNI_RESULTS, Topology, bridge_ports, macvlans_on, remove_libcni_results

pytestmark = pytest.mark.interop


@attrs.frozen
class Podman:
    """podman confined to one tmp workdir, with the meta-cni network `network` in its config dir."""

    env: dict[str, str]
    workdir: Path
    image: str
    network: str
    topo: Topology

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=180)
        if check:
            assert p.returncode == 0, f"podman {' '.join(args)} -> rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def run(self, *args: str, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("run", *PODMAN_RUN_FLAGS, "--name", name, "--network", self.network, *args, check=check)


def parse_ip_addr(text: str) -> dict[str, list[str]]:
    """busybox `ip addr` output -> interface name -> IPv4 addresses with prefix length."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        head = re.match(r"^\d+: ([^:@]+)[@:]", line)
        if head:
            current = head.group(1)
            out[current] = []
            continue
        inet = re.match(r"^\s+inet (\S+)", line)
        if inet and current:
            out[current].append(inet.group(1))
    return out


def unmount_under(root: Path) -> None:
    """Unmount whatever podman's overlay driver left mounted below `root`, deepest first."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture(params=["0.4.0", "1.0.0"])
def podman(request: pytest.FixtureRequest, topology: Callable[[int], Topology],
           reference_plugins: Path, meta_cni: Path) -> Iterator[Podman]:
    """A podman world per test; the conflist uses podman's default cniVersion 0.4.0, or 1.0.0."""
    assert shutil.which("podman") and shutil.which("runc"), "podman/runc missing: tests/infra/provision.sh installs them"
    topo = topology(20)
    network = f"mcio-{uuid.uuid4().hex[:8]}"
    net_dir = topo.root / "podman-net.d"
    topo.write_conflist(net_dir, network, request.param)
    # Short on purpose: with a workdir path longer than ~45 characters, conmon's socket paths exceed
    # the unix-socket limit and every `podman run`/`stop` stalls for its 20 s conmon timeout.
    workdir = Path(tempfile.mkdtemp(prefix="mcio-pm-", dir="/tmp"))
    env = {**os.environ, **make_podman_env(workdir, [str(topo.bin_dir), str(reference_plugins)], net_dir)}
    try:
        yield Podman(env=env, workdir=workdir, image=ensure_image(env), network=network, topo=topo)
    finally:
        # Removing the containers makes podman run meta-cni's DEL; then nothing of podman may stay mounted.
        subprocess.run(["podman", "rm", "-fa", "-t", "0"], capture_output=True, env=env, timeout=180)
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        remove_libcni_results(network)


def assert_no_leftovers(pm: Podman) -> None:
    """After the containers are gone: no cache, no host link, no address, no libcni result survived."""
    topo = pm.topo
    assert topo.cached_containers(pm.network) == [], "meta-cni cache entry left behind"
    assert bridge_ports(topo.primary_bridge) == [], "veth left on the primary bridge"
    assert bridge_ports(topo.secondary_bridge) == [], "veth left on the secondary bridge"
    assert macvlans_on(topo.master) == []
    assert not list(LIBCNI_RESULTS.glob(f"{pm.network}-*")), "libcni result cache left behind"
    assert sorted(p.name for p in topo.ipam_dir.rglob("10.241.*")) == [], "addresses not released"
    assert not list((topo.manifests_dir / "network-status").glob("*.json")), "network-status not cleared"


def assert_addresses(topo: Topology, addrs: dict[str, list[str]]) -> None:
    assert set(addrs) == {"lo", "eth0", "net1", "net2"}, addrs
    for ifname, prefix in topo.prefixes.items():
        assert len(addrs[ifname]) == 1 and addrs[ifname][0].startswith(prefix) and addrs[ifname][0].endswith("/24"), \
            (ifname, addrs[ifname])


def test_run_rm_attaches_secondaries(podman: Podman) -> None:
    topo = podman.topo
    topo.add_pod("pod-a", "br-a, mv-a")
    out = podman.run("--rm", podman.image, "ip", "addr", name="pod-a")
    assert_addresses(topo, parse_ip_addr(out.stdout))
    assert_no_leftovers(podman)


def test_two_containers_ping_over_secondaries(podman: Podman) -> None:
    topo = podman.topo
    for name in ("pod-a", "pod-b"):
        topo.add_pod(name, "br-a, mv-a")
        podman.run("-d", podman.image, "sleep", "600", name=name)
    addrs = {name: parse_ip_addr(podman("exec", name, "ip", "addr").stdout) for name in ("pod-a", "pod-b")}
    for name in addrs:
        assert_addresses(topo, addrs[name])
        # meta-cni published what the container really got
        status = json.loads(topo.status_file(name).read_text())
        assert [(s["interface"], s["ips"][0]) for s in status] == \
            [(i, addrs[name][i][0].split("/")[0]) for i in ("eth0", "net1", "net2")]
    for ifname in ("net1", "net2"):  # bridge, then macvlan (bridge mode, same master)
        target = addrs["pod-b"][ifname][0].split("/")[0]
        ping = podman("exec", "pod-a", "ping", "-c", "1", "-W", "5", target, check=False)
        assert ping.returncode == 0, f"ping over {ifname}: {ping.stdout}{ping.stderr}"
    assert len(topo.cached_containers(podman.network)) == 2
    assert len(bridge_ports(topo.secondary_bridge)) == 2

    podman("stop", "-t", "0", "pod-a", "pod-b")
    assert_no_leftovers(podman)
    podman("rm", "pod-a", "pod-b")


def test_unknown_pod_gets_primary_only(podman: Podman) -> None:
    """A container whose name matches no pod manifest is attached to the cluster network only."""
    out = podman.run("--rm", podman.image, "ip", "addr", name="not-a-pod")
    addrs = parse_ip_addr(out.stdout)
    assert set(addrs) == {"lo", "eth0"}
    assert addrs["eth0"][0].startswith(podman.topo.prefixes["eth0"])
    assert_no_leftovers(podman)


def test_missing_nad_fails_run(podman: Podman) -> None:
    topo = podman.topo
    topo.add_pod("pod-x", "br-a, no-such-net")
    out = podman.run("--rm", podman.image, "ip", "addr", name="pod-x", check=False)
    assert out.returncode != 0
    assert "NetworkAttachmentDefinition default/no-such-net not found" in out.stderr, out.stderr
    assert_no_leftovers(podman)
