"""The network state one CNI attachment leaves behind, captured so that two runs can be compared.

`snapshot()` reads, with iproute2, sysfs, /proc/sys, iptables-save and nft, everything a bridge or macvlan
attachment may change: the container interface and its addresses, routes and sysctls; on the host side
the links, forwarding sysctls, routes, the bridge, the host veth and its bridge-port settings, the
macvlan master, iptables (v4 and v6), the whole nftables ruleset (the bridge's macspoofchk rules live
there, and iptables-nft's tables show up in it too) and host-local's reservations.

Values random by design are replaced by role labels with a `Normaliser`: MACs by whose MAC they are
("<mac:container>", "<mac:bridge>", "<mac:container=master>" when equal, "<mac:other>" for one that is no
link's), the host veth name by "<host-veth>", link-local addresses by owner, the sandbox path by
"<sandbox>". A value requested by the test (a MAC from runtimeConfig) is kept literally. Everything else
is compared as is, and `diff()` lists every differing leaf by path.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
VETH_RE = re.compile(r"^veth[0-9a-f]{8}$")
LL_RE = re.compile(r"^fe80:")
INFINITE = 4294967295

# Bridge attributes that are configuration (not timers, counters or MAC-derived ids).
BRIDGE_INFO_KEYS = (
    "vlan_filtering", "vlan_protocol", "vlan_default_pvid", "vlan_stats_enabled", "vlan_stats_per_port",
    "stp_state", "ageing_time", "forward_delay", "hello_time", "max_age", "priority", "group_fwd_mask",
    "group_addr", "mcast_snooping", "mcast_vlan_snooping", "mcast_router", "mcast_querier",
    "no_linklocal_learn", "nf_call_iptables", "nf_call_ip6tables", "nf_call_arptables",
)
# Bridge-port attributes that are state or ids, not settings.
PORT_VOLATILE = ("ifindex", "ifname", "link", "master", "address", "id", "no", "designated_port",
                 "designated_cost", "designated_bridge", "designated_root", "bridge_id", "root_id",
                 "hold_timer", "message_age_timer", "forward_delay_timer", "topology_change_ack",
                 "config_pending")
LINK_KEYS = ("mtu", "operstate", "promiscuity", "allmulti", "qdisc", "txqlen", "group", "link_type",
             "linkmode", "num_tx_queues", "num_rx_queues", "inet6_addr_gen_mode")
# Address flags that depend on how long ago the address was added (host side only; DAD on the bridge's
# gateway address runs on its own clock, and neither plugin waits for it).
HOST_ADDR_VOLATILE = ("tentative", "optimistic")


def ns_name(netns: str) -> str:
    return Path(netns).name


def _run(*cmd: str, check: bool = True) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = _run("ip", "-n", ns, "-j", *args, check=False)
    return json.loads(out) if out.strip() else []


def in_ns(ns: str, *cmd: str, check: bool = True) -> str:
    return _run("ip", "netns", "exec", ns, *cmd, check=check)


def read_files(ns: str, paths: list[str]) -> dict[str, str | None]:
    """Read files (under /proc/sys or /sys) as seen from inside `ns`; None when unreadable."""
    if not paths:
        return {}
    script = 'for k in "$@"; do if v=$(cat "$k" 2>/dev/null); then echo "$k=$v"; else echo "$k"; fi; done'
    out = in_ns(ns, "sh", "-c", script, "sh", *paths)
    vals: dict[str, str | None] = {p: None for p in paths}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if k in vals:
            vals[k] = v.strip() if sep else None
    return vals


def sysctls(ns: str, keys: list[str]) -> dict[str, str | None]:
    """`net.ipv4.conf.eth0.arp_notify`-style keys (interface names may not contain dots here)."""
    paths = {k: "/proc/sys/" + k.replace(".", "/") for k in keys}
    vals = read_files(ns, list(paths.values()))
    return {k: vals[p] for k, p in paths.items()}


def links(ns: str) -> dict[str, dict[str, Any]]:
    """`ip -d link` of every interface of `ns` (by name), with `addr_info` from `ip addr`."""
    addrs = {li["ifname"]: li.get("addr_info", []) for li in ip_json(ns, "addr")}
    out = {}
    for li in ip_json(ns, "-d", "link"):
        li["addr_info"] = addrs.get(li["ifname"], [])
        out[li["ifname"]] = li
    return out


# --- waiting for the kernel's asynchronous link state (linkwatch), never judged on time ------------------


def _link_states(ns: str, names: list[str], all_addresses: bool) -> dict[str, tuple[Any, ...]]:
    ls = links(ns)
    names = [n for n in names if n in ls]
    files = read_files(ns, [f"/sys/class/net/{n}/carrier" for n in names]
                       + [f"/proc/sys/net/ipv6/conf/{n}/disable_ipv6" for n in names])
    states = {}
    for n in names:
        li = ls[n]
        v6 = [a for a in li.get("addr_info", []) if a.get("family") == "inet6"]
        has_ll = any(a.get("scope") == "link" for a in v6)
        tentative = any(a.get("tentative") for a in v6 if all_addresses or a.get("scope") == "link")
        states[n] = (tuple(li.get("flags", [])), li.get("operstate"), files[f"/sys/class/net/{n}/carrier"],
                     files[f"/proc/sys/net/ipv6/conf/{n}/disable_ipv6"], li.get("inet6_addr_gen_mode"), has_ll,
                     tentative)
    return states


def _settled(state: tuple[Any, ...]) -> bool:
    flags, operstate, carrier, disable_ipv6, gen_mode, has_ll, tentative = state
    if "UP" not in flags:
        return True
    if carrier == "1":
        return operstate == "UP" and not tentative and (has_ll or disable_ipv6 != "0" or gen_mode == "none")
    return operstate in ("DOWN", "LOWERLAYERDOWN")


def settle(ns: str, names: list[str], all_addresses: bool, timeout: float = 5.0) -> None:
    """Wait until what the kernel does asynchronously after a plugin returns has happened on the
    admin-up links: operstate agrees with carrier (linkwatch), IPv6 has put a link-local address on
    the ones that are up and finished its DAD (and DAD of every address with `all_addresses`; the local
    routes appear only then); seen twice in a row. Gives up silently after `timeout`: the snapshot then
    shows what there is. Never used to judge timing."""
    deadline = time.monotonic() + timeout
    prev = None
    while True:
        states = _link_states(ns, names, all_addresses)
        if states == prev and all(_settled(s) for s in states.values()):
            return
        if time.monotonic() > deadline:
            return
        prev = states
        time.sleep(0.05)


# --- normalisation ---------------------------------------------------------------------------------------


class Normaliser:
    """Replaces values random by design with labels naming their role; keeps `keep` values literally."""

    def __init__(self, keep: set[str] | None = None) -> None:
        self.roles: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}  # random interface names, replaced inside strings too (sysctl keys)
        self.keep = {k.lower() for k in keep or set()}

    def add_name(self, name: str, role: str) -> None:
        self.names[name] = f"<{role}>"

    suffix = ""  # for roles first seen in a later state (a derived normaliser)

    def add(self, value: str | None, role: str) -> None:
        if not value:
            return
        if self.suffix and value in self.roles:
            return
        role += self.suffix
        if role not in self.roles.setdefault(value, []):
            self.roles[value].append(role)

    def derived(self) -> "Normaliser":
        """A copy for a later state of the same attachment: known values keep their labels, values new
        in that state get the role with a prime (e.g. "<mac:bridge'>": the bridge's MAC has changed)."""
        d = Normaliser()
        d.roles = {k: list(v) for k, v in self.roles.items()}
        d.names = dict(self.names)
        d.keep = set(self.keep)
        d.suffix = "'"
        return d

    def label(self, s: str) -> str:
        if s.lower() in self.keep:
            return s
        if s in self.roles:
            kind = "mac" if MAC_RE.match(s) else "ll" if LL_RE.match(s) else None
            roles = "=".join(self.roles[s])
            return f"<{kind}:{roles}>" if kind else f"<{roles}>"
        for name, label in self.names.items():
            s = s.replace(name, label)
        if MAC_RE.match(s) and not int(s[:2], 16) & 1:  # unicast; group addresses are not random
            return "<mac:other>"
        if VETH_RE.match(s):
            return "<veth:other>"
        if LL_RE.match(s) and s not in ("fe80::", "fe80::/64"):
            return "<ll:other>"
        return s

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            return {self.label(k) if isinstance(k, str) else k: self(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self(v) for v in obj]
        if isinstance(obj, str):
            return self.label(obj)
        return obj


def normalise_iptables(save: str) -> list[str]:
    """iptables-save output without comments and counters."""
    lines = []
    for line in save.splitlines():
        if not line or line.startswith("#"):
            continue
        lines.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return lines


# --- the snapshot ----------------------------------------------------------------------------------------


def _link_record(li: dict[str, Any]) -> dict[str, Any]:
    info = li.get("linkinfo", {})
    rec: dict[str, Any] = {"kind": info.get("info_kind"), "flags": sorted(li.get("flags", [])),
                           "address": li.get("address")}
    rec.update({k: li.get(k) for k in LINK_KEYS})
    if info.get("info_slave_kind"):
        rec["slave_kind"] = info["info_slave_kind"]
    return rec


def _addresses(li: dict[str, Any] | None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    if li is None:
        return {"global": None, "link_local": None}
    glob = []
    for a in li.get("addr_info", []):
        if a.get("scope") == "link" and a.get("family") == "inet6":
            continue
        rec = {k: v for k, v in a.items() if k not in ("valid_life_time", "preferred_life_time", *drop)}
        for k in ("valid_life_time", "preferred_life_time"):
            rec[k] = "forever" if a.get(k) == INFINITE else "finite"
        glob.append(rec)
    ll = [a for a in li.get("addr_info", []) if a.get("family") == "inet6" and a.get("scope") == "link"]
    return {"global": glob, "link_local": len(ll)}


def _routes(ns: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for fam in ("4", "6"):
        out[fam] = ip_json(ns, f"-{fam}", "route", "show", "table", "all")
    return out


def _iptables(ns: str) -> dict[str, list[str]]:
    return {"v4": normalise_iptables(in_ns(ns, "iptables-save", check=False)),
            "v6": normalise_iptables(in_ns(ns, "ip6tables-save", check=False))}


def normalise_nftables(ruleset: dict[str, Any]) -> dict[str, Any]:
    """`nft -j list ruleset` as `{"<family> <table>": {"chains": {name: {...hook..., "rules": [...]}},
    "other": [...]}}`: handles (kernel-assigned ids, not configuration) and the metainfo item are dropped,
    counter values become "<counter>"; tables and chains are compared as sets, rules in chain order."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: ("<counter>" if k == "counter" and isinstance(v, dict) else clean(v))
                    for k, v in obj.items() if k != "handle"}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    tables: dict[str, dict[str, Any]] = {}

    def table(family: str, name: str) -> dict[str, Any]:
        return tables.setdefault(f"{family} {name}", {"chains": {}, "other": []})

    for item in ruleset.get("nftables", []):
        if "metainfo" in item:
            continue
        if "table" in item:
            table(item["table"]["family"], item["table"]["name"])
        elif "chain" in item:
            c = clean(item["chain"])
            t = table(c.pop("family"), c.pop("table"))
            t["chains"].setdefault(c.pop("name"), {"rules": []}).update(c)
        elif "rule" in item:
            r = clean(item["rule"])
            t = table(r.pop("family"), r.pop("table"))
            t["chains"].setdefault(r.pop("chain"), {"rules": []})["rules"].append(r)
        else:  # sets, maps, flowtables, objects
            kind, body = next(iter(item.items()))
            body = clean(body)
            table(body.pop("family"), body.pop("table"))["other"].append({kind: body})
    return tables


def nftables_state(ns: str) -> dict[str, Any] | None:
    """The nftables ruleset of the namespace `ns` (name or path), normalised; None without the nft command
    (nftables package)."""
    if shutil.which("nft") is None:
        return None
    out = in_ns(ns_name(ns), "nft", "-j", "list", "ruleset")
    return normalise_nftables(json.loads(out) if out.strip() else {})


def _ipam_state(ipam_dir: Path) -> dict[str, str] | None:
    if not ipam_dir.exists():
        return None
    return {p.name: p.read_bytes().decode(errors="replace") for p in sorted(ipam_dir.iterdir())}


def snapshot(host_netns: str, container_netns: str, ifname: str, *, bridge: str | None = None,
             master: str | None = None, ipam_dir: Path | None = None,
             keep: set[str] | None = None, base: Normaliser | None = None) -> tuple[dict[str, Any], Normaliser]:
    """The normalised state of one attachment (`ifname` in `container_netns`, plugin run in
    `host_netns`), and the normaliser built from it (to normalise the plugin's result the same way).
    With `base` (the normaliser of an earlier snapshot), values known then keep their labels."""
    host, cont = ns_name(host_netns), ns_name(container_netns)
    host_links = links(host)
    # Container: not the global addresses' DAD, which the plugin itself may have to wait for (a
    # tentative address in the snapshot means it returned before DAD was over).
    settle(cont, [ifname], all_addresses=False)
    by_index = {li["ifindex"]: li for li in host_links.values()}
    cont_links = links(cont)
    iface = cont_links.get(ifname)
    peer = by_index.get(iface.get("link_index")) if iface and iface.get("link_netnsid") is not None else None
    host_veth = peer["ifname"] if peer and peer.get("linkinfo", {}).get("info_kind") == "veth" and peer["ifname"] != master else None
    settle(host, [n for n in (bridge, host_veth, master, master and master + "p") if n], all_addresses=True)
    host_links = links(host)
    cont_links = links(cont)
    iface = cont_links.get(ifname)

    norm = base.derived() if base else Normaliser(keep)
    norm.add(container_netns, "sandbox")
    for role, name, ls in (("container", ifname, cont_links), ("host-veth", host_veth, host_links),
                           ("bridge", bridge, host_links), ("master", master, host_links),
                           ("master-peer", master and master + "p", host_links)):
        li = ls.get(name) if name else None
        if li is None:
            continue
        norm.add(li.get("address"), role)
        for a in li.get("addr_info", []):
            if a.get("family") == "inet6" and a.get("scope") == "link":
                norm.add(a["local"], role)
    if host_veth and host_veth not in norm.names:
        norm.add_name(host_veth, "host-veth" + norm.suffix)

    snap: dict[str, Any] = {}

    # Container side.
    c: dict[str, Any] = {"links": sorted(cont_links)}
    if iface is not None:
        rec = _link_record(iface)
        info = iface.get("linkinfo", {})
        rec["info_data"] = info.get("info_data")
        link_peer = by_index.get(iface.get("link_index")) if iface.get("link_netnsid") is not None else None
        host_now = host_links.get(link_peer["ifname"]) if link_peer else None
        rec["link"] = host_now["ifname"] if host_now else None
        rec["link_master"] = host_now.get("master") if host_now else None
        c["iface"] = rec
    else:
        c["iface"] = None
    c["addresses"] = _addresses(iface)
    lo = cont_links.get("lo")
    c["lo"] = {"flags": sorted(lo.get("flags", [])), "addresses": _addresses(lo)["global"]} if lo else None
    c["routes"] = _routes(cont)
    c["sysctls"] = sysctls(cont, [
        f"net.ipv4.conf.{ifname}.arp_notify", f"net.ipv6.conf.{ifname}.ndisc_notify",
        f"net.ipv6.conf.{ifname}.accept_dad", f"net.ipv6.conf.{ifname}.enhanced_dad",
        f"net.ipv6.conf.{ifname}.disable_ipv6", f"net.ipv6.conf.{ifname}.keep_addr_on_down",
        f"net.ipv6.conf.{ifname}.accept_ra", "net.ipv6.conf.lo.disable_ipv6",
        "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"])
    snap["container"] = c

    # Host side.
    h: dict[str, Any] = {"links": sorted(host_links)}
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.forwarding"]
    if bridge:
        keys += [f"net.ipv6.conf.{bridge}.accept_ra", f"net.ipv6.conf.{bridge}.disable_ipv6",
                 f"net.ipv4.conf.{bridge}.arp_notify"]
    if host_veth:
        keys += [f"net.ipv6.conf.{host_veth}.accept_ra", f"net.ipv6.conf.{host_veth}.disable_ipv6"]
    h["sysctls"] = sysctls(host, keys)
    h["routes"] = _routes(host)
    if bridge:
        br = host_links.get(bridge)
        if br is None:
            h["bridge"] = {"exists": False}
        else:
            rec = _link_record(br)
            data = br.get("linkinfo", {}).get("info_data", {})
            rec["info_data"] = {k: data.get(k) for k in BRIDGE_INFO_KEYS if k in data}
            rec["exists"] = True
            rec["addr_assign_type"] = read_files(host, [f"/sys/class/net/{bridge}/addr_assign_type"]).popitem()[1]
            rec["addresses"] = _addresses(br, HOST_ADDR_VOLATILE)
            rec["ports"] = sorted(n for n, li in host_links.items() if li.get("master") == bridge)
            h["bridge"] = rec
        h["bridge_vlans"] = _bridge_json(host, "vlan", "show")
    if host_veth:
        hv = host_links.get(host_veth)
        rec = _link_record(hv) if hv else {}
        if hv:
            rec["master"] = hv.get("master")
            rec["addresses"] = _addresses(hv, HOST_ADDR_VOLATILE)
            port = _bridge_json(host, "-d", "link", "show", "dev", host_veth)
            rec["port"] = {k: v for k, v in port[0].items() if k not in PORT_VOLATILE} if port else None
        h["host_veth"] = rec
    if master:
        m = host_links.get(master)
        h["master"] = _link_record(m) if m else None
    h["iptables"] = _iptables(host)
    h["nftables"] = nftables_state(host)
    snap["host"] = h
    if ipam_dir is not None:
        snap["ipam"] = _ipam_state(ipam_dir)
    out = norm(snap)
    # Order of sets (links, routes) by their normalised form, so that random names cannot reorder them.
    for side in ("container", "host"):
        out[side]["links"] = sorted(out[side]["links"])
        for fam, rs in out[side]["routes"].items():
            out[side]["routes"][fam] = sorted(rs, key=lambda r: json.dumps(r, sort_keys=True))
    if isinstance(out["host"].get("bridge"), dict) and "ports" in out["host"]["bridge"]:
        out["host"]["bridge"]["ports"] = sorted(out["host"]["bridge"]["ports"])
    return out, norm


def _bridge_json(ns: str, *args: str) -> Any:
    out = _run("bridge", "-n", ns, "-j", *args, check=False)
    return json.loads(out) if out.strip() else []


# --- comparison ------------------------------------------------------------------------------------------

_ABSENT = object()


def _show(v: Any) -> str:
    return "<absent>" if v is _ABSENT else json.dumps(v, sort_keys=True)


def diff(ref: Any, ours: Any, path: str = "") -> list[str]:
    """Every differing leaf as `path: reference=<v> ours=<v>`; dict key order is ignored, list order is not,
    and JSON types are strict (true is not 1)."""
    if isinstance(ref, dict) and isinstance(ours, dict):
        out = []
        for k in sorted(set(ref) | set(ours), key=str):
            out += diff(ref.get(k, _ABSENT), ours.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(ref, list) and isinstance(ours, list):
        if len(ref) != len(ours):
            rs, os_ = [_show(x) for x in ref], [_show(x) for x in ours]
            return [f"{path}: {len(ref)} items in reference, {len(ours)} in ours; only in reference: "
                    f"[{', '.join(x for x in rs if x not in os_)}]; only in ours: [{', '.join(x for x in os_ if x not in rs)}]"]
        out = []
        for i in range(max(len(ref), len(ours))):
            out += diff(ref[i] if i < len(ref) else _ABSENT, ours[i] if i < len(ours) else _ABSENT, f"{path}[{i}]")
        return out
    if type(ref) is not type(ours) or ref != ours:
        return [f"{path}: reference={_show(ref)} ours={_show(ours)}"]
    return []
