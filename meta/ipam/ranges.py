"""Pure address arithmetic of meta-ipam: ranges, exclusions, blocks and object names.

A `Range` is one entry of the IPAM config (one address per range): its `network` (the CIDR), the dynamic
bounds `first`..`last` (range_start/range_end, clamped so that the network address and, for IPv4, the
broadcast address are never used), and `excluded`, merged closed intervals of addresses never handed to
anyone (the `exclude` list and the gateway).

Two sets follow from it:
- *assignable*: inside the network, not its network/broadcast address, not excluded. A static request may
  take any assignable address, also outside range_start..range_end, so that an operator can keep a static
  zone that dynamic allocation never touches.
- *dynamic*: assignable and inside first..last.

Blocks are aligned CIDRs of a network (`block_prefix` = the configured block size, or the network itself when
it is smaller), created lazily as store objects; addresses are handled as ints here and rendered at the edges.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence

import attrs

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interval = tuple[int, int]

DEFAULT_BLOCK_PREFIX = {4: 26, 6: 122}
# At most 1024 addresses per block: a full block with ~300 bytes per allocation stays around 300 KB, a fifth
# of etcd's 1.5 MiB request limit, and a /16 needs no more than 1024 objects at the default /26.
BLOCK_PREFIX_BOUNDS = {4: (22, 32), 6: (118, 128)}
MAX_BITS = {4: 32, 6: 128}


class RangeError(ValueError):
    """A bad range field; `field` is its path relative to the range (e.g. "range_start")."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field
        self.msg = msg


