"""The `meta-ipam` configuration and request, parsed without I/O.

IPAM fields (the `ipam` object of the plugin config; names follow Whereabouts where it has one):
- `range`: CIDR ("10.1.0.0/24") or first-last/prefix ("10.1.0.10-10.1.0.50/24"), with `range_start`,
  `range_end`, `exclude` (IPs, CIDRs or first-last ranges) and `gateway`;
- `ipRanges`: more ranges, each {range, range_start, range_end, exclude, gateway}; one address is allocated
  per range (so a v4 and a v6 range make a dual-stack attachment);
- `gateway`: an IP, or a list with one IP per family; each applies to the ranges whose network holds it
  (a range's own `gateway` wins). Gateways are never allocated;
- `routes` ([{dst, gw}]) and `dns` ({nameservers, domain, search, options}) are returned as given;
- `network_name` (default: the network's `name`): the pool. NADs naming the same pool share its addresses
  and must agree on its ranges; equal ranges under different names are kept apart;
- `block_size` ({"4": 26, "6": 122}): prefix length of the blocks the pool is sharded into;
- `sticky`: a StatefulSet pod (name ending in -<ordinal>) keeps its address across DEL/ADD;
- `nodeName` (default $NODE_NAME, else the host name), `kubeconfig` + `apiTimeout` (the cluster store), or
  `dataDir` (the local file store, default /var/lib/cni/meta-ipam).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from meta.cni import args as cniargs

from .ranges import (BLOCK_PREFIX_BOUNDS, DEFAULT_BLOCK_PREFIX, Address, Range, RangeError, block_prefix,
                     parse_ip, parse_range)

DEFAULT_DATA_DIR = "/var/lib/cni/meta-ipam"
DEFAULT_API_TIMEOUT = 10.0
CLAIM_REFERENCE = "ipam-claim-reference"
# StatefulSet pods are named <set>-<ordinal>.
_ORDINAL = re.compile(r"^.+-(0|[1-9][0-9]*)$")


class ConfigError(ValueError):
    """A bad field of the ipam object: `field` is its path ("ipRanges[1].range_start")."""

    def __init__(self, field: str, msg: str, *, request: bool = False) -> None:
        # Request fields (runtimeConfig, args.cni, CNI_ARGS) are not under ipam.
        self.path = field if request else f"ipam.{field}"
        super().__init__(f"{self.path}: {msg}")
        self.field = field
        self.msg = msg


@attrs.frozen
class PoolSpec:
    """What a pool is: the ranges it hands out and its block sizes. Stored as the pool object, so that
    every NAD using the same network_name can be checked against the first one."""

    network_name: str
    ranges: tuple[Range, ...]
    block_prefix: Mapping[int, int] = attrs.field(factory=lambda: dict(DEFAULT_BLOCK_PREFIX), eq=False)

    def prefix_of(self, r: Range) -> int:
        return block_prefix(r, dict(self.block_prefix))

    def data(self) -> dict[str, Any]:
        return {"pool": self.network_name, "ranges": [r.canonical() for r in self.ranges],
                "blockPrefix": {str(v): self.block_prefix.get(v, DEFAULT_BLOCK_PREFIX[v]) for v in (4, 6)}}

    def agrees_with(self, stored: Mapping[str, Any]) -> bool:
        # Range order does not change which addresses are handed out, so it may differ between NADs; the
        # block size of a family without ranges changes nothing either.
        mine = self.data()
        theirs = {str(k): v for k, v in (stored.get("blockPrefix") or {}).items()}
        families = {str(r.version) for r in self.ranges}
        return (sorted(mine["ranges"]) == sorted(stored.get("ranges") or [])
                and all(mine["blockPrefix"][f] == theirs.get(f) for f in families))


@attrs.frozen
class IpamConf:
    network: str
    pool: PoolSpec
    routes: tuple[dict[str, str], ...] = ()
    dns: dict[str, Any] = attrs.field(factory=dict, eq=False)
    sticky: bool = False
    node_name: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    kubeconfig: str | None = None
    api_timeout: float = DEFAULT_API_TIMEOUT


def node_name(explicit: str | None = None) -> str:
    """The node allocations are recorded for: `explicit` (the ipam config's nodeName, the daemon's
    --node-name), else $NODE_NAME, else the host name. The plugin and the daemon's garbage collector must
    agree on it, or the collector would never see this node's allocations."""
    return explicit or os.environ.get("NODE_NAME") or socket.gethostname()


