"""Small netlink helpers shared by the built-in delegates (pyroute2's messages over _rtnl.Rtnl), in the spirit
of the reference plugins' pkg/ip and pkg/ipam: veth creation, address and route configuration, settling IPv6
DAD, sysctls inside the namespace, and the checks CHECK needs."""
from __future__ import annotations

import errno
import ipaddress
import os
import threading
import time
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from meta.cni.errors import INTERNAL, CNIError
from meta.netns import NetnsGone, entered

from ._rtnl import Rtnl

IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
AF_INET6 = 10
RT_SCOPE_UNIVERSE = 0
RTPROT_BOOT = 3  # what the reference plugins (vishvananda/netlink) and `ip route add` use


_local = threading.local()


def host_socket() -> Rtnl:
    """This thread's netlink socket in the host namespace, kept for the life of the process (a node daemon
    makes many attachments). Thread-local because one socket serves one request at a time (parallel
    attachments)."""
    sock = getattr(_local, "host", None)
    if sock is None:
        sock = _local.host = Rtnl()
    return sock


class Links:
    """Netlink sockets of the host and of one pod namespace (opened inside it, so they stay bound to it)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.host = host_socket()
        self._ns: Rtnl | None = None

    @property
    def ns(self) -> Rtnl:
        if self._ns is None:
            with entered(self.netns):
                self._ns = Rtnl()
        return self._ns

    def close(self) -> None:
        if self._ns is not None:
            self._ns.close()

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def link_by_name(ipr: Rtnl, name: str) -> Any | None:
    """The link message of `name`, or None: one RTM_GETLINK by name (link_lookup() would dump and filter
    every link of the namespace)."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise


def index_of(ipr: Rtnl, name: str) -> int | None:
    msg = link_by_name(ipr, name)
    return None if msg is None else int(msg["index"])


def link(ipr: Rtnl, index: int) -> Any:
    return ipr.get_links(index)[0]


def kind(msg: Any) -> str | None:
    return msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def info_data(msg: Any, attr: str) -> Any:
    return msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", attr)


def random_name(prefix: str = "veth") -> str:
    return f"{prefix}{os.urandom(4).hex()}"


def default_route_ifname(ipr: Rtnl) -> str | None:
    """The interface of the first IPv4 default route (the reference plugins' master fallback)."""
    for r in ipr.get_routes(family=2, table=254):
        if r.get("dst_len") == 0 and r.get("oif"):
            return str(link(ipr, r.get("oif")).get("ifname"))
    return None


def sysctl(key: str, value: str) -> None:
    """Write /proc/sys/<key>; inside `entered(netns)` this is the namespace's value."""
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def read_sysctl(key: str) -> str:
    with open(f"/proc/sys/{key}") as f:
        return f.read().strip()


def ensure_no_link(ipr: Rtnl, name: str, netns: str) -> None:
    if index_of(ipr, name) is not None:
        raise CNIError(INTERNAL, f"container interface {name!r} already exists in {netns}")


