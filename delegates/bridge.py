"""Built-in `bridge` delegate: a drop-in for the reference bridge plugin (same config fields and defaults).

Fields: bridge ("cni0"), isGateway, isDefaultGateway (implies isGateway), forceAddress, ipMasq, mtu, hairpinMode,
promiscMode, vlan (0..4094), vlanTrunk, preserveDefaultVlan (default true), macspoofchk, enabledad,
disableContainerInterface, portIsolation, mac (runtimeConfig.mac > args.cni.mac > CNI_ARGS MAC), ipam (an empty
ipam makes an L2-only port), dns (replaces the IPAM's DNS when set).

ADD follows the reference step by step: ensure the bridge (accept_ra=0, up), a veth whose container end is created
straight in the pod namespace and whose host end `veth<8 hex>` joins the bridge in the same netlink request
(hairpin, isolation, VLANs), the spoof check, IPAM, the container's sysctls, addresses and routes, the gateway
address on the bridge (pinning the bridge MAC), forwarding, ipMasq, the host port's oper state, then the MACs of
the result refreshed. Errors carry the reference's messages and code 999.

Kept different on purpose:
- a failed ADD removes what it made (veth, ipMasq and spoof-check rules) besides releasing the IPs; the reference
  leaves the veth and any ipMasq rules for the runtime's DEL;
- DEL removes the ipMasq chain even when the container link or the namespace is already gone (found by its name),
  and the spoof-check rules when the namespace is gone; the reference leaks both then;
- ipMasq rules are written with one `iptables-restore --noflush` per family (the same rules the reference's
  iptables calls make), falling back to the reference's command sequence when the chain already exists; a chain
  still used by another attachment of the same network and container is kept instead of failing DEL;
- a bridge whose ports all left has the all-zero MAC; isGateway then pins the MAC it has once this ADD's port
  joined (the reference tries to set the zero MAC and fails);
- macspoofchk: the drop rule is appended after the MAC rule; the reference adds it with `index 0` (after the
  chain's first rule) in the nft batch that also flushes the chain, so when that chain had rules (the same
  container ID and ifname attached again without DEL) it lands before the new MAC rule and the port drops all
  its frames. Without the nft command ADD fails before anything is made (the reference fails running nft after
  making the veth);
- CHECK of an L2-only config does not call an IPAM plugin (the reference execs one with an empty type and fails);
- the host port's oper state is not awaited with disableContainerInterface (the port can never come up).
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

import attrs
from pyroute2.netlink.exceptions import NetlinkError

from meta.cni import version as cniversion
from meta.cni.errors import INTERNAL, CNIError
from meta.netns import NetnsGone, entered, open_netns

from . import _netlink as nl
from ._netlink import link_by_name
from ._rtnl import Rtnl
from ._plugin import PluginArgs, gc_via_ipam, ipam_add, ipam_check, ipam_del, status_via_ipam

DEFAULT_BRIDGE = "cni0"
OPER_UP_WAITS_MS = (0, 50, 500, 1000, 1000)  # the reference's bridge-port state polling
VETH_NAME_TRIES = 10
IFF_UP = 0x1
IFF_PROMISC = 0x100
AF_INET = 2
AF_INET6 = 10
BRPORT_MODE_HAIRPIN = 1
SPOOFCHK_TABLE = "nat"
SPOOFCHK_BASE_CHAIN = "PREROUTING"


def _fail(msg: str) -> CNIError:
    """Errors as the reference plugins report them: plain errors become code 999."""
    return CNIError(INTERNAL, msg)


def _errstr(e: BaseException) -> str:
    """An errno text as Go prints it ("file exists", not "File exists")."""
    if isinstance(e, NetlinkError):
        text = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else os.strerror(e.code)
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        return str(e)
    return text[:1].lower() + text[1:]


def go_quote(s: str) -> str:
    """Go's %q for the strings CNI allows (network names, container IDs)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# --- configuration ------------------------------------------------------------------------------------------


@attrs.frozen
class Conf:
    name: str
    bridge: str
    is_gateway: bool
    is_default_gateway: bool
    force_address: bool
    ip_masq: bool
    mtu: int
    hairpin_mode: bool
    promisc_mode: bool
    vlan: int
    vlan_trunk: tuple[int, ...]
    vlan_filtering: bool
    preserve_default_vlan: bool
    macspoofchk: bool
    enable_dad: bool
    disable_container_interface: bool
    port_isolation: bool
    mac: str | None
    dns: dict[str, Any] = attrs.field(eq=False)


def _typed(c: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    v = c.get(key)
    if v is None:
        return default
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)) or kind is not int and not isinstance(v, kind):
        got = type(v).__name__.replace("str", "string").replace("dict", "object").replace("list", "array")
        want = {bool: "bool", int: "int", str: "string", dict: "object", list: "array"}[kind]
        raise _fail(f"failed to load netconf: json: cannot unmarshal {got} into Go struct field NetConf.{key} "
                    f"of type {want}")
    return v


def _trunk_vid(item: dict[str, Any], key: str) -> int | None:
    v = item.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise _fail(f"failed to load netconf: json: cannot unmarshal {type(v).__name__} into Go struct field "
                    f"VlanTrunk.vlanTrunk.{key} of type int")
    return v