@attrs.frozen
class Owner:
    """Who holds an address: the attachment (container ID + interface) and, for people and GC, the pod and
    the CNI network the address was asked for (`network`: two networks may share one pool through
    network_name, and CNI GC of one must not free the other's addresses)."""

    container_id: str
    ifname: str
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    network: str = ""

    def entry(self, node: str, *, static: bool = False, claim: str | None = None) -> dict[str, Any]:
        """The allocation record, written in the same store write that reserves the address."""
        return {"containerID": self.container_id, "ifname": self.ifname, "podNamespace": self.pod_namespace,
                "podName": self.pod_name, "podUID": self.pod_uid, "network": self.network, "node": node,
                "static": static, "claim": claim, "released": False}

    def owns(self, entry: Mapping[str, Any]) -> bool:
        return (entry.get("containerID") == self.container_id and entry.get("ifname") == self.ifname
                and not entry.get("released"))

    def replaces(self, entry: Mapping[str, Any]) -> bool:
        """An older sandbox of this very pod (same UID) on the same interface: kubelet runs one sandbox per
        pod at a time, so that one is dead (a reboot without DEL, danm #167) and its address is ours."""
        return (bool(self.pod_uid) and entry.get("podUID") == self.pod_uid and entry.get("ifname") == self.ifname
                and entry.get("containerID") != self.container_id and not entry.get("released"))

    def __str__(self) -> str:
        pod = f"pod {self.pod_namespace}/{self.pod_name}" if self.pod_name else "no pod"
        return f"{pod}, container {self.container_id[:12]} {self.ifname}"


def describe(entry: Mapping[str, Any]) -> str:
    """An allocation's holder for messages."""
    pod = f"pod {entry.get('podNamespace')}/{entry.get('podName')}" if entry.get("podName") else "no pod"
    uid = f" (uid {entry['podUID']})" if entry.get("podUID") else ""
    state = ", released, kept for claim " + str(entry.get("claim")) if entry.get("released") else ""
    return (f"{pod}{uid}, container {str(entry.get('containerID'))[:12]} interface {entry.get('ifname')} "
            f"on node {entry.get('node') or '?'}{state}")


@attrs.frozen
class Request:
    owner: Owner
    static: tuple[Address, ...] = ()
    claim: str | None = None


