"""Built-in `host-local` IPAM: a drop-in for the reference host-local plugin, on the same on-disk store.

The store is the reference's, byte for byte, so ours and the Go plugin can serve the same network at
the same time (during a migration, or when one node runs both): `<dataDir>/<network>/<ip>` holds
"<containerID>\\r\\n<ifname>", `last_reserved_ip.<rangeset index>` the round-robin cursor, and every
change happens under flock(2) on `<dataDir>/<network>/lock`, the lock the Go plugin takes.

Fields: ranges (a list of range sets), or the single-range shorthand subnet/rangeStart/rangeEnd/gateway;
routes, dataDir (default /var/lib/cni/networks), resolvConf. Requested addresses: CNI_ARGS `IP=`,
`args.cni.ips` and the `ips` capability; `ipRanges` capability ranges come first.

Kept different on purpose:
- the whole ADD runs under one lock (the reference takes it per range set, so two ADDs can interleave
  between the v4 and v6 allocations of a dual-stack pod; harmless, but needless);
- a `gateway` outside its subnet is refused, as current upstream does (1.1.1 hands it out in results,
  which gives pods a default route that cannot work).
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from meta.cni import version as cniversion
from meta.cni.errors import INTERNAL, CNIError

from ._plugin import PluginArgs

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_IP_PREFIX = "last_reserved_ip."
LINE_BREAK = "\r\n"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _fail(msg: str) -> CNIError:
    # The reference's errors are plain Go errors, which its skeleton reports as code 999.
    return CNIError(INTERNAL, msg)


def _ip(text: Any, what: str) -> Address:
    try:
        addr = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise _fail(f"invalid {what} {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


@attrs.frozen
class Range:
    """One range with the reference's defaults filled in. `base` keeps the subnet's address as written:
    the reference counts the gateway and range start from it, host bits included."""

    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    base: Address
    start: Address
    end: Address
    gateway: Address

    def contains(self, addr: Address) -> bool:
        return addr.version == self.subnet.version and addr in self.subnet and self.start <= addr <= self.end

    def overlaps(self, other: Range) -> bool:
        if self.subnet.version != other.subnet.version:
            return False
        return (self.contains(other.start) or self.contains(other.end)
                or other.contains(self.start) or other.contains(self.end))

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


def _cidr(text: str) -> str:
    addr, _, bits = text.partition("/")
    return f"{addr}/{bits}"


def load_range(raw: Any) -> Range:
    if not isinstance(raw, dict) or not isinstance(raw.get("subnet"), str) or "/" not in raw["subnet"]:
        raise _fail(f"invalid range {raw!r}: subnet must be a CIDR")
    text = raw["subnet"]
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise _fail(f"invalid CIDR address: {text}") from None
    base = iface.ip.ipv4_mapped if isinstance(iface.ip, ipaddress.IPv6Address) and iface.ip.ipv4_mapped else iface.ip
    subnet = iface.network
    if subnet.prefixlen > subnet.max_prefixlen - 2:
        raise _fail(f"Network {_cidr(text)} too small to allocate from")

    def inside(addr: Address, start: Address | None = None, end: Address | None = None) -> Address:
        if addr.version != subnet.version:
            raise _fail(f"IP {addr} is not the same protocol as subnet {subnet}")
        if addr not in subnet:
            raise _fail(f"{addr} not in network {subnet}")
        if start is not None and addr < start:
            raise _fail(f"{addr} is in network {subnet} but before start {start}")
        if end is not None and addr > end:
            raise _fail(f"{addr} is in network {subnet} but after end {end}")
        return addr

    first = base + 1
    gateway = _ip(raw["gateway"], "gateway") if raw.get("gateway") else first
    if raw.get("gateway") and (gateway.version != subnet.version or gateway not in subnet):
        raise _fail(f"gateway {gateway} not in network {subnet}")
    try:
        start = inside(_ip(raw["rangeStart"], "rangeStart")) if raw.get("rangeStart") else first
    except CNIError as e:
        raise _fail(f"RangeStart {e.msg}") from None
    last = subnet.broadcast_address - 1 if subnet.version == 4 else subnet.broadcast_address
    try:
        end = inside(_ip(raw["rangeEnd"], "rangeEnd"), start) if raw.get("rangeEnd") else last
    except CNIError as e:
        raise _fail(f"RangeEnd {e.msg}") from None
    return Range(subnet=subnet, base=base, start=start, end=end, gateway=gateway)


RangeSet = tuple[Range, ...]


def _rangeset_str(rs: RangeSet) -> str:
    return ",".join(str(r) for r in rs)


def load_rangeset(raw: Any) -> RangeSet:
    if not isinstance(raw, list) or not raw:
        raise _fail("empty range set")
    rs = tuple(load_range(r) for r in raw)
    if len({r.subnet.version for r in rs}) > 1:
        raise _fail("mixed address families")
    for i, r1 in enumerate(rs):
        for r2 in rs[i + 1:]:
            if r1.overlaps(r2):
                raise _fail(f"subnets {r1} and {r2} overlap")
    return rs


def range_for(rs: RangeSet, addr: Address) -> Range | None:
    return next((r for r in rs if r.contains(addr)), None)


@attrs.frozen
class Conf:
    network: str
    data_dir: str
    ranges: tuple[RangeSet, ...]
    routes: tuple[dict[str, str], ...]
    resolv_conf: str
    requested: tuple[Address, ...]


def _requested(args: PluginArgs) -> list[Address]:
    out: list[Address] = []
    pairs = dict(args.cni_args)
    ignore_unknown = pairs.get("IgnoreUnknown", "") in ("1", "true", "True")
    unknown = [f"{k}={v}" for k, v in args.cni_args if k not in ("IgnoreUnknown", "IP")]
    if unknown and not ignore_unknown:
        raise _fail(f"ARGS: unknown args [{' '.join(json.dumps(u) for u in unknown)}]")
    if pairs.get("IP"):
        out.append(_ip(pairs["IP"], "CNI_ARGS IP"))
    cni = (args.config.get("args") or {}).get("cni") if isinstance(args.config.get("args"), dict) else None
    if isinstance(cni, dict) and isinstance(cni.get("ips"), list):
        out.extend(_ip(v, "args.cni.ips entry") for v in cni["ips"])
    for v in args.runtime_config.get("ips") or []:
        out.append(_ip(str(v).partition("/")[0], "runtimeConfig ips entry"))
    return out


def load_conf(args: PluginArgs) -> Conf:
    c = args.config
    ipam = c.get("ipam")
    if not isinstance(ipam, dict):
        raise _fail("IPAM config missing 'ipam' key")
    requested = _requested(args)
    raw_sets: list[Any] = []
    if ipam.get("subnet"):
        raw_sets.append([{k: ipam.get(k) for k in ("subnet", "rangeStart", "rangeEnd", "gateway")}])
    raw_sets.extend(ipam.get("ranges") or [])
    raw_sets = list(args.runtime_config.get("ipRanges") or []) + raw_sets
    if not raw_sets:
        raise _fail("no IP ranges specified")
    sets: list[RangeSet] = []
    for i, raw in enumerate(raw_sets):
        try:
            sets.append(load_rangeset(raw))
        except CNIError as e:
            raise _fail(f"invalid range set {i}: {e.msg}") from None
    families = [rs[0].subnet.version for rs in sets]
    if (families.count(4) > 1 or families.count(6) > 1) and not cniversion.at_least(args.cni_version, "0.3.0"):
        raise _fail(f"CNI version {args.cni_version} does not support more than 1 address per family")
    for i, a in enumerate(sets):
        for j, b in enumerate(sets[i + 1:], start=i + 1):
            if any(r1.overlaps(r2) for r1 in a for r2 in b):
                raise _fail(f"range set {i} overlaps with {j}")
    routes = []
    for r in ipam.get("routes") or []:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise _fail(f"invalid route {r!r}: dst must be a CIDR")
        routes.append({"dst": r["dst"], **({"gw": r["gw"]} if r.get("gw") else {})})
    name = c.get("name")
    if not isinstance(name, str) or not name:
        raise _fail("network config has no name")
    return Conf(network=name, data_dir=str(ipam.get("dataDir") or DEFAULT_DATA_DIR), ranges=tuple(sets),
                routes=tuple(routes), resolv_conf=str(ipam.get("resolvConf") or ""), requested=tuple(requested))


class Store:
    """The reference's disk store; every method expects the caller to hold `locked()`."""

    def __init__(self, data_dir: str, network: str) -> None:
        self.dir = Path(data_dir) / network

    @contextmanager
    def locked(self) -> Iterator[Store]:
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)  # closing releases the flock

    def reserve(self, cid: str, ifname: str, addr: Address, range_id: int) -> bool:
        try:
            fd = os.open(self.dir / str(addr), os.O_RDWR | os.O_EXCL | os.O_CREAT, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (cid.strip() + LINE_BREAK + ifname).encode())
        except OSError:
            os.close(fd)
            os.unlink(self.dir / str(addr))
            raise
        os.close(fd)
        (self.dir / f"{LAST_IP_PREFIX}{range_id}").write_text(str(addr))
        return True

    def last_reserved(self, range_id: int) -> Address | None:
        try:
            return _ip((self.dir / f"{LAST_IP_PREFIX}{range_id}").read_text(), "last reserved IP")
        except (OSError, CNIError):
            return None

    def _entries(self) -> Iterator[tuple[Path, str]]:
        for root, _dirs, names in os.walk(self.dir):
            for name in names:
                path = Path(root) / name
                try:
                    # Bytes, not text: text mode would turn the "\r\n" separator into "\n".
                    yield path, path.read_bytes().decode(errors="replace").strip()
                except OSError:
                    continue

    def _matching(self, cid: str, ifname: str) -> list[Path]:
        """Files of this attachment; files of the old one-line format (container ID only) when there are none."""
        entries = list(self._entries())
        current = [p for p, text in entries if text == cid.strip() + LINE_BREAK + ifname]
        return current or [p for p, text in entries if text == cid.strip()]

    def by_id(self, cid: str, ifname: str) -> list[Address]:
        entries = list(self._entries())
        out = []
        for path, text in entries:
            if text in (cid.strip() + LINE_BREAK + ifname, cid.strip()):
                try:
                    out.append(_ip(path.name, "reserved IP"))
                except CNIError:
                    continue
        return out

    def release(self, cid: str, ifname: str) -> None:
        for path in self._matching(cid, ifname):
            try:
                path.unlink()
            except OSError:
                continue  # as the reference: release as much as possible

    def find(self, cid: str, ifname: str) -> bool:
        return bool(self._matching(cid, ifname))


