"""Built-in `ipvlan` delegate: a drop-in for the reference ipvlan plugin (same config fields and defaults).

Fields: master (default: the interface of the default route, on the host or in the container with
linkInContainer; chained with a prevResult and no master: the single named interface of prevResult),
mode (l2|l3|l3s, default l2), mtu (0..master's), linkInContainer, ipam (required unless chained; without
ipam.type the prevResult's IPs and routes are configured), dns. No mac: ipvlan slaves share the master's MAC.

Kept different on purpose:
- DEL needs neither the master nor a resolvable default route / prevResult master (the reference resolves
  the master on DEL too and fails, e.g. with `chained master failure`, leaving the pod undeletable);
- a missing IPAM (no ipam.type and no prevResult IPs) is refused before the link is created (the reference
  creates the link first, then fails to exec IPAM "" and leaves the link behind);
- the mtu is checked against the master's up front (the kernel refuses it anyway with EINVAL);
- CHECK verifies the master only when the config names one (the reference looks up an empty name and fails
  when the master came from the default route or a prevResult).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import attrs

from meta.cni.errors import INTERNAL, INVALID_CONFIG, CNIError

from . import _netlink as nl
from ._child import add_with_ipam, check_link, create_link, delete_child
from ._plugin import PluginArgs, gc_via_ipam, require, status_via_ipam

# IFLA_IPVLAN_MODE values (linux/if_link.h: IPVLAN_MODE_L2, _L3, _L3S).
MODES = {"l2": 0, "l3": 1, "l3s": 2}


@attrs.frozen
class Conf:
    master: str | None
    mode: str
    mtu: int
    link_in_container: bool
    dns: dict[str, Any] = attrs.field(eq=False)


def load_conf(args: PluginArgs) -> Conf:
    c = args.config
    mode = c.get("mode") or "l2"
    require(isinstance(mode, str) and mode in MODES, f"unknown ipvlan mode: {json.dumps(mode)}")
    mtu = c.get("mtu") or 0
    require(isinstance(mtu, int) and not isinstance(mtu, bool) and mtu >= 0, f"invalid MTU {mtu!r}")
    master = c.get("master") or None
    require(master is None or isinstance(master, str), f"invalid master {master!r}")
    dns = c.get("dns") or {}
    require(isinstance(dns, dict), f"invalid dns {dns!r}")
    return Conf(master=master, mode=mode, mtu=mtu, link_in_container=bool(c.get("linkInContainer")), dns=dns)


def chained_master(prev: dict[str, Any]) -> str:
    """The master of a chained ipvlan without `master`: the one named interface of prevResult."""
    ifaces = prev.get("interfaces") or []
    if len(ifaces) == 1 and ifaces[0].get("name"):
        return str(ifaces[0]["name"])
    raise CNIError(INVALID_CONFIG, "chained master failure. PrevResult lacks a single named interface")


def cmd_add(args: PluginArgs) -> dict[str, Any]:
    conf = load_conf(args)
    prev = args.prev_result()
    if conf.master is None and prev is not None:
        conf = attrs.evolve(conf, master=chained_master(prev))
    # Without ipam.type the prevResult's IPs are used, as the reference does; with neither there is nothing.
    prev_ips = prev if not args.ipam_type and prev is not None and prev.get("ips") else None
    if not args.ipam_type and prev_ips is None:
        raise CNIError(INVALID_CONFIG, "ipvlan: ipam.type is required unless chained after a plugin whose "
                       "prevResult has IPs")
    with nl.Links(args.netns) as links:
        # txqlen 0 as the reference's: vishvananda/netlink sends its zero-valued LinkAttrs.TxQLen (the kernel
        # default would be 1000)
        iface, index = create_link(links, conf, args.ifname, "ipvlan", {"ipvlan_mode": MODES[conf.mode], "txqlen": 0})
        return add_with_ipam(args, links, iface, index, conf.dns, prev_ips=prev_ips)


cmd_del = delete_child


def cmd_check(args: PluginArgs) -> None:
    conf = load_conf(args)
    if conf.master:
        with nl.Links(args.netns) as links:
            ipr = links.ns if conf.link_in_container else links.host
            if nl.index_of(ipr, conf.master) is None:
                raise CNIError(INTERNAL, f"failed to lookup master {conf.master!r}: Link not found")
    check_link(args, "ipvlan", "IFLA_IPVLAN_MODE", MODES[conf.mode])


cmd_status = status_via_ipam
cmd_gc = gc_via_ipam


def main() -> int:
    from ._plugin import standalone_main

    return standalone_main(sys.modules[__name__], "meta-ipvlan")


if __name__ == "__main__":
    sys.exit(main())