def configure_iface(links: Links, ifname: str, result: dict[str, Any], iface_index: int, settle: bool = True,
                    link_index: int | None = None) -> None:
    """The reference pkg/ipam ConfigureIface: the result's addresses for `iface_index` on `ifname`, link up,
    wait for IPv6 DAD (when `settle`), then the routes (a route without gw goes via the IP's gateway).
    `link_index`: the link's index when the caller has it already (one netlink request fewer)."""
    ns = links.ns
    idx = link_index if link_index is not None else index_of(ns, ifname)
    if idx is None:
        raise CNIError(INTERNAL, f"failed to find interface {ifname!r} in {links.netns}")
    ips = [ip for ip in result.get("ips", []) if ip.get("interface") in (None, iface_index)]
    has_v6 = any(":" in ip["address"] for ip in ips)
    if has_v6:
        with entered(links.netns):
            for name in ("lo", ifname):
                _try_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "0")
    gateways: dict[int, str] = {}
    for ip in ips:
        iface = ipaddress.ip_interface(ip["address"])
        kw: dict[str, Any] = {}
        if iface.version == 4 and iface.network.prefixlen < 31:
            kw["broadcast"] = str(iface.network.broadcast_address)  # as vishvananda/netlink's AddrAdd does
        try:
            ns.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise CNIError(INTERNAL, f"failed to add IP addr {ip['address']} to {ifname!r}: {e}") from None
        if ip.get("gateway"):
            gateways[iface.version] = ip["gateway"]
    ns.link("set", index=idx, state="up")
    if has_v6 and settle:
        settle_addresses(ns, idx, ifname)
    for r in result.get("routes", []):
        dst = ipaddress.ip_network(r["dst"], strict=False)
        gw = r.get("gw") or gateways.get(dst.version)
        kw: dict[str, Any] = {"dst": str(dst), "oif": idx, "proto": RTPROT_BOOT}
        if dst.version == 6:
            kw["family"] = AF_INET6
        if gw:
            kw["gateway"] = gw
        for key, attr in (("priority", "priority"), ("table", "table"), ("scope", "scope")):
            if r.get(key) is not None:
                kw[attr] = r[key]
        try:
            ns.route("add", **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise CNIError(INTERNAL, f"failed to add route {r} on {ifname!r}: {e}") from None


def _try_sysctl(key: str, value: str) -> None:
    try:
        sysctl(key, value)
    except OSError:
        pass  # kernels without IPv6 have no such key; the address add will then fail clearly


def settle_addresses(ns: Rtnl, index: int, ifname: str, timeout: float = 5.0) -> None:
    """Wait until no IPv6 address of the link is tentative (DAD done), as the reference SettleAddresses."""
    deadline = time.monotonic() + timeout
    while True:
        addrs = [a for a in ns.get_addr(index=index, family=AF_INET6) if a.get("scope") == RT_SCOPE_UNIVERSE]
        if any(a["flags"] & IFA_F_DADFAILED for a in addrs):
            raise CNIError(INTERNAL, f"{ifname}: IPv6 duplicate address detection failed")
        if not any(a["flags"] & IFA_F_TENTATIVE for a in addrs):
            return
        if time.monotonic() > deadline:
            raise CNIError(INTERNAL, f"{ifname}: IPv6 addresses still tentative after {timeout:g}s")
        time.sleep(0.05)


def delete_in_netns(netns: str, ifname: str) -> None:
    """Delete `ifname` in the namespace; a missing namespace or link is success (DEL is idempotent)."""
    if not netns:
        return
    try:
        with entered(netns):
            ns = Rtnl()
    except NetnsGone:
        return
    try:
        idx = index_of(ns, ifname)
        if idx is not None:
            try:
                ns.link("del", index=idx)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise CNIError(INTERNAL, f"failed to delete {ifname!r} in {netns}: {e}") from None
    finally:
        ns.close()


def check_ips_and_routes(ns: Rtnl, ifname: str, result: dict[str, Any], iface_index: int) -> None:
    """CHECK: every address of the result on the interface, every route of the result present."""
    idx = index_of(ns, ifname)
    if idx is None:
        raise CNIError(INTERNAL, f"interface {ifname!r} not found")
    have = {(a.get("address"), a.get("prefixlen")) for a in ns.get_addr(index=idx)}
    for ip in result.get("ips", []):
        if ip.get("interface") not in (None, iface_index):
            continue
        iface = ipaddress.ip_interface(ip["address"])
        if (str(iface.ip), iface.network.prefixlen) not in have:
            raise CNIError(INTERNAL, f"{ifname}: expected address {ip['address']} is missing")
    routes = [(r.get("dst"), r.get("dst_len")) for fam in (2, AF_INET6) for r in ns.get_routes(family=fam)]
    for r in result.get("routes", []):
        dst = ipaddress.ip_network(r["dst"], strict=False)
        key = (None if dst.prefixlen == 0 else str(dst.network_address), dst.prefixlen)
        if key not in routes:
            raise CNIError(INTERNAL, f"{ifname}: expected route to {r['dst']} is missing")