def collect_vlan_trunk(trunk: list[Any] | None) -> tuple[int, ...]:
    """The reference's collectVlanTrunk: the sorted, de-duplicated VIDs of `vlanTrunk`."""
    if not trunk:
        return ()
    vids: set[int] = set()
    for item in trunk:
        if not isinstance(item, dict):
            raise _fail("failed to load netconf: json: cannot unmarshal vlanTrunk entry into Go struct VlanTrunk")
        lo, hi, one = _trunk_vid(item, "minID"), _trunk_vid(item, "maxID"), _trunk_vid(item, "id")
        if lo is not None and hi is not None:
            if lo <= 0 or lo > 4094:
                raise _fail("incorrect trunk minID parameter")
            if hi <= 0 or hi > 4094:
                raise _fail("incorrect trunk maxID parameter")
            if hi < lo:
                raise _fail("minID is greater than maxID in trunk parameter")
            vids.update(range(lo, hi + 1))
        elif lo is None and hi is not None:
            raise _fail("minID and maxID should be configured simultaneously, minID is missing")
        elif lo is not None and hi is None:
            raise _fail("minID and maxID should be configured simultaneously, maxID is missing")
        if one is not None:
            if one <= 0 or one > 4094:
                raise _fail("incorrect trunk id parameter")
            vids.add(one)
    return tuple(sorted(vids))


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
_MAC_DOT_RE = re.compile(r"^[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$")


def parse_mac(mac: str) -> str:
    """A 6-byte MAC in any form Go's net.ParseMAC reads, as lowercase colon-separated hex."""
    if _MAC_RE.match(mac):
        digits = mac.replace(":", "").replace("-", "")
    elif _MAC_DOT_RE.match(mac):
        digits = mac.replace(".", "")
    else:
        raise _fail(f"failed to make veth pair: address {mac}: invalid MAC address")
    digits = digits.lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def load_conf(args: PluginArgs) -> Conf:
    c = args.config
    bridge = _typed(c, "bridge", str, DEFAULT_BRIDGE)
    vlan = _typed(c, "vlan", int, 0)
    if vlan < 0 or vlan > 4094:
        raise _fail(f"invalid VLAN ID {vlan} (must be between 0 and 4094)")
    raw_trunk = _typed(c, "vlanTrunk", list, None)
    trunk = collect_vlan_trunk(raw_trunk)
    if vlan > 0 and trunk:
        raise _fail("cannot set vlan and vlanTrunk at the same time")
    mac = args.mac_request()
    is_default_gw = _typed(c, "isDefaultGateway", bool, False)
    return Conf(
        name=str(c.get("name") or ""),
        bridge=bridge,
        is_gateway=_typed(c, "isGateway", bool, False) or is_default_gw,
        is_default_gateway=is_default_gw,
        force_address=_typed(c, "forceAddress", bool, False),
        ip_masq=_typed(c, "ipMasq", bool, False),
        mtu=_typed(c, "mtu", int, 0),
        hairpin_mode=_typed(c, "hairpinMode", bool, False),
        promisc_mode=_typed(c, "promiscMode", bool, False),
        vlan=vlan,
        vlan_trunk=trunk,
        # As the reference: any vlanTrunk list (even one naming no VID) turns filtering on.
        vlan_filtering=vlan != 0 or raw_trunk is not None,
        preserve_default_vlan=_typed(c, "preserveDefaultVlan", bool, True),
        macspoofchk=_typed(c, "macspoofchk", bool, False),
        enable_dad=_typed(c, "enabledad", bool, False),
        disable_container_interface=_typed(c, "disableContainerInterface", bool, False),
        port_isolation=_typed(c, "portIsolation", bool, False),
        mac=parse_mac(mac) if mac else None,
        dns=_typed(c, "dns", dict, {}),
    )


def dns_set(dns: dict[str, Any]) -> bool:
    """The reference's dnsConfSet: any list given (even empty) or a domain."""
    return any(dns.get(k) is not None for k in ("nameservers", "search", "options")) or bool(dns.get("domain"))


# --- links --------------------------------------------------------------------------------------------------


def _bridge_by_name(ipr: Rtnl, name: str) -> Any:
    msg = link_by_name(ipr, name)
    if msg is None:
        raise _fail(f"could not lookup {go_quote(name)}: Link not found")
    if nl.kind(msg) != "bridge":
        raise _fail(f"{go_quote(name)} already exists but is not a bridge")
    return msg


