"""meta-macvlan against the reference /usr/lib/cni/macvlan on a dummy master (the host lane uses veth
masters): same config, same result and namespace state, MACs aside (random on both sides)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .helpers import OURS, REFERENCE_PLUGINS, compare, host_local


def test_parity(macvlan_master: str, netns_factory: Callable[[], str], tmp_path: Path) -> None:
    def config(data_dir: Path) -> dict:
        return {"cniVersion": "1.0.0", "name": "mck-macvlan", "type": "macvlan", "master": macvlan_master,
                "mode": "bridge", "mtu": 1450, "ipam": host_local(data_dir, "10.237.20.0/24")}

    ours = compare(REFERENCE_PLUGINS / "macvlan", OURS / "meta-macvlan", config, netns_factory, tmp_path,
                   random_mac=True)[1]
    assert ours.state["link"]["kind"] == "macvlan" and ours.state["link"]["info_data"]["mode"] == "bridge"
    assert ours.state["link"]["mtu"] == 1450
    assert ours.state["sysctls"]["net/ipv4/conf/net1/arp_notify"] == "1"
