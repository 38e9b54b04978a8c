"""cnitool (the real libcni, as containerd and CRI-O use it) with CNI_ARGS naming a pod of the real API
server: meta-cni attaches the pod's NADs, publishes its network-status on the pod object and DEL undoes
everything; with the API server stopped, DEL still cleans up every local thing and ADD answers code 11.
Each test runs in thick mode (daemon) and thin mode (see conftest.py)."""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import META_CNI, host_local_reservations, links_in, run_plugin
from tests.interop.conftest import LIBCNI_RESULTS, bridge_ports, macvlans_on, remove_libcni_results
from tests.interop.test_cnitool import NETWORK, Client, cnitool_container_id, ipv4_of, link_kinds, pod_args

from .conftest import E2E, api_server_down, cache_files

pytestmark = [pytest.mark.interop, pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]


@pytest.fixture
def cni(e2e: E2E, cnitool: Path, clean_env: dict[str, str]) -> Iterator[Client]:
    """cnitool on a NETCONFPATH whose only conflist is meta-cni (network `metanet`), for this world's mode."""
    netconf = e2e.topo.root / "netconf"
    e2e.write_conflist(netconf, NETWORK)
    client = Client(cnitool, netconf, e2e.topo.cni_path, clean_env)
    yield client
    # libcni's result cache is global (/var/lib/cni): drop what a failed test left for our containers.
    for cid in set(client.seen):
        remove_libcni_results(NETWORK, cid)