def ensure_bridge(ipr: Rtnl, conf: Conf) -> Any:
    """The reference ensureBridge: create the bridge if missing (MTU, vlan_filtering only at creation), promisc,
    accept_ra=0, up; the link message as it is before any port of this ADD joins."""
    where = f"failed to create bridge {go_quote(conf.bridge)}"
    if not conf.bridge:
        raise _fail(f'{where}: could not add "": invalid argument')
    msg = link_by_name(ipr, conf.bridge)
    if msg is None:
        kw: dict[str, Any] = {"ifname": conf.bridge, "kind": "bridge"}
        if conf.mtu:
            kw["mtu"] = conf.mtu
        if conf.vlan_filtering:
            kw["br_vlan_filtering"] = 1
        try:
            ipr.link("add", **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise _fail(f"{where}: could not add {go_quote(conf.bridge)}: {_errstr(e)}") from None
        try:
            msg = _bridge_by_name(ipr, conf.bridge)
        except CNIError as e:
            raise _fail(f"{where}: {e.msg}") from None
    elif nl.kind(msg) != "bridge":
        raise _fail(f"{where}: {go_quote(conf.bridge)} already exists but is not a bridge")
    # we want to own the routes for this interface
    nl._try_sysctl(f"net/ipv6/conf/{conf.bridge}/accept_ra", "0")
    want = IFF_UP | (IFF_PROMISC if conf.promisc_mode else 0)
    if msg["flags"] & want != want:
        try:
            ipr.link("set", index=msg["index"], flags=want, change=want)
        except NetlinkError as e:
            raise _fail(f"{where}: could not set {go_quote(conf.bridge)} up/promiscuous: {_errstr(e)}") from None
    return msg


def make_veth(ipr: Rtnl, ifname: str, mtu: int, mac: str | None, netns_fd: int | None,
              master: int) -> tuple[str, Any]:
    """One netlink request: a veth whose end `ifname` is created in the namespace of `netns_fd` (the host's when
    None) and whose host end, a random `veth<8 hex>`, is up and already a port of `master`. Retries on a host
    name clash as the reference's makeVeth; returns the host end's name and link message."""
    for _ in range(VETH_NAME_TRIES):
        host_name = nl.random_name("veth")
        # txqueuelen 0 on both ends, as the reference's netlink.LinkAttrs literal leaves it
        peer: dict[str, Any] = {"ifname": ifname, "txqlen": 0}
        if netns_fd is not None:
            peer["net_ns_fd"] = netns_fd
        if mac:
            peer["address"] = mac
        kw: dict[str, Any] = {"ifname": host_name, "kind": "veth", "peer": peer, "master": master, "state": "up",
                              "txqlen": 0}
        if mtu:
            kw["mtu"] = mtu
            peer["mtu"] = mtu
        try:
            ipr.link("add", **kw)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                if link_by_name(ipr, host_name) is not None:
                    continue
                raise _fail(f"container veth name provided ({ifname}) already exists") from None
            raise _fail(f"failed to make veth pair: {_errstr(e)}") from None
        msg = link_by_name(ipr, host_name)
        if msg is None:
            raise _fail(f"failed to lookup {go_quote(host_name)}: Link not found")
        # we want to own the routes for this interface
        nl._try_sysctl(f"net/ipv6/conf/{host_name}/accept_ra", "0")
        return host_name, msg
    raise _fail("failed to find a unique veth name")


def bridge_vlans(ipr: Rtnl, index: int) -> list[int]:
    """VIDs configured on one bridge port (the reference's BridgeVlanList for that port)."""
    vids = []
    for msg in ipr.get_vlans():
        if msg["index"] != index:
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        if spec is None:
            continue
        for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
            vids.append(int(info["vid"]))
    return vids


def setup_port(ipr: Rtnl, host_name: str, index: int, hairpin: bool, isolated: bool, vlan: int,
               trunk: tuple[int, ...], preserve_default_vlan: bool) -> None:
    """Hairpin, isolation and VLAN membership of a new bridge port (the tail of the reference's setupVeth)."""
    if hairpin or isolated:
        kw: dict[str, Any] = {}
        if hairpin:
            kw["mode"] = BRPORT_MODE_HAIRPIN
        if isolated:
            kw["isolated"] = 1
        try:
            ipr.brport("set", index=index, **kw)
        except NetlinkError as e:
            what = "hairpin mode" if hairpin else "isolation"
            raise _fail(f"failed to setup {what} for {host_name}: {_errstr(e)}") from None
    if (vlan or trunk) and not preserve_default_vlan:
        try:
            for vid in bridge_vlans(ipr, index):
                ipr.vlan_filter("del", index=index, vlan_info={"vid": vid})
        except NetlinkError as e:
            raise _fail(f"failed to remove default vlan on interface {go_quote(host_name)}: {_errstr(e)}") from None
    try:
        if vlan:
            ipr.vlan_filter("add", index=index, vlan_info={"vid": vlan, "flags": ["pvid", "untagged"]})
        elif trunk:
            # without an access VLAN the trunk's native VLAN is 1
            ipr.vlan_filter("add", index=index, vlan_info={"vid": 1, "flags": ["pvid", "untagged"]})
        for vid in trunk:
            ipr.vlan_filter("add", index=index, vlan_info={"vid": vid})
    except NetlinkError as e:
        raise _fail(f"failed to setup vlan tag on interface {go_quote(host_name)}: {_errstr(e)}") from None


def ensure_addr(ipr: Rtnl, msg: Any, family: int, gw: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                force: bool, pin_mac: str) -> None:
    """The reference ensureAddr: `gw` on the link (an IPv4 address, or an overlapping IPv6 one, that differs is an
    error unless `force`, which replaces it), then the link's MAC set to `pin_mac` (the bridge's own MAC, so that
    it no longer follows its ports)."""
    name, index = msg.get("ifname"), msg["index"]
    for a in ipr.get_addr(index=index, family=family):
        have = ipaddress.ip_interface(f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        if str(have) == str(gw):
            return
        if family == AF_INET or gw.ip in have.network or have.ip in gw.network:
            if not force:
                raise _fail(f"{go_quote(name)} already has an IP address different from {gw}")
            try:
                ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
            except NetlinkError as e:
                raise _fail(f"could not remove IP address from {go_quote(name)}: {_errstr(e)}") from None
    kw: dict[str, Any] = {}
    if family == AF_INET and gw.network.prefixlen < 31:
        kw["broadcast"] = str(gw.network.broadcast_address)  # as the reference's netlink.AddrAdd
    try:
        ipr.addr("add", index=index, address=str(gw.ip), prefixlen=gw.network.prefixlen, **kw)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise _fail(f"could not add IP address to {go_quote(name)}: {_errstr(e)}") from None
    try:
        ipr.link("set", index=index, address=pin_mac)
    except NetlinkError as e:
        raise _fail(f"could not set bridge's mac: {_errstr(e)}") from None


def ensure_vlan_iface(ipr: Rtnl, conf: Conf, br: Any) -> Any:
    """The reference's `<bridge>.<vlan>` gateway: a veth pair in the host namespace whose random end is an access
    port of the VLAN on the bridge; its other end, named `<bridge>.<vlan>`, carries the gateway address."""
    name = f"{conf.bridge}.{conf.vlan}"
    msg = link_by_name(ipr, name)
    if msg is not None:
        return msg
    try:
        peer_name, peer = make_veth(ipr, name, int(br.get("mtu") or 0), None, None, br["index"])
        setup_port(ipr, peer_name, peer["index"], False, False, conf.vlan, (), conf.preserve_default_vlan)
    except CNIError as e:
        raise _fail(f"faild to create vlan gateway {go_quote(name)}: {e.msg}") from None
    msg = link_by_name(ipr, name)
    if msg is None:
        raise _fail(f"failed to lookup {go_quote(name)}: Link not found")
    try:
        ipr.link("set", index=msg["index"], state="up")
    except NetlinkError as e:
        raise _fail(f"failed to up {go_quote(name)}: {_errstr(e)}") from None
    return msg


def _pin_mac(ipr: Rtnl, conf: Conf, br_mac: str) -> str:
    """The MAC to pin the bridge to: the one it had before this ADD's port joined, as the reference; but a bridge
    whose last port left has the all-zero MAC, which cannot be set (the reference fails there): then its current
    one."""
    if br_mac.replace(":", "").strip("0"):
        return br_mac
    return str(_bridge_by_name(ipr, conf.bridge).get("address"))


def _echo1(path: str) -> None:
    """The reference's echo1: write 1 unless it is already 1."""
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write("1")


def enable_forwarding(family: int) -> None:
    try:
        _echo1("/proc/sys/net/ipv4/ip_forward" if family == AF_INET else "/proc/sys/net/ipv6/conf/all/forwarding")
    except OSError as e:
        raise _fail(f"failed to enable forwarding: {_errstr(e)}") from None


# --- ipMasq (iptables) --------------------------------------------------------------------------------------


def chain_name(network: str, container_id: str) -> str:
    """The reference's utils.FormatChainName: `CNI-` and the hex SHA-512 of name+ID, 28 characters in all."""
    return ("CNI-" + hashlib.sha512((network + container_id).encode()).hexdigest())[:28]


def chain_comment(network: str, container_id: str) -> str:
    """The reference's utils.FormatComment."""
    return f"name: {go_quote(network)} id: {go_quote(container_id)}"


def _restore_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ipt_bin(v6: bool, suffix: str = "") -> str:
    name = ("ip6tables" if v6 else "iptables") + suffix
    path = shutil.which(name)
    if not path:
        raise _fail(f'failed to locate iptables: exec: "{name}": executable file not found in $PATH')
    return path


def _ipt(v6: bool, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_ipt_bin(v6), "-w", "-t", "nat", *argv], capture_output=True, text=True)


def _ipt_check(v6: bool, *argv: str) -> None:
    p = _ipt(v6, *argv)
    if p.returncode != 0:
        raise _fail(f"running [{_ipt_bin(v6)} -w -t nat {' '.join(argv)}]: exit status {p.returncode}: "
                    f"{p.stderr.strip()}")


def _ipt_restore(v6: bool, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_ipt_bin(v6, "-restore"), "-w", "--noflush"], input=text, capture_output=True, text=True)