def _str(ipam: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    v = ipam.get(key)
    if v is None or v == "":
        return default
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a string, got {v!r}")
    return v


def _range(raw: Mapping[str, Any], where: str, gateway: Address | None) -> Range:
    try:
        return parse_range(raw.get("range"), range_start=raw.get("range_start"), range_end=raw.get("range_end"),
                           exclude=raw.get("exclude") or [], gateway=gateway)
    except RangeError as e:
        raise ConfigError(f"{where}{e.field}", e.msg) from None


def _gateways(raw: object, field: str) -> list[Address]:
    items = raw if isinstance(raw, list) else [raw]
    out: list[Address] = []
    for i, g in enumerate(items):
        try:
            out.append(parse_ip(g, field if not isinstance(raw, list) else f"{field}[{i}]"))
        except RangeError as e:
            raise ConfigError(e.field, e.msg) from None
    return out


def _net_of(spec: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network a range spec names, before full parsing (to hand top-level gateways to ranges)."""
    if not isinstance(spec, str) or "/" not in spec:
        return None
    body, _, bits = spec.strip().rpartition("/")
    try:
        return ipaddress.ip_interface(f"{body.partition('-')[0].strip()}/{bits}").network
    except ValueError:
        return None


def parse_ranges(ipam: Mapping[str, Any]) -> tuple[Range, ...]:
    raws: list[tuple[str, Mapping[str, Any]]] = []
    if ipam.get("range") not in (None, ""):
        raws.append(("", ipam))
    elif ipam.get("range_start") or ipam.get("range_end") or ipam.get("exclude"):
        raise ConfigError("range", "missing (range_start, range_end and exclude narrow a range)")
    extra = ipam.get("ipRanges") or []
    if not isinstance(extra, list):
        raise ConfigError("ipRanges", "must be a list of {range, range_start, range_end, exclude, gateway}")
    for i, r in enumerate(extra):
        if not isinstance(r, Mapping):
            raise ConfigError(f"ipRanges[{i}]", "must be an object with a range")
        raws.append((f"ipRanges[{i}].", r))
    if not raws:
        raise ConfigError("range", "missing: give a range or ipRanges")
    shared = _gateways(ipam["gateway"], "gateway") if ipam.get("gateway") not in (None, "", []) else []
    used_shared: set[Address] = set()
    ranges: list[Range] = []
    for where, raw in raws:
        own = raw.get("gateway") if where else None
        if own not in (None, ""):
            gw: Address | None = _gateways(own, f"{where}gateway")[0] if not isinstance(own, list) else None
            if gw is None:
                raise ConfigError(f"{where}gateway", "must be one IP (the top-level gateway may list one per family)")
        else:
            net = _net_of(raw.get("range"))
            matching = [g for g in shared if net is not None and g.version == net.version and g in net]
            if len(matching) > 1:
                raise ConfigError("gateway", f"{', '.join(map(str, matching))} are all in {net}: one gateway per range")
            gw = matching[0] if matching else None
            used_shared.update(matching)
        ranges.append(_range(raw, where, gw))
    for g in shared:
        if g not in used_shared:
            raise ConfigError("gateway", f"{g} is in none of the ranges")
    for i, a in enumerate(ranges):
        for j in range(i + 1, len(ranges)):
            b = ranges[j]
            if a.version == b.version and a.network.overlaps(b.network):
                raise ConfigError(f"{raws[j][0]}range", f"{b.network} overlaps {a.network} of "
                                                        f"{raws[i][0] or ''}range: ranges of one pool must be disjoint")
    return tuple(ranges)


def _block_prefixes(raw: object) -> dict[int, int]:
    out = dict(DEFAULT_BLOCK_PREFIX)
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        raise ConfigError("block_size", f'must be an object of prefix lengths like {{"4": 26, "6": 122}}, got {raw!r}')
    for key, value in raw.items():
        if str(key) not in ("4", "6"):
            raise ConfigError(f"block_size.{key}", 'unknown family: use "4" or "6"')
        version = int(key)
        lo, hi = BLOCK_PREFIX_BOUNDS[version]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"block_size.{key}", f"must be a prefix length from {lo} to {hi}, got {value!r}")
        out[version] = value
    return out


def _routes(raw: object, ranges: Sequence[Range]) -> tuple[dict[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("routes", "must be a list of {dst, gw}")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, Mapping) or not isinstance(r.get("dst"), str):
            raise ConfigError(f"routes[{i}].dst", "missing: every route needs a destination CIDR")
        try:
            ipaddress.ip_network(r["dst"], strict=False)
        except ValueError:
            raise ConfigError(f"routes[{i}].dst", f"{r['dst']!r} is not a CIDR") from None
        route = {"dst": r["dst"]}
        if r.get("gw") not in (None, ""):
            try:
                gw = parse_ip(r["gw"], f"routes[{i}].gw")
            except RangeError as e:
                raise ConfigError(e.field, e.msg) from None
            for rng in ranges:
                # A next hop that a pod could be given would blackhole the route's traffic.
                if rng.version == gw.version and rng.contains(int(gw)) and rng.assignable(int(gw)):
                    raise ConfigError(f"routes[{i}].gw", f"{gw} is inside range {rng.canonical()} and could be "
                                                          f"handed to a pod: make it the gateway or exclude it")
            route["gw"] = str(gw)
        out.append(route)
    return tuple(out)


def parse(ipam: object, network: str) -> IpamConf:
    """The ipam object of network `network`; raises ConfigError naming the field."""
    if not isinstance(ipam, Mapping):
        raise ConfigError("ipam", "missing: the config has no ipam object", request=True)
    ranges = parse_ranges(ipam)
    dns = ipam.get("dns") or {}
    if not isinstance(dns, Mapping):
        raise ConfigError("dns", "must be an object {nameservers, domain, search, options}")
    sticky = ipam.get("sticky", False)
    if not isinstance(sticky, bool):
        raise ConfigError("sticky", f"must be true or false, got {sticky!r}")
    timeout = ipam.get("apiTimeout", DEFAULT_API_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError("apiTimeout", f"must be a number of seconds > 0, got {timeout!r}")
    network_name = _str(ipam, "network_name", network) or network
    if not network_name:
        raise ConfigError("network_name", "missing, and the network has no name")
    pool = PoolSpec(network_name=network_name, ranges=ranges, block_prefix=_block_prefixes(ipam.get("block_size")))
    return IpamConf(network=network, pool=pool, routes=_routes(ipam.get("routes"), ranges), dns=dict(dns),
                    sticky=sticky, node_name=_str(ipam, "nodeName"), data_dir=_str(ipam, "dataDir", DEFAULT_DATA_DIR)
                    or DEFAULT_DATA_DIR, kubeconfig=_str(ipam, "kubeconfig"), api_timeout=float(timeout))


def _static_texts(cni_args: cniargs.Pairs, runtime_config: Mapping[str, Any],
                  args_cni: Mapping[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, v in enumerate(runtime_config.get("ips") or []):
        out.append((f"runtimeConfig.ips[{i}]", v))
    ips = args_cni.get("ips")
    if ips is not None and not isinstance(ips, list):
        raise ConfigError("args.cni.ips", "must be a list of IPs", request=True)
    for i, v in enumerate(ips or []):
        out.append((f"args.cni.ips[{i}]", v))
    ip_arg = cniargs.get(cni_args, "IP")
    if ip_arg:
        out += [("CNI_ARGS IP", part) for part in ip_arg.split(",") if part.strip()]
    return out


def parse_request(*, container_id: str, ifname: str, network: str, cni_args: cniargs.Pairs,
                  runtime_config: Mapping[str, Any], args_cni: Mapping[str, Any], sticky: bool) -> Request:
    """Who asks (the owner recorded with the address), which static addresses, and which sticky claim."""
    owner = Owner(container_id=container_id, ifname=ifname,
                  pod_namespace=cniargs.get(cni_args, cniargs.POD_NAMESPACE) or "",
                  pod_name=cniargs.get(cni_args, cniargs.POD_NAME) or "",
                  pod_uid=cniargs.get(cni_args, cniargs.POD_UID) or "", network=network)
    static: list[Address] = []
    for where, text in _static_texts(cni_args, runtime_config, args_cni):
        # A prefix length may come with the address (the `ips` capability carries CIDRs); the range's wins.
        try:
            addr = parse_ip(str(text).partition("/")[0], where)
        except RangeError as e:
            raise ConfigError(e.field, e.msg, request=True) from None
        if addr not in static:
            static.append(addr)
    claim: str | None = None
    ref = args_cni.get(CLAIM_REFERENCE)
    if ref not in (None, ""):
        if not isinstance(ref, str):
            raise ConfigError(f"args.cni.{CLAIM_REFERENCE}", f"must be a string, got {ref!r}", request=True)
        # Claim names are per namespace, and never mistaken for the pod-name claims below.
        claim = f"ipamclaim:{owner.pod_namespace}/{ref}"
    elif sticky and owner.pod_name and _ORDINAL.match(owner.pod_name):
        claim = f"{owner.pod_namespace}/{owner.pod_name}"
    return Request(owner=owner, static=tuple(static), claim=claim)