def attached(e2e: E2E, netns: str, result: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Assert the sandbox holds eth0 (veth), net1 (veth) and net2 (macvlan), each with one IPv4 address in
    its network's subnet, as the result says; return their addresses and MACs."""
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0", "net1", "net2"], result
    links = links_in(netns)
    assert set(links) == {"lo", "eth0", "net1", "net2"}, sorted(links)
    assert link_kinds(netns) == {"lo": None, "eth0": "veth", "net1": "veth", "net2": "macvlan"}
    ips: dict[str, str] = {}
    for ifname, subnet in zip(("eth0", "net1", "net2"), e2e.topo.subnets):
        addrs = ipv4_of(links[ifname])
        assert len(addrs) == 1 and ipaddress.ip_address(addrs[0]) in ipaddress.ip_network(subnet), (ifname, addrs)
        ips[ifname] = addrs[0]
    assert [ip["address"] for ip in result["ips"]] == [f"{ips['eth0']}/24"], result["ips"]
    return ips, {i: links[i]["address"] for i in ips}


def assert_one_sandbox_on_host(e2e: E2E, cid: str, ips: dict[str, str]) -> None:
    """What one attached sandbox keeps on the host: its libcni result, its meta-cni cache entry, its three
    host-local reservations and one veth on each bridge (the macvlan lives in the sandbox)."""
    topo = e2e.topo
    assert (LIBCNI_RESULTS / f"{NETWORK}-{cid}-eth0").is_file()
    assert cache_files(topo.cni_dir) == [f"{NETWORK}/{cid}/eth0.json"]
    assert host_local_reservations(topo.ipam_dir) == sorted(ips.values())
    assert len(bridge_ports(topo.primary_bridge)) == 1 and len(bridge_ports(topo.secondary_bridge)) == 1
    assert macvlans_on(topo.master) == []


def assert_detached(e2e: E2E, netns: str, cid: str) -> None:
    """After DEL: the sandbox has only lo, the host nothing, libcni forgot the attachment."""
    assert set(links_in(netns)) == {"lo"}
    e2e.assert_host_clean()
    assert not list(LIBCNI_RESULTS.glob(f"{NETWORK}-{cid}-*")), "libcni result cache left behind"


def ok(e2e: E2E, run: Any) -> None:
    assert run.returncode == 0, f"rc {run.returncode}\n{run.stdout}\n{run.stderr}{e2e.diagnostics()}"


def test_add_check_del(e2e: E2E, cni: Client) -> None:
    """ADD attaches the pod's NADs from the API and publishes network-status on the pod; CHECK passes; DEL
    removes every interface, reservation, cache entry and libcni result, and the annotation."""
    pod = e2e.new_pod()
    netns = e2e.new_netns()
    cid = cnitool_container_id(netns)

    add = cni("add", netns, pod_args(pod))
    ok(e2e, add)
    ips, macs = attached(e2e, netns, json.loads(add.stdout))
    e2e.assert_status(pod, ips, macs)
    assert_one_sandbox_on_host(e2e, cid, ips)

    ok(e2e, cni("check", netns, pod_args(pod)))

    ok(e2e, cni("del", netns, pod_args(pod)))
    assert_detached(e2e, netns, cid)
    assert e2e.network_status(pod) is None, "DEL did not clear the network-status"
    e2e.assert_served(cid, ("ADD", "ok"), ("CHECK", "ok"), ("DEL", "ok"))


def test_api_server_down(e2e: E2E, cni: Client) -> None:
    """API server stopped: ADD fails with code 11 and attaches nothing; DEL of an attached sandbox succeeds
    and cleans every local thing. The network-status cannot be cleared then; once the API is back it is
    still on the pod (documented), and the pod's next ADD overwrites it."""
    pod, other = e2e.new_pod(), e2e.new_pod()
    netns, late = e2e.new_netns(), e2e.new_netns()
    cid, late_cid = cnitool_container_id(netns), cnitool_container_id(late)

    add = cni("add", netns, pod_args(pod))
    ok(e2e, add)
    ips, macs = attached(e2e, netns, json.loads(add.stdout))
    published = e2e.assert_status(pod, ips, macs)

    with api_server_down(e2e.cluster):
        # ADD of another pod: whatever lookup meets the API first (thin mode: the pod; the daemon answers the
        # pod and the NADs from its watch caches, but a miss, such as clusterNetwork `primary` not being a
        # NAD kube-system/primary, asks the API) and, were every lookup cached, the status patch, gives up
        # within the budget: try again later, and nothing is attached.
        failed = cni("add", late, pod_args(other))
        output = failed.stdout + failed.stderr
        assert failed.returncode != 0, output
        assert "try again later" in output and f"Kubernetes API {e2e.cluster.host} did not answer" in output, \
            output + e2e.diagnostics()
        # cnitool prints only libcni's message; the code is in the plugin's answer: exec it as libcni does.
        direct = run_plugin(META_CNI, "ADD", e2e.netconf(NETWORK), container_id=late_cid, netns=late, ifname="eth0",
                            cni_args=pod_args(other), path=e2e.topo.cni_path)
        err = direct.json
        assert direct.rc == 1 and isinstance(err, dict) and err["code"] == 11, direct.stdout + direct.stderr
        assert set(links_in(late)) == {"lo"}
        assert not list(LIBCNI_RESULTS.glob(f"{NETWORK}-{late_cid}-*"))
        assert_one_sandbox_on_host(e2e, cid, ips)  # only the first sandbox's: the failed ADDs left nothing

        ok(e2e, cni("del", netns, pod_args(pod)))
        assert_detached(e2e, netns, cid)
    e2e.assert_served(late_cid, ("ADD", "11"))
    e2e.assert_served(cid, ("ADD", "ok"), ("DEL", "ok"))

    # The API server is back. DEL could not clear the network-status while it was down: core.delete_record
    # tries within CLEAR_STATUS_BUDGET (retries included), logs a warning and lets DEL succeed from the local
    # cache, and nothing clears it later. So the pod object keeps the status of its sandbox that is gone,
    # unchanged, as README ("Kubernetes mode") documents; the pod's next ADD overwrites it.
    assert e2e.network_status(pod) == published
    assert e2e.network_status(other) is None, "the failed ADD published a status"

    again = e2e.new_netns()
    add = cni("add", again, pod_args(pod))
    ok(e2e, add)
    ips, macs = attached(e2e, again, json.loads(add.stdout))
    assert e2e.assert_status(pod, ips, macs) != published
    ok(e2e, cni("del", again, pod_args(pod)))
    assert_detached(e2e, again, cnitool_container_id(again))
    assert e2e.network_status(pod) is None