def _ipt_save_nat(v6: bool) -> list[str]:
    p = subprocess.run([_ipt_bin(v6, "-save"), "-t", "nat"], capture_output=True, text=True)
    if p.returncode != 0:
        raise _fail(f"failed to list iptables nat table: {p.stderr.strip()}")
    return p.stdout.splitlines()


def _by_family(ipns: list[Any]) -> dict[bool, list[Any]]:
    out: dict[bool, list[Any]] = {}
    for ipn in ipns:
        out.setdefault(ipn.version == 6, []).append(ipn)
    return out


def setup_ipmasq(ipns: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface], chain: str, comment: str) -> None:
    """The reference SetupIPMasq for each address: in the nat table a chain accepting the address's subnet and
    masquerading all but multicast, entered from POSTROUTING for the address."""
    for v6, group in _by_family(ipns).items():
        mcast = "ff00::/8" if v6 else "224.0.0.0/4"
        rules: list[list[str]] = []
        post: list[list[str]] = []
        for ipn in group:
            for r in (["-d", str(ipn.network), "-j", "ACCEPT"], ["!", "-d", mcast, "-j", "MASQUERADE"]):
                if r not in rules:
                    rules.append(r)
            p = ["-s", str(ipn.ip), "-j", chain]
            if p not in post:
                post.append(p)
        q = _restore_quote(comment)
        text = (f"*nat\n-N {chain}\n"
                + "".join(f"-A {chain} {' '.join(r)} -m comment --comment {q}\n" for r in rules)
                + "".join(f"-A POSTROUTING {' '.join(p)} -m comment --comment {q}\n" for p in post)
                + "COMMIT\n")
        if _ipt_restore(v6, text).returncode == 0:
            continue
        # The chain exists already (or restore failed): the reference's own sequence, rule by rule.
        if _ipt(v6, "-S", chain).returncode != 0:
            _ipt_check(v6, "-N", chain)
        for target, r in [(chain, r) for r in rules] + [("POSTROUTING", p) for p in post]:
            spec = [*r, "-m", "comment", "--comment", comment]
            if _ipt(v6, "-C", target, *spec).returncode != 0:
                _ipt_check(v6, "-A", target, *spec)


