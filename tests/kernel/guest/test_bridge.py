"""meta-bridge against the reference /usr/lib/cni/bridge with `vlan` and `isGateway`: a VLAN-filtering bridge,
the container's host port an untagged PVID member of the VLAN, and the gateway address on the `<bridge>.<vlan>`
interface. Compared: the result, the container namespace, and the bridge side (links, addresses, VLAN table,
routes); the reference runs first, then its bridge is deleted (it never deletes it itself) and ours builds it
again under the same name."""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .helpers import (OURS, REFERENCE_PLUGINS, VETH_NAME, bridge_json, compare, host_local, ip_json,
                      link_local_host_route)

BRIDGE = "mckbr0"
VLAN = 100
GW_IFACE = f"{BRIDGE}.{VLAN}"


def delete_bridge() -> None:
    # the gateway interface is a veth whose peer is a port: deleting it and the bridge removes everything
    for name in (GW_IFACE, BRIDGE):
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def bridge_side() -> dict[str, Any]:
    def link(name: str) -> dict[str, Any]:
        msg = ip_json(None, "-d", "link", "show", "dev", name)[0]
        info = msg.get("linkinfo") or {}
        data = info.get("info_data") or {}
        return {"flags": sorted(msg.get("flags", [])), "mtu": msg.get("mtu"), "operstate": msg.get("operstate"),
                "kind": info.get("info_kind"), "master": msg.get("master"),
                **{k: data.get(k) for k in ("vlan_filtering", "vlan_protocol", "vlan_default_pvid", "stp_state")
                   if info.get("info_kind") == "bridge"}}

    def label(name: str) -> str:
        return "<veth>" if VETH_NAME.match(name) else name

    ports = sorted(p["ifname"] for p in ip_json(None, "link", "show", "master", BRIDGE))
    vlans = [{"ifname": label(e["ifname"]), "vlans": e.get("vlans")}
             for e in bridge_json("vlan", "show") if e["ifname"] in (BRIDGE, *ports)]
    addrs = {name: sorted(((a["family"], a["local"], a["prefixlen"], a.get("broadcast"), a.get("scope"))
                           for a in ip_json(None, "addr", "show", "dev", name)[0]["addr_info"]
                           if a.get("scope") != "link"), key=str) for name in (BRIDGE, GW_IFACE)}
    routes = sorted((r for fam in ("-4", "-6") for r in ip_json(None, fam, "route", "show", "table", "all")
                     if r.get("dev") in (BRIDGE, GW_IFACE) and not link_local_host_route(r)), key=str)
    return {"bridge": link(BRIDGE), "gateway_iface": link(GW_IFACE), "ports": [label(p) for p in ports],
            "vlans": sorted(vlans, key=str), "addrs": addrs, "routes": routes}


def test_parity_vlan_gateway(netns_factory: Callable[[], str], tmp_path: Path) -> None:
    sides: list[dict[str, Any]] = []

    def config(data_dir: Path) -> dict[str, Any]:
        delete_bridge()  # the reference's, before ours runs
        return {"cniVersion": "1.0.0", "name": "mck-bridge", "type": "bridge", "bridge": BRIDGE, "vlan": VLAN,
                "isGateway": True, "ipam": host_local(data_dir, "10.237.30.0/24")}

    def after_add(netns: str) -> None:
        sides.append(bridge_side())

    try:
        # The Debian reference's CHECK fails on its own result here ("Interface veth… Mac doesn't match"):
        # it takes the `<bridge>.<vlan>` entry for the host veth. Ours is checked.
        ours = compare(REFERENCE_PLUGINS / "bridge", OURS / "meta-bridge", config, netns_factory, tmp_path,
                       random_mac=True, after_add=after_add, check_reference=False)[1]
    finally:
        delete_bridge()
    ref_side, our_side = sides
    assert our_side == ref_side
    assert our_side["bridge"]["vlan_filtering"] == 1
    port_vlans = [e["vlans"] for e in our_side["vlans"] if e["ifname"] == "<veth>"]
    assert len(port_vlans) == 2 and all({"vlan": VLAN, "flags": ["PVID", "Egress Untagged"]} in v for v in port_vlans)
    assert [a[1] for a in our_side["addrs"][GW_IFACE]] == ["10.237.30.1"]
    assert [i["name"] for i in ours.result["interfaces"]] == [BRIDGE, "<veth>", "net1", GW_IFACE]
    assert ours.state["link"]["kind"] == "veth"
