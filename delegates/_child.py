"""What macvlan and ipvlan share: a child link of a master created straight in the pod namespace,
its IPAM and address configuration, and its CHECK."""
from __future__ import annotations

import os
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from meta.cni.errors import INTERNAL, INVALID_CONFIG, CNIError
from meta.netns import entered, open_netns

from . import _netlink as nl
from ._plugin import PluginArgs, ipam_add, ipam_check, ipam_del


class ChildConf(Protocol):
    master: str | None
    mtu: int
    link_in_container: bool


def _master(conf: ChildConf, links: nl.Links, kind: str) -> tuple[int, int]:
    """Index and MTU of the master, where it lives (host, or the container with linkInContainer)."""
    ipr = links.ns if conf.link_in_container else links.host
    name = conf.master or nl.default_route_ifname(ipr)
    if not name:
        raise CNIError(INVALID_CONFIG, f"{kind}: no master given and no default route interface found")
    msg = nl.link_by_name(ipr, name)
    if msg is None:
        raise CNIError(INVALID_CONFIG, f"{kind}: failed to lookup master {name!r}: Link not found")
    return int(msg["index"]), int(msg.get("mtu"))


def create_link(links: nl.Links, conf: ChildConf, ifname: str, kind: str,
                extra: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Create a macvlan/ipvlan child of the master straight in the pod namespace under a temporary name
    (so it never clashes with host names), rename it to `ifname`; the result interface and its index."""
    master_idx, master_mtu = _master(conf, links, kind)
    if conf.mtu and conf.mtu > master_mtu:
        raise CNIError(INVALID_CONFIG, f"invalid MTU {conf.mtu}, must be [0, master MTU({master_mtu})]")
    nl.ensure_no_link(links.ns, ifname, links.netns)
    tmp = nl.random_name()
    kw: dict[str, Any] = {"ifname": tmp, "kind": kind, "link": master_idx, **extra}
    if conf.mtu:
        kw["mtu"] = conf.mtu
    if getattr(conf, "mac", None):
        kw["address"] = conf.mac
    try:
        if conf.link_in_container:
            links.ns.link("add", **kw)
        else:
            fd = open_netns(links.netns)
            try:
                links.host.link("add", net_ns_fd=fd, **kw)
            finally:
                os.close(fd)
    except NetlinkError as e:
        raise CNIError(INTERNAL, f"failed to create {kind}: {e.args[1] if len(e.args) > 1 else e}") from None
    msg = nl.link_by_name(links.ns, tmp)
    assert msg is not None
    idx = int(msg["index"])
    try:
        links.ns.link("set", index=idx, ifname=ifname)
    except NetlinkError as e:
        links.ns.link("del", index=idx)
        raise CNIError(INTERNAL, f"failed to rename {kind} to {ifname!r}: {e}") from None
    # A rename keeps the MAC: the message read under the temporary name has it.
    return {"name": ifname, "mac": msg.get("address"), "sandbox": links.netns}, idx


def add_with_ipam(args: PluginArgs, links: nl.Links, iface: dict[str, Any], index: int, dns: dict[str, Any],
                  prev_ips: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shared tail of macvlan/ipvlan ADD: IPAM, notify sysctls, addresses and routes; undo on failure.
    `prev_ips` (ipvlan chained without ipam.type): a prevResult whose IPs and routes are configured
    instead of calling IPAM."""
    result: dict[str, Any] = {"cniVersion": "1.1.0", "interfaces": [iface]}
    try:
        if args.ipam_type or prev_ips is not None:
            if args.ipam_type:
                ipam = ipam_add(args)
                if not ipam.get("ips"):
                    raise CNIError(INTERNAL, "IPAM plugin returned missing IP config")
            else:
                assert prev_ips is not None
                ipam = prev_ips
            result["ips"] = [dict(ip, interface=0) for ip in ipam["ips"]]
            if ipam.get("routes"):
                result["routes"] = ipam["routes"]
            try:
                with entered(links.netns):
                    # Gratuitous ARP / unsolicited NA when the address comes up, as the reference sets.
                    nl.sysctl(f"net/ipv4/conf/{args.ifname}/arp_notify", "1")
                    nl._try_sysctl(f"net/ipv6/conf/{args.ifname}/ndisc_notify", "1")
                nl.configure_iface(links, args.ifname, result, 0, link_index=index)
            except BaseException:
                if args.ipam_type:
                    ipam_del(args)
                raise
        else:
            links.ns.link("set", index=index, state="up")
    except BaseException:
        nl.delete_in_netns(args.netns, args.ifname)
        raise
    if dns:
        result["dns"] = dns
    return result


def check_link(args: PluginArgs, kind: str, mode_attr: str, mode: Any) -> dict[str, Any]:
    """Shared CHECK of macvlan/ipvlan: the prevResult interface exists with that kind, mode and MAC."""
    prev = args.prev_result()
    if prev is None:
        raise CNIError(INVALID_CONFIG, "Required prevResult missing")
    if args.ipam_type:
        ipam_check(args)
    ifaces = prev.get("interfaces", [])
    pos = next((i for i, f in enumerate(ifaces) if f.get("name") == args.ifname and f.get("sandbox") == args.netns), None)
    if pos is None:
        raise CNIError(INTERNAL, f"{args.ifname} not found in prevResult interfaces")
    with nl.Links(args.netns) as links:
        idx = nl.index_of(links.ns, args.ifname)
        if idx is None:
            raise CNIError(INTERNAL, f"container interface {args.ifname} not found")
        msg = nl.link(links.ns, idx)
        if nl.kind(msg) != kind:
            raise CNIError(INTERNAL, f"container interface {args.ifname} is {nl.kind(msg)}, not {kind}")
        if nl.info_data(msg, mode_attr) != mode:
            raise CNIError(INTERNAL, f"container {kind} mode {nl.info_data(msg, mode_attr)} does not match {mode}")
        if ifaces[pos].get("mac") and str(msg.get("address")).lower() != ifaces[pos]["mac"].lower():
            raise CNIError(INTERNAL, f"container {kind} MAC {msg.get('address')} does not match {ifaces[pos]['mac']}")
        nl.check_ips_and_routes(links.ns, args.ifname, prev, pos)
    return prev


def delete_child(args: PluginArgs) -> None:
    """DEL of macvlan/ipvlan: IPAM first, as the reference does (the address is released even when the
    namespace is gone), then the link; the master is never needed."""
    if args.ipam_type:
        ipam_del(args)
    nl.delete_in_netns(args.netns, args.ifname)