def _rule_target(line: str) -> str | None:
    parts = line.split()
    return parts[-1] if len(parts) >= 2 and parts[-2] == "-j" else None


def _rule_source(line: str) -> str | None:
    parts = line.split()
    for i, p in enumerate(parts[:-1]):
        if p == "-s":
            return parts[i + 1]
    return None


def teardown_ipmasq(ipns: list[Any] | None, chain: str, comment: str) -> None:
    """The reference TeardownIPMasq for each address (`ipns`), or for every address that enters the chain when
    the addresses are unknown (None): the POSTROUTING rules, then the chain unless another rule still uses it."""
    families: dict[bool, list[Any] | None] = dict(_by_family(ipns)) if ipns is not None else {False: None, True: None}
    q = _restore_quote(comment)
    for v6, group in families.items():
        if group is not None:
            fast = ("*nat\n"
                    + "".join(f"-D POSTROUTING -s {ipn.ip} -j {chain} -m comment --comment {q}\n" for ipn in group)
                    + f"-F {chain}\n-X {chain}\nCOMMIT\n")
            if _ipt_restore(v6, fast).returncode == 0:
                continue
        try:
            lines = _ipt_save_nat(v6)
        except CNIError:
            if v6 and group is None:
                continue  # no IPv6 tables on this host: nothing of ours there
            raise
        if f":{chain}" not in {ln.split()[0] for ln in lines if ln.startswith(":")}:
            continue
        refs = [ln for ln in lines if ln.startswith("-A ") and _rule_target(ln) == chain]
        if group is None:
            ours = [ln for ln in refs if ln.startswith("-A POSTROUTING ")]
        else:
            wanted = set()
            for ipn in group:
                wanted.add(str(ipaddress.ip_interface(f"{ipn.ip}/{ipn.max_prefixlen}")))
                wanted.add(str(ipn.network))
            ours = [ln for ln in refs if ln.startswith("-A POSTROUTING ") and _rule_source(ln) in wanted]
        text = "*nat\n" + "".join("-D" + ln[2:] + "\n" for ln in ours)
        if len(ours) == len(refs):
            text += f"-F {chain}\n-X {chain}\n"
        p = _ipt_restore(v6, text + "COMMIT\n")
        if p.returncode != 0:
            raise _fail(f"failed to remove ipMasq chain {chain}: {p.stderr.strip()}")


# --- macspoofchk (nftables) ---------------------------------------------------------------------------------


