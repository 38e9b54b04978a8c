"""podman 4.3 (CNI backend, its vendored libcni) starts a container named like a pod of the real API server
on a network whose conflist is meta-cni. podman passes CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container
name> (no namespace: meta-cni takes `default`), so the container gets that pod's NADs, and the pod object
gets the network-status. Stopping the container runs DEL, with the API server up and down.
Each test runs in thick mode (daemon) and thin mode (see conftest.py)."""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import host_local_reservations, links_in
from tests.infra.podman_env import ensure_image, make_podman_env
from tests.interop.conftest import LIBCNI_RESULTS, bridge_ports, macvlans_on, remove_libcni_results
from tests.interop.test_cnitool import link_kinds
from tests.interop.test_podman import Podman, parse_ip_addr, unmount_under

from .conftest import E2E, api_server_down, cache_files

pytestmark = [pytest.mark.interop, pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]


@pytest.fixture
def podman(e2e: E2E, reference_plugins: Path) -> Iterator[Podman]:
    """podman confined to a short tmp workdir, with a meta-cni network (this world's mode) in its config dir.
    Teardown removes every container (podman runs meta-cni's DEL), unmounts and forgets libcni's results."""
    assert shutil.which("podman") and shutil.which("runc"), "podman/runc missing: tests/infra/provision.sh installs them"
    network = f"mce2-{uuid.uuid4().hex[:8]}"
    net_dir = e2e.topo.root / "podman-net.d"
    e2e.write_conflist(net_dir, network)
    # Short on purpose (tests/infra/podman_env.py): conmon's socket paths live below it.
    workdir = Path(tempfile.mkdtemp(prefix="mce2-pm-", dir="/tmp"))
    env = {**os.environ, **make_podman_env(workdir, [str(e2e.topo.bin_dir), str(reference_plugins)], net_dir)}
    try:
        yield Podman(env=env, workdir=workdir, image=ensure_image(env), network=network, topo=e2e.topo)
    finally:
        subprocess.run(["podman", "rm", "-fa", "-t", "0"], capture_output=True, env=env, timeout=180)
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        remove_libcni_results(network)


def start(e2e: E2E, pm: Podman, pod: str) -> tuple[str, list[dict[str, Any]]]:
    """`podman run -d` a container named `pod`; assert its interfaces and addresses as `ip addr` shows them
    inside, the link kinds and MACs as its netns shows them, and the pod's network-status. Returns the
    container ID and the published status."""
    run = pm.run("-d", pm.image, "sleep", "600", name=pod, check=False)
    assert run.returncode == 0, f"podman run -> rc {run.returncode}\n{run.stdout}\n{run.stderr}{e2e.diagnostics()}"
    cid = pm("inspect", "--format", "{{.Id}}", pod).stdout.strip()

    inside = parse_ip_addr(pm("exec", pod, "ip", "addr").stdout)
    assert set(inside) == {"lo", "eth0", "net1", "net2"}, inside
    ips: dict[str, str] = {}
    for ifname, subnet in zip(("eth0", "net1", "net2"), e2e.topo.subnets):
        assert len(inside[ifname]) == 1, (ifname, inside[ifname])
        addr = ipaddress.ip_interface(inside[ifname][0])
        assert addr.network == ipaddress.ip_network(subnet), (ifname, addr, subnet)
        ips[ifname] = str(addr.ip)

    sandbox = pm("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", pod).stdout.strip()
    assert sandbox.startswith("/run/netns/"), sandbox
    assert link_kinds(sandbox) == {"lo": None, "eth0": "veth", "net1": "veth", "net2": "macvlan"}
    macs = {ifname: link["address"] for ifname, link in links_in(sandbox).items() if ifname in ips}
    status = e2e.assert_status(pod, ips, macs)

    # What DEL will have to undo: libcni's result, meta-cni's cache entry, three reservations, two host veths.
    topo = e2e.topo
    assert (LIBCNI_RESULTS / f"{pm.network}-{cid}-eth0").is_file()
    assert cache_files(topo.cni_dir) == [f"{pm.network}/{cid}/eth0.json"]
    assert host_local_reservations(topo.ipam_dir) == sorted(ips.values())
    assert len(bridge_ports(topo.primary_bridge)) == 1 and len(bridge_ports(topo.secondary_bridge)) == 1
    assert macvlans_on(topo.master) == []
    return cid, status


def stop(e2e: E2E, pm: Podman, pod: str, cid: str) -> None:
    """`podman stop`: podman runs meta-cni's DEL while tearing the network down; it only logs a failed
    teardown ("Unable to clean up network"), so success is what is left: nothing."""
    out = pm("stop", "-t", "0", pod, check=False)
    assert out.returncode == 0, f"podman stop -> rc {out.returncode}\n{out.stdout}\n{out.stderr}{e2e.diagnostics()}"
    assert "error" not in out.stderr.lower(), out.stderr + e2e.diagnostics()
    e2e.assert_host_clean()
    assert not list(LIBCNI_RESULTS.glob(f"{pm.network}-{cid}-*")), "libcni result cache left behind"
    e2e.assert_served(cid, ("ADD", "ok"), ("DEL", "ok"))


def test_run_and_stop(e2e: E2E, podman: Podman) -> None:
    """The container gets eth0 + the pod's two NADs; the pod object says so; stop undoes everything,
    the network-status annotation included."""
    pod = e2e.new_pod()
    cid, _ = start(e2e, podman, pod)
    stop(e2e, podman, pod, cid)
    assert e2e.network_status(pod) is None, "DEL did not clear the network-status"
    podman("rm", pod)


def test_stop_while_the_api_server_is_down(e2e: E2E, podman: Podman) -> None:
    """DEL needs only meta-cni's local cache: with the API server stopped, stopping the container still
    removes every interface, reservation, cache entry and libcni result."""
    pod = e2e.new_pod()
    cid, published = start(e2e, podman, pod)
    with api_server_down(e2e.cluster):
        stop(e2e, podman, pod, cid)
    # The API server is back. The network-status could not be cleared while it was down (core.delete_record
    # retries within CLEAR_STATUS_BUDGET, logs a warning, and DEL succeeds anyway) and nothing clears it later:
    # the pod object keeps the status of a sandbox that is gone, unchanged, as README ("Kubernetes mode")
    # documents; the pod's next ADD overwrites it (tests/e2e/test_cnitool.py::test_api_server_down shows that).
    assert e2e.network_status(pod) == published
    podman("rm", pod)