def _iterate(rs: RangeSet, last: Address | None) -> Iterator[tuple[Range, Address]]:
    """The reference's round robin: from the address after the last reserved one, through every range
    of the set once, skipping gateways."""
    idx, cur, start = 0, None, None
    if last is not None and range_for(rs, last) is not None:
        idx = next(i for i, r in enumerate(rs) if r.contains(last))
        cur = last
    else:
        start = rs[0].start
    while True:
        r = rs[idx]
        if cur is None:
            cur = start = r.start
        else:
            if cur == r.end:
                idx = (idx + 1) % len(rs)
                r = rs[idx]
                cur = r.start
            else:
                cur = cur + 1
            if start is None:
                start = cur
            elif cur == start:
                return
        if cur != r.gateway:
            yield r, cur


def _allocate(store: Store, rs: RangeSet, range_id: int, cid: str, ifname: str, requested: Address | None) -> dict[str, str]:
    if requested is not None:
        r = range_for(rs, requested)
        if r is None:
            raise _fail(f"{requested} not in range set {_rangeset_str(rs)}")
        if requested == r.gateway:
            raise _fail(f"requested ip {requested} is subnet's gateway")
        if not store.reserve(cid, ifname, requested, range_id):
            raise _fail(f"requested IP address {requested} is not available in range set {_rangeset_str(rs)}")
        return {"address": f"{requested}/{r.subnet.prefixlen}", "gateway": str(r.gateway)}
    for have in store.by_id(cid, ifname):
        if range_for(rs, have) is not None:
            raise _fail(f"{have} has been allocated to {cid}, duplicate allocation is not allowed")
    for r, addr in _iterate(rs, store.last_reserved(range_id)):
        if store.reserve(cid, ifname, addr, range_id):
            return {"address": f"{addr}/{r.subnet.prefixlen}", "gateway": str(r.gateway)}
    raise _fail(f"no IP addresses available in range set: {_rangeset_str(rs)}")