class SpoofChecker:
    """The reference's pkg/link SpoofChecker: in the nftables `bridge` family table `nat`, frames entering from
    the host port pass only with the container's source MAC. Applied with `nft -j -f -`."""

    def __init__(self, iface: str, mac: str, ref_id: str) -> None:
        self.iface = iface
        self.mac = mac
        self.ref_id = ref_id
        self.iface_chain = f"cni-br-iface-{ref_id}"
        self.mac_chain = f"{self.iface_chain}-mac"
        self.comment = f"macspoofchk-{ref_id}"

    @staticmethod
    def nft() -> str:
        path = shutil.which("nft")
        if not path:
            raise _fail("failed to setup spoof-check: the nft command (nftables) is not installed or not in PATH")
        return path

    def _apply(self, commands: list[dict[str, Any]]) -> None:
        p = subprocess.run([self.nft(), "-j", "-f", "-"], input=json.dumps({"nftables": commands}),
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise _fail(p.stderr.strip() or f"nft exited with status {p.returncode}")

    def _chain(self, name: str) -> dict[str, Any]:
        return {"family": "bridge", "table": SPOOFCHK_TABLE, "name": name}

    def _rule(self, chain: str, expr: list[dict[str, Any]]) -> dict[str, Any]:
        return {"rule": {"family": "bridge", "table": SPOOFCHK_TABLE, "chain": chain, "expr": expr,
                         "comment": self.comment}}

    def setup(self) -> None:
        base = {**self._chain(SPOOFCHK_BASE_CHAIN), "type": "filter", "hook": "prerouting", "prio": -300,
                "policy": "accept"}
        try:
            self._apply([{"table": {"family": "bridge", "name": SPOOFCHK_TABLE}}, {"chain": base},
                         {"chain": self._chain(self.iface_chain)}, {"chain": self._chain(self.mac_chain)}])
            self._apply([
                {"flush": {"chain": self._chain(self.iface_chain)}},
                {"flush": {"chain": self._chain(self.mac_chain)}},
                {"add": self._rule(SPOOFCHK_BASE_CHAIN, [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": self.iface}},
                    {"jump": {"target": self.iface_chain}}])},
                {"add": self._rule(self.iface_chain, [{"jump": {"target": self.mac_chain}}])},
                {"add": self._rule(self.mac_chain, [
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                               "right": self.mac}},
                    {"return": None}])},
                {"add": self._rule(self.mac_chain, [{"drop": None}])},
            ])
        except CNIError as e:
            if e.msg.startswith("failed to setup spoof-check"):
                raise
            raise _fail(f"failed to setup spoof-check: {e.msg}") from None

    def teardown(self) -> None:
        """The base-chain rule(s) of this ref ID, then the two regular chains; both are tried."""
        rule_err: str | None = None
        try:
            p = subprocess.run([self.nft(), "-j", "list", "chain", "bridge", SPOOFCHK_TABLE, SPOOFCHK_BASE_CHAIN],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise _fail(p.stderr.strip())
            handles = [item["rule"]["handle"] for item in json.loads(p.stdout).get("nftables", [])
                       if "rule" in item and item["rule"].get("comment") == self.comment]
            if handles:
                self._apply([{"delete": {"rule": {"family": "bridge", "table": SPOOFCHK_TABLE,
                                                  "chain": SPOOFCHK_BASE_CHAIN, "handle": h}}} for h in handles])
        except (CNIError, ValueError, KeyError) as e:
            rule_err = f"failed to delete iface match rule: {e.msg if isinstance(e, CNIError) else e}"
        chains_err: str | None = None
        try:
            self._apply([{"delete": {"chain": self._chain(self.iface_chain)}},
                         {"delete": {"chain": self._chain(self.mac_chain)}}])
        except CNIError as e:
            chains_err = f"failed to delete regular chains: {e.msg}"
        if rule_err or chains_err:
            # the reference's "%v, %v" of two errors, one of which may be nil
            raise _fail(f"failed to teardown spoof-check: {rule_err or '<nil>'}, {chains_err or '<nil>'}")


def _unique_id(container_id: str, ifname: str) -> str:
    return f"{container_id}-{ifname}"


# --- ADD ----------------------------------------------------------------------------------------------------


def calc_gateways(result: dict[str, Any], conf: Conf) -> dict[int, list[Any]]:
    """The reference calcGateways: every IP goes to interface 2; with isGateway a missing gateway becomes the
    subnet's first address; with isDefaultGateway a default route per family via it unless IPAM gave one; the
    gateway addresses (with the IP's prefix) per family."""
    gws: dict[int, list[Any]] = {AF_INET: [], AF_INET6: []}
    found: dict[int, bool] = {AF_INET: False, AF_INET6: False}
    routes = result.setdefault("routes", [])
    ips = []
    for ip in result["ips"]:
        iface = ipaddress.ip_interface(ip["address"])
        family = AF_INET6 if iface.version == 6 else AF_INET
        gateway = ip.get("gateway")
        if gateway is None and conf.is_gateway:
            gateway = str(iface.network.network_address + 1)
        entry = {"interface": 2, "address": ip["address"]}
        if gateway is not None:
            entry["gateway"] = gateway
        ips.append(entry)
        if conf.is_default_gateway:
            default = ipaddress.ip_network("::/0" if iface.version == 6 else "0.0.0.0/0")
            # Any default route of the family from IPAM counts, with or without gw (one without goes via
            # the IP's gateway): the reference only counts one with gw, then fails adding a second default
            # route ("file exists").
            for r in routes:
                try:
                    if ipaddress.ip_network(r["dst"], strict=False) == default:
                        found[family] = True
                        break
                except ValueError:
                    continue
            if not found[family]:
                routes.append({"dst": str(default), "gw": gateway})
                found[family] = True
        if conf.is_gateway:
            gws[family].append(ipaddress.ip_interface(f"{gateway}/{iface.network.prefixlen}"))
    result["ips"] = ips
    if not routes:
        del result["routes"]
    return gws


def _netns_check(netns: str) -> None:
    try:
        os.close(open_netns(netns))
    except CNIError:
        raise _fail(f"failed to open netns {go_quote(netns)}: failed to Statfs {go_quote(netns)}: "
                    "no such file or directory") from None


def _oper_state(msg: Any) -> str:
    return str(msg.get("IFLA_OPERSTATE") or "unknown").lower()


def wait_port_up(ipr: Rtnl, index: int) -> Any:
    """The reference's bridge-port check: poll the host veth until its oper state is up."""
    msg = None
    for i, ms in enumerate(OPER_UP_WAITS_MS):
        if ms:
            time.sleep(ms / 1000)
        try:
            msg = nl.link(ipr, index)
        except NetlinkError as e:
            raise _fail(f"failed to lookup host veth: {_errstr(e)}") from None
        if _oper_state(msg) == "up":
            return msg
        if i == len(OPER_UP_WAITS_MS) - 1:
            raise _fail(f"bridge port in error state: {_oper_state(msg)}")
    return msg


def _undo_all(undo: list[Callable[[], None]]) -> None:
    for fn in reversed(undo):
        try:
            fn()
        except Exception as e:  # the ADD's own error is what the caller must see
            print(f"bridge: cleanup after failed ADD: {e}", file=sys.stderr)


def cmd_add(args: PluginArgs) -> dict[str, Any]:
    conf = load_conf(args)
    if conf.hairpin_mode and conf.promisc_mode:
        # the text of the Debian reference (1.1.1); later releases drop the full stop
        raise _fail("cannot set hairpin mode and promiscuous mode at the same time.")
    if conf.disable_container_interface and args.ipam_type:
        raise _fail("cannot use IPAM when DisableContainerInterface flag is set")
    if conf.macspoofchk:
        SpoofChecker.nft()  # a clear error before anything is made
    with nl.Links(args.netns) as links:
        host = links.host
        br = ensure_bridge(host, conf)
        br_mac = str(br.get("address"))
        _netns_check(args.netns)
        # An existing container interface of that name fails the veth creation (EEXIST), as in the reference.
        fd = open_netns(args.netns)
        try:
            host_name, host_msg = make_veth(host, args.ifname, conf.mtu, conf.mac, fd, br["index"])
        finally:
            os.close(fd)
        undo: list[Callable[[], None]] = [lambda: _delete_link(host, host_msg["index"])]
        try:
            return _add_rest(args, conf, links, br, br_mac, host_name, host_msg, undo)
        except BaseException:
            _undo_all(undo)
            raise


def _delete_link(ipr: Rtnl, index: int) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


def _add_rest(args: PluginArgs, conf: Conf, links: nl.Links, br: Any, br_mac: str, host_name: str, host_msg: Any,
              undo: list[Callable[[], None]]) -> dict[str, Any]:
    host, host_idx = links.host, int(host_msg["index"])
    setup_port(host, host_name, host_idx, conf.hairpin_mode, conf.port_isolation, conf.vlan, conf.vlan_trunk,
               conf.preserve_default_vlan)
    cont = link_by_name(links.ns, args.ifname)
    if cont is None:
        raise _fail(f"failed to lookup {go_quote(args.ifname)}: Link not found")
    cont_mac = str(cont.get("address"))
    host_iface = {"name": host_name, "mac": str(host_msg.get("address"))}
    result: dict[str, Any] = {
        "cniVersion": cniversion.CURRENT,
        "interfaces": [{"name": conf.bridge, "mac": br_mac}, host_iface,
                       {"name": args.ifname, "mac": cont_mac, "sandbox": args.netns}],
    }
    if conf.macspoofchk:
        sc = SpoofChecker(host_name, cont_mac, _unique_id(args.container_id, args.ifname))
        sc.setup()
        undo.append(sc.teardown)

    if args.ipam_type:
        ipam = ipam_add(args)
        undo.append(lambda: ipam_del(args))
        result["ips"] = ipam.get("ips") or []
        result["routes"] = ipam.get("routes") or []
        if ipam.get("dns"):
            result["dns"] = ipam["dns"]
        if not result["ips"]:
            raise _fail("IPAM plugin returned missing IP config")
        gws = calc_gateways(result, conf)
        with entered(args.netns):
            if conf.enable_dad:
                nl._try_sysctl(f"net/ipv6/conf/{args.ifname}/enhanced_dad", "1")
                nl._try_sysctl(f"net/ipv6/conf/{args.ifname}/accept_dad", "1")
            else:
                nl._try_sysctl(f"net/ipv6/conf/{args.ifname}/accept_dad", "0")
            nl._try_sysctl(f"net/ipv4/conf/{args.ifname}/arp_notify", "1")
        # As the reference's ConfigureIface: wait for DAD only when there is an IPv6 gateway.
        settle = any(ip.get("gateway") and ":" in ip["address"] for ip in result["ips"])
        nl.configure_iface(links, args.ifname, result, 2, settle=settle, link_index=int(cont["index"]))

        if conf.is_gateway:
            vlan_iface = None
            for family in (AF_INET, AF_INET6):
                for gw in gws[family]:
                    if conf.vlan:
                        try:
                            vmsg = ensure_vlan_iface(host, conf, br)
                            if vlan_iface is None:
                                vlan_iface = {"name": str(vmsg.get("ifname")), "mac": str(vmsg.get("address"))}
                                result["interfaces"].append(vlan_iface)
                            ensure_addr(host, vmsg, family, gw, conf.force_address, str(vmsg.get("address")))
                        except CNIError as e:
                            raise _fail(f"failed to set vlan interface for bridge with addr: {e.msg}") from None
                    else:
                        try:
                            ensure_addr(host, br, family, gw, conf.force_address, _pin_mac(host, conf, br_mac))
                        except CNIError as e:
                            raise _fail(f"failed to set bridge addr: {e.msg}") from None
                if gws[family]:
                    enable_forwarding(family)

        if conf.ip_masq:
            chain, comment = chain_name(conf.name, args.container_id), chain_comment(conf.name, args.container_id)
            ipns = [ipaddress.ip_interface(ip["address"]) for ip in result["ips"]]
            undo.append(lambda: teardown_ipmasq(ipns, chain, comment))
            setup_ipmasq(ipns, chain, comment)
    elif not conf.disable_container_interface:
        try:
            links.ns.link("set", index=cont["index"], state="up")
        except NetlinkError as e:
            raise _fail(f"failed to set {go_quote(args.ifname)} up: {_errstr(e)}") from None

    if conf.disable_container_interface:
        host_msg = nl.link(host, host_idx)  # its peer stays down, so the port never comes up
    else:
        host_msg = wait_port_up(host, host_idx)
    # In certain circumstances the host end changes its address; the bridge's follows its ports unless pinned.
    host_iface["mac"] = str(host_msg.get("address"))
    result["interfaces"][0]["mac"] = str(_bridge_by_name(host, conf.bridge).get("address"))
    if dns_set(conf.dns):
        result["dns"] = conf.dns
    return result


# --- DEL ----------------------------------------------------------------------------------------------------


def _is_global_unicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Go's net.IP.IsGlobalUnicast."""
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
        return False
    return not (ip.version == 4 and int(ip) == 0xFFFFFFFF)


def del_link_collect(netns: str, ifname: str) -> list[Any] | None:
    """The reference DelLinkByNameAddr: delete `ifname` in the namespace; its global unicast addresses, or None
    when there is no such link. NetnsGone when the namespace is."""
    with entered(netns):
        ns = Rtnl()
    try:
        msg = link_by_name(ns, ifname)
        if msg is None:
            return None
        ipns = []
        for a in ns.get_addr(index=msg["index"]):
            iface = ipaddress.ip_interface(f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            if _is_global_unicast(iface.ip):
                ipns.append(iface)
        try:
            ns.link("del", index=msg["index"])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise _fail(f"failed to delete {go_quote(ifname)}: {_errstr(e)}") from None
        return ipns
    finally:
        ns.close()


def cmd_del(args: PluginArgs) -> None:
    conf = load_conf(args)
    if not args.netns:
        if args.ipam_type:
            ipam_del(args)
        return
    try:
        ipns = del_link_collect(args.netns, args.ifname)
    except NetnsGone:
        ipns = None
    # IPAM after the link, as the reference.
    if args.ipam_type:
        ipam_del(args)
    if conf.macspoofchk:
        try:
            SpoofChecker("", "", _unique_id(args.container_id, args.ifname)).teardown()
        except CNIError as e:
            print(e.msg, file=sys.stderr)  # the reference only logs spoof-check teardown errors
    if args.ipam_type and conf.ip_masq:
        teardown_ipmasq(ipns, chain_name(conf.name, args.container_id), chain_comment(conf.name, args.container_id))


# --- CHECK --------------------------------------------------------------------------------------------------


def _peer_index(msg: Any) -> int | None:
    peer = msg.get("IFLA_LINK")
    return int(peer) if peer is not None else None


def cmd_check(args: PluginArgs) -> None:
    conf = load_conf(args)
    _netns_check(args.netns)
    if args.ipam_type:
        ipam_check(args)
    prev = args.prev_result()
    if prev is None:
        raise _fail("Required prevResult missing")
    ifaces = prev.get("interfaces", [])
    br_map: dict[str, Any] = {}
    cont_map: dict[str, Any] = {}
    for intf in ifaces:
        if intf.get("name") == conf.bridge:
            br_map = intf
        elif intf.get("name") == args.ifname and intf.get("sandbox") == args.netns:
            cont_map = intf
    with nl.Links(args.netns) as links:
        host = links.host
        # the bridge
        if not br_map.get("name"):
            raise _fail("Interface name missing ")
        br = link_by_name(host, br_map["name"])
        if br is None:
            raise _fail(f"Interface name {br_map['name']} not found")
        if br_map.get("sandbox"):
            raise _fail(f"Interface {br_map['name']} should not be in sandbox")
        if nl.kind(br) != "bridge":
            raise _fail(f"Interface {br_map['name']} does not have link type of bridge")
        if br_map.get("mac") and br_map["mac"].lower() != str(br.get("address")).lower():
            raise _fail(f"Bridge interface {br_map['name']} Mac doesn't match: {br_map['mac']}")
        promisc = bool(br["flags"] & IFF_PROMISC)
        if promisc != conf.promisc_mode:
            raise _fail(f"Bridge interface {br_map['name']} configured Promisc Mode {str(conf.promisc_mode).lower()} "
                        f"doesn't match current state: {str(promisc).lower()} ")
        if args.netns != cont_map.get("sandbox", ""):
            raise _fail(f"Sandbox in prevResult {cont_map.get('sandbox', '')} doesn't match configured netns: "
                        f"{args.netns}")
        # the container end
        if not cont_map.get("name"):
            raise _fail("Interface name missing ")
        cont = link_by_name(links.ns, cont_map["name"])
        if cont is None:
            raise _fail(f"Interface name {cont_map['name']} not found")
        if nl.kind(cont) != "veth":
            raise _fail(f"Error: Container interface {cont_map['name']} not of type veth")
        if cont_map.get("mac") and cont_map["mac"].lower() != str(cont.get("address")).lower():
            raise _fail(f"Interface {cont_map['name']} Mac {cont_map['mac']} doesn't match container Mac: "
                        f"{cont.get('address')}")
        # the host end: a veth of the result whose peer is the container end and whose master is the bridge
        veth_found = False
        for intf in ifaces:
            if intf.get("name") in (br_map["name"], cont_map["name"]):
                continue
            if not intf.get("name"):
                raise _fail("Interface name missing ")
            msg = link_by_name(host, intf["name"])
            if msg is None:
                raise _fail(f"Interface name {intf['name']} not found")
            if intf.get("sandbox"):
                raise _fail(f"Interface {intf['name']} should not be in sandbox")
            if nl.kind(msg) != "veth":
                continue
            if (msg["index"] != _peer_index(cont) or _peer_index(msg) != cont["index"]
                    or msg.get("IFLA_MASTER") != br["index"]):
                continue
            if intf.get("mac") and intf["mac"].lower() != str(msg.get("address")).lower():
                raise _fail(f"Interface {intf['name']} Mac doesn't match: {intf['mac']} not found")
            veth_found = True
            break
        if not veth_found:
            raise _fail(f"CNI veth created for bridge {conf.bridge} was not found")
        nl.check_ips_and_routes(links.ns, args.ifname, prev, ifaces.index(cont_map))


cmd_status = status_via_ipam
cmd_gc = gc_via_ipam


def main() -> int:
    from ._plugin import standalone_main

    return standalone_main(sys.modules[__name__], "meta-bridge")


if __name__ == "__main__":
    sys.exit(main())