def parse_ip(text: object, field: str) -> Address:
    if not isinstance(text, str):
        raise RangeError(field, f"{text!r} is not an IP address")
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise RangeError(field, f"{text!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, non-overlapping, non-adjacent closed intervals covering the same addresses."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _interval_text(version: int, iv: Interval) -> str:
    a, b = _to_addr(version, iv[0]), _to_addr(version, iv[1])
    return str(a) if iv[0] == iv[1] else f"{a}-{b}"


def _to_addr(version: int, value: int) -> Address:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def parse_exclude(text: object, network: Network, field: str) -> Interval:
    """One `exclude` entry: an IP, a CIDR, or `first-last`; it must lie inside the range's network."""
    if not isinstance(text, str) or not text.strip():
        raise RangeError(field, f"{text!r} is not an IP, CIDR or first-last range")
    t = text.strip()
    if "-" in t:
        a_text, _, b_text = t.partition("-")
        a, b = parse_ip(a_text, field), parse_ip(b_text, field)
        if a.version != b.version or int(a) > int(b):
            raise RangeError(field, f"{t!r}: the first address must not come after the last one")
        lo, hi = int(a), int(b)
        version = a.version
    elif "/" in t:
        try:
            net = ipaddress.ip_network(t, strict=True)
        except ValueError as e:
            raise RangeError(field, f"{t!r} is not a CIDR ({e})") from None
        lo, hi, version = int(net.network_address), int(net.broadcast_address), net.version
    else:
        addr = parse_ip(t, field)
        lo = hi = int(addr)
        version = addr.version
    if version != network.version or lo < int(network.network_address) or hi > int(network.broadcast_address):
        raise RangeError(field, f"{t} is outside range network {network}")
    return lo, hi


@attrs.frozen
class Range:
    network: Network
    first: int
    last: int
    excluded: tuple[Interval, ...]
    gateway: Address | None = None

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def _net_bounds(self) -> Interval:
        lo, hi = int(self.network.network_address), int(self.network.broadcast_address)
        # The network address is never a host (for IPv6 it is the subnet-router anycast address, RFC 4291);
        # the IPv4 broadcast address neither.
        return lo + 1, hi - 1 if self.version == 4 else hi

    def _is_excluded(self, value: int) -> bool:
        i = bisect.bisect_right(self.excluded, (value, MAX_INT)) - 1
        return i >= 0 and self.excluded[i][0] <= value <= self.excluded[i][1]

    def assignable(self, value: int) -> bool:
        """May be held at all (a static request, or dynamic when also inside first..last)."""
        lo, hi = self._net_bounds()
        return lo <= value <= hi and not self._is_excluded(value)

    def dynamic(self, value: int) -> bool:
        return self.first <= value <= self.last and not self._is_excluded(value)

    def why_not_assignable(self, value: int) -> str | None:
        """Why a requested address cannot be reserved in this range (None when it can)."""
        addr = _to_addr(self.version, value)
        lo, hi = self._net_bounds()
        if not int(self.network.network_address) <= value <= int(self.network.broadcast_address):
            return f"{addr} is not in {self.network}"
        if value < lo:
            return f"{addr} is the network address of {self.network}"
        if value > hi:
            return f"{addr} is the broadcast address of {self.network}"
        if self.gateway is not None and int(self.gateway) == value:
            return f"{addr} is the gateway of {self.network}"
        if self._is_excluded(value):
            return f"{addr} is excluded in {self.canonical()}"
        return None

    def next_dynamic(self, value: int) -> int | None:
        """The smallest dynamic address >= value, jumping over exclusions (so huge IPv6 exclusions cost
        a bisect, not a walk)."""
        value = max(value, self.first)
        while value <= self.last:
            i = bisect.bisect_right(self.excluded, (value, MAX_INT)) - 1
            if i >= 0 and self.excluded[i][0] <= value <= self.excluded[i][1]:
                value = self.excluded[i][1] + 1
                continue
            return value
        return None

    def _count_not_excluded(self, lo: int, hi: int) -> int:
        """How many addresses of [lo, hi] (lo <= hi) no exclusion covers."""
        n = hi - lo + 1
        for a, b in self.excluded:
            a, b = max(a, lo), min(b, hi)
            if a <= b:
                n -= b - a + 1
        return n

    def count_dynamic(self, lo: int, hi: int) -> int:
        """How many dynamic addresses lie in [lo, hi]."""
        lo, hi = max(lo, self.first), min(hi, self.last)
        return self._count_not_excluded(lo, hi) if lo <= hi else 0

    def count_assignable(self) -> int:
        return self._count_not_excluded(*self._net_bounds())

    def contains(self, value: int) -> bool:
        return int(self.network.network_address) <= value <= int(self.network.broadcast_address)

    def canonical(self) -> str:
        """The range as the pool object records it: two configs with equal strings hand out exactly the
        same addresses (the gateway is folded into the exclusions, which is all it means to allocation)."""
        lo, hi = self._net_bounds()
        if (self.first, self.last) == (lo, hi):
            text = str(self.network)
        else:
            text = f"{_to_addr(self.version, self.first)}-{_to_addr(self.version, self.last)}/{self.prefixlen}"
        if self.excluded:
            text += " exclude " + ",".join(_interval_text(self.version, iv) for iv in self.excluded)
        return text

    def __str__(self) -> str:
        return self.canonical()


MAX_INT = 1 << 129


def parse_range(spec: object, *, range_start: object = None, range_end: object = None,
                exclude: Sequence[object] = (), gateway: Address | None = None) -> Range:
    """One range from its config fields. `spec` is a CIDR ("10.1.0.0/24") or "first-last/prefix"
    ("10.1.0.10-10.1.0.50/24"); range_start/range_end narrow the dynamic part further."""
    if not isinstance(spec, str) or "/" not in spec:
        raise RangeError("range", f"{spec!r} is not a CIDR or first-last/prefix")
    body, _, bits = spec.strip().rpartition("/")
    first_text = last_text = None
    if "-" in body:
        first_text, _, last_text = body.partition("-")
        try:
            iface = ipaddress.ip_interface(f"{first_text.strip()}/{bits}")
        except ValueError:
            raise RangeError("range", f"{spec!r} is not a CIDR or first-last/prefix") from None
        network = iface.network
    else:
        try:
            network = ipaddress.ip_network(spec.strip(), strict=False)
            iface = ipaddress.ip_interface(spec.strip())
        except ValueError:
            raise RangeError("range", f"{spec!r} is not a CIDR or first-last/prefix") from None
        if iface.ip != network.network_address:
            host_end = network.broadcast_address - 1 if network.version == 4 else network.broadcast_address
            raise RangeError("range", f"{spec} has host bits set: write {network} with range_start {iface.ip}, "
                                      f"or {iface.ip}-{host_end}/{network.prefixlen}")
    if network.prefixlen > network.max_prefixlen - 2:
        raise RangeError("range", f"{network} is too small to allocate from (at most /{network.max_prefixlen - 2})")
    if isinstance(network.network_address, ipaddress.IPv6Address) and network.network_address.ipv4_mapped:
        raise RangeError("range", f"{spec!r}: IPv4-mapped IPv6 ranges are not supported, write the IPv4 range")
    lo = int(network.network_address) + 1
    hi = int(network.broadcast_address) - (1 if network.version == 4 else 0)
    first, last = lo, hi

    def bound(text: object, field: str) -> int:
        addr = parse_ip(text, field)
        if addr.version != network.version or addr not in network:
            raise RangeError(field, f"{addr} is not in {network}")
        value = int(addr)
        if not lo <= value <= hi:
            what = "network" if value < lo else "broadcast"
            raise RangeError(field, f"{addr} is the {what} address of {network}")
        return value

    if first_text is not None and last_text is not None:
        first, last = bound(first_text, "range"), bound(last_text, "range")
        if first > last:
            raise RangeError("range", f"{spec}: the first address comes after the last one")
    if range_start not in (None, ""):
        first = max(first, bound(range_start, "range_start"))
    if range_end not in (None, ""):
        last = min(last, bound(range_end, "range_end"))
    if first > last:
        raise RangeError("range_end" if range_end not in (None, "") else "range_start",
                         f"the range is empty ({_to_addr(network.version, first)} comes after "
                         f"{_to_addr(network.version, last)})")
    if not isinstance(exclude, (list, tuple)):
        raise RangeError("exclude", "must be a list of IPs, CIDRs or first-last ranges")
    excluded = [parse_exclude(e, network, f"exclude[{i}]") for i, e in enumerate(exclude)]
    if gateway is not None:
        if gateway.version != network.version or gateway not in network:
            raise RangeError("gateway", f"{gateway} is not in {network}")
        if not lo <= int(gateway) <= hi:
            raise RangeError("gateway", f"{gateway} is the {'network' if int(gateway) < lo else 'broadcast'} "
                                        f"address of {network}")
        excluded.append((int(gateway), int(gateway)))
    # Clipped to the host addresses, so that equivalent exclusions give equal canonical strings.
    clipped = [(max(a, lo), min(b, hi)) for a, b in excluded if max(a, lo) <= min(b, hi)]
    r = Range(network=network, first=first, last=last, excluded=merge(clipped), gateway=gateway)
    if r.next_dynamic(first) is None:
        raise RangeError("exclude", f"excludes every address of {r.canonical().split(' ')[0]}")
    return r


def parse_canonical(text: str) -> Range:
    """A range back from `Range.canonical()` (pool objects; for `metactl ipam`)."""
    spec, _, rest = text.partition(" exclude ")
    return parse_range(spec, exclude=[e for e in rest.split(",") if e] if rest else [])


# --- blocks ---------------------------------------------------------------------------------------------


def block_prefix(r: Range, prefixes: dict[int, int]) -> int:
    """The block size of a range: the configured prefix, or the network itself when that is smaller."""
    return max(prefixes.get(r.version, DEFAULT_BLOCK_PREFIX[r.version]), r.prefixlen)


def block_start(value: int, prefix: int, version: int) -> int:
    size = 1 << (MAX_BITS[version] - prefix)
    return value - (value % size)


def block_size(prefix: int, version: int) -> int:
    return 1 << (MAX_BITS[version] - prefix)


def block_cidr(start: int, prefix: int, version: int) -> str:
    return f"{_to_addr(version, start)}/{prefix}"


def block_slots(r: Range, prefix: int) -> tuple[int, int]:
    """(first block start, number of block slots) covering the dynamic part first..last."""
    size = block_size(prefix, r.version)
    lo = block_start(r.first, prefix, r.version)
    return lo, (block_start(r.last, prefix, r.version) - lo) // size + 1


def dynamic_in_block(r: Range, start: int, prefix: int) -> Iterator[int]:
    """The dynamic addresses of block `start`, in order."""
    end = start + block_size(prefix, r.version) - 1
    value = r.next_dynamic(start)
    while value is not None and value <= end:
        yield value
        value = r.next_dynamic(value + 1)


def dynamic_block_starts(r: Range, prefix: int, begin_slot: int) -> Iterator[int]:
    """Starts of the blocks that hold at least one dynamic address, beginning at slot `begin_slot` and
    wrapping around once (a node's search starts at a hash of its name, so nodes spread over the range).
    Blocks wholly excluded are jumped over, not walked."""
    first_block, slots = block_slots(r, prefix)
    size = block_size(prefix, r.version)
    begin = first_block + (begin_slot % slots) * size
    for lo, hi in ((begin, first_block + slots * size - 1), (first_block, begin - 1)):
        value = r.next_dynamic(lo)
        while value is not None and value <= hi:
            start = block_start(value, prefix, r.version)
            yield start
            value = r.next_dynamic(start + size)


# --- names ----------------------------------------------------------------------------------------------

_DNS_LABEL_BAD = re.compile(r"[^a-z0-9-]+")
_MAX_BASE = 200  # leaves room for "-<8 hex hash>-<32 hex start>" within DNS-1123's 253


@functools.lru_cache(maxsize=256)
def pool_object_name(network_name: str) -> str:
    """A DNS-1123 name for a network: lowercase letters, digits and '-'; a name that had to be changed gets
    a short hash of the original, so distinct networks never share objects."""
    base = _DNS_LABEL_BAD.sub("-", network_name.lower())
    base = re.sub("-+", "-", base).strip("-")[:_MAX_BASE].strip("-")
    if base == network_name and base:
        return base
    digest = hashlib.sha256(network_name.encode()).hexdigest()[:8]
    return f"{base}-{digest}" if base else f"pool-{digest}"


def block_name(network_name: str, start: Address) -> str:
    """`<pool object name>-<start>`: 8 hex digits for IPv4, 32 for IPv6, so names sort by address."""
    width = 8 if start.version == 4 else 32
    return f"{pool_object_name(network_name)}-{int(start):0{width}x}"


def address(version: int, value: int) -> Address:
    return _to_addr(version, value)