def parse_resolv_conf(path: str) -> dict[str, Any]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise _fail(f"open {path}: {e.strerror}") from None
    dns: dict[str, Any] = {}
    for line in lines:
        fields = line.strip().split()
        if len(fields) < 2 or fields[0][0] in "#;":
            continue
        key, rest = fields[0], fields[1:]
        if key == "nameserver":
            dns.setdefault("nameservers", []).append(rest[0])
        elif key == "domain":
            dns["domain"] = rest[0]
        elif key in ("search", "options"):
            dns.setdefault(key, []).extend(rest)
    return dns


def cmd_add(args: PluginArgs) -> dict[str, Any]:
    conf = load_conf(args)
    result: dict[str, Any] = {"cniVersion": cniversion.CURRENT}
    if conf.resolv_conf:
        dns = parse_resolv_conf(conf.resolv_conf)
        if dns:
            result["dns"] = dns
    pending = list(conf.requested)
    ips = []
    with Store(conf.data_dir, conf.network).locked() as store:
        try:
            for idx, rs in enumerate(conf.ranges):
                want = next((a for a in pending if range_for(rs, a) is not None), None)
                if want is not None:
                    pending.remove(want)
                try:
                    ips.append(_allocate(store, rs, idx, args.container_id, args.ifname, want))
                except CNIError as e:
                    raise _fail(f"failed to allocate for range {idx}: {e.msg}") from None
            if pending:
                raise _fail("failed to allocate all requested IPs: " + " ".join(str(a) for a in pending))
        except CNIError:
            if ips:
                store.release(args.container_id, args.ifname)
            raise
    result["ips"] = ips
    if conf.routes:
        result["routes"] = [dict(r) for r in conf.routes]
    return result


def cmd_del(args: PluginArgs) -> None:
    conf = load_conf(args)
    with Store(conf.data_dir, conf.network).locked() as store:
        store.release(args.container_id, args.ifname)


def cmd_check(args: PluginArgs) -> None:
    conf = load_conf(args)
    with Store(conf.data_dir, conf.network).locked() as store:
        if not store.find(args.container_id, args.ifname):
            raise _fail(f"host-local: Failed to find address added by container {args.container_id}")


def cmd_status(args: PluginArgs) -> None:
    conf = load_conf(args)
    directory = Path(conf.data_dir)
    probe = directory if directory.exists() else directory.parent
    if probe.exists() and not os.access(probe, os.W_OK):
        raise CNIError(50, f"host-local dataDir {conf.data_dir} is not writable")


def main() -> int:
    from ._plugin import standalone_main

    return standalone_main(sys.modules[__name__], "meta-host-local")


if __name__ == "__main__":
    sys.exit(main())
