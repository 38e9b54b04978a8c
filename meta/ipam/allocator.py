"""The meta-ipam allocator: addresses from a pool sharded into blocks, over any `store.Store`.

Objects (shapes shared with `kubestore`):
- pool  `pool_object_name(network_name)`: {"pool", "ranges": [canonical range], "blockPrefix": {"4", "6"}},
  created on first use; a config disagreeing with it is refused (CNI error 7), naming both;
- block `block_name(network_name, start)`: {"pool", "cidr", "node": lease holder or "", "used",
  "allocations": {ip: {containerID, ifname, podNamespace, podName, podUID, node, static, claim, released}}}.

Every reservation is one write of one block that carries its owner, made with the version that was read, so
two writers never both win and no address exists without its owner (DANM and Whereabouts write the address
and the owner separately). There is no pool-wide lock: a node allocates from blocks leased to it, leases a
new block when they are full (its search starts at a hash of its name, spreading nodes over the range), and
borrows from other nodes' blocks only when no block is left to lease, so a pool can be filled to its last
address. A Conflict re-reads that block and retries with backoff and jitter, up to a bound (then CNI
error 11). The allocator caches this node's blocks (it may live in the daemon) but a write always names
the version read, and an answer taken from the cache without a write is confirmed by a fresh read.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from meta.cni.errors import INTERNAL, INVALID_CONFIG, TRY_AGAIN_LATER, CNIError

from . import collect
from .config import Owner, PoolSpec, describe
from .ranges import (Address, Range, address, block_cidr, block_name, block_size, block_slots, block_start,
                     dynamic_block_starts, dynamic_in_block, pool_object_name)
from .store import BLOCK, POOL, Conflict, Store, Unavailable, Versioned

# The decision callback of a block write: the new body and the chosen address, (None, address) when the
# block already says what we want (no write), or None when this block cannot serve the request.
Decision = tuple[dict[str, Any] | None, Address] | None


@attrs.frozen
class Lease:
    """One address handed to an owner, with what the CNI result needs."""

    range_index: int
    address: Address
    prefixlen: int
    gateway: Address | None
    block: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def _fail(pool: str, msg: str, code: int = INTERNAL) -> CNIError:
    return CNIError(code, f'meta-ipam pool "{pool}": {msg}')


@functools.lru_cache(maxsize=4096)
def _net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr)


@functools.lru_cache(maxsize=65536)
def _ip(text: str) -> Address:
    return ipaddress.ip_address(text)


def _overlaps(obj: Versioned, r: Range) -> bool:
    net = _net(str(obj.data.get("cidr")))
    return net.version == r.version and net.overlaps(r.network)


def _start(obj: Versioned) -> int:
    return int(_net(str(obj.data.get("cidr"))).network_address)


def _in_range(ip: str, r: Range) -> bool:
    a = _ip(ip)
    return a.version == r.version and r.contains(int(a))


def assign_static(pool: PoolSpec, static: Sequence[Address]) -> dict[int, Address]:
    """Which range each requested address belongs to (one per range); error 7 for an address no range can
    give: it is the pod's request that is wrong, whoever holds what."""
    out: dict[int, Address] = {}
    for ip in static:
        idx = next((i for i, r in enumerate(pool.ranges) if r.version == ip.version and r.contains(int(ip))), None)
        if idx is None:
            raise _fail(pool.network_name, f"requested address {ip} is in none of its ranges "
                                           f"({'; '.join(r.canonical() for r in pool.ranges)})", INVALID_CONFIG)
        why = pool.ranges[idx].why_not_assignable(int(ip))
        if why:
            raise _fail(pool.network_name, f"requested address {ip} cannot be reserved: {why}", INVALID_CONFIG)
        if idx in out:
            raise _fail(pool.network_name, f"requested addresses {out[idx]} and {ip} are both in range "
                                           f"{pool.ranges[idx].network}: one address per range", INVALID_CONFIG)
        out[idx] = ip
    return out


def pick_free(r: Range, start: int, prefix: int, allocations: dict[str, Any]) -> Address | None:
    """Next-fit inside one block without stored state: the first free dynamic address above the highest
    dynamically allocated one, wrapping to the lowest. Freed addresses are thus not handed out again at once
    (Whereabouts' lowest-free does, #288), and exec'd and in-daemon allocators behave alike."""
    taken = {int(_ip(k)) for k in allocations}
    dynamic_taken = [int(_ip(k)) for k, e in allocations.items() if not e.get("static")]
    top = max(dynamic_taken) if dynamic_taken else start - 1
    lower: Address | None = None
    for value in dynamic_in_block(r, start, prefix):
        if value in taken:
            continue
        if value > top:
            return address(r.version, value)
        if lower is None:
            lower = address(r.version, value)
    return lower


def free_dynamic(r: Range, obj: Versioned, prefix: int) -> int:
    start = _start(obj)
    capacity = r.count_dynamic(start, start + block_size(prefix, r.version) - 1)
    held = sum(1 for k in obj.data.get("allocations") or {} if _in_range(k, r) and r.dynamic(int(_ip(k))))
    return capacity - held


class _Call:
    """State of one allocate/release: its conflict budget and the pool-wide listing (read at most once)."""

    def __init__(self, allocator: Allocator) -> None:
        self.a = allocator
        self.conflicts = 0
        self.all: dict[str, Versioned] | None = None
        self.fresh: set[str] = set()
        self.node_listed = False

    def conflict(self, pool: str) -> None:
        self.conflicts += 1
        if self.conflicts > self.a.max_conflicts:
            raise Unavailable(f"gave up after {self.a.max_conflicts} conflicting writes to pool {pool} (contention)")
        base, cap = self.a.backoff
        delay = min(cap, base * 2 ** min(self.conflicts, 20))
        self.a.sleep(self.a.rng.uniform(delay / 2, delay))  # jitter: contenders do not retry in lockstep


class Allocator:
    """Allocates for one node. Thread-safe (the daemon runs requests side by side); one instance per store
    and node is meant to live as long as the process."""

    def __init__(self, store: Store, node: str, *, max_conflicts: int = 100,
                 backoff: tuple[float, float] = (0.002, 0.1), sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        self.store = store
        self.node = node
        self.max_conflicts = max_conflicts
        self.backoff = backoff
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._guard = threading.Lock()
        self._pool_locks: dict[str, threading.Lock] = {}
        self._blocks: dict[str, dict[str, Versioned]] = {}  # pool -> blocks leased to this node, as last seen
        self._pools_ok: dict[str, dict[str, Any]] = {}

    # --- public API -------------------------------------------------------------------------------------

    def allocate(self, pool: PoolSpec, owner: Owner, *, static: Sequence[Address] = (),
                 claim: str | None = None) -> list[Lease]:
        """One address per range of `pool` for `owner`: its static request for that range, else what the
        owner (or an older sandbox of the same pod and interface) already holds, else the claim's address,
        else a dynamic one. All or nothing: on failure the owner's addresses in the pool are released."""
        wanted = assign_static(pool, static)
        with self._pool_lock(pool.network_name):
            call = _Call(self)
            leases: list[Lease] = []
            try:
                self._ensure_pool(pool)
                for i in range(len(pool.ranges)):
                    leases.append(self._one(call, pool, i, owner, wanted.get(i), claim))
                return leases
            except BaseException as e:
                if leases:
                    try:
                        self._release(_Call(self), pool, owner, [x.address for x in leases])
                    except Exception:  # the original error is the one to report; DEL retries the rest
                        pass
                if isinstance(e, Unavailable):
                    raise _fail(pool.network_name, f"store unavailable: {e}", TRY_AGAIN_LATER) from None
                raise

    def release(self, pool: PoolSpec, owner: Owner, *, hints: Sequence[Address] = ()) -> list[Address]:
        """Free exactly `owner`'s addresses in the pool (sticky ones are marked released and stay held for
        their claim). `hints` (prevResult, static requests) name blocks to look in besides this node's; the
        whole pool is searched only when a range is still unaccounted for. Nothing found is success."""
        with self._pool_lock(pool.network_name):
            try:
                return self._release(_Call(self), pool, owner, hints)
            except Unavailable as e:
                raise _fail(pool.network_name, f"store unavailable: {e}", TRY_AGAIN_LATER) from None

    def held(self, pool: PoolSpec, owner: Owner, *, hints: Sequence[Address] = ()) -> dict[int, Address]:
        """What `owner` holds, by range index (for CHECK)."""
        with self._pool_lock(pool.network_name):
            try:
                found = [a for a, _ in self._owned(_Call(self), pool, owner, hints)]
            except Unavailable as e:
                raise _fail(pool.network_name, f"store unavailable: {e}", TRY_AGAIN_LATER) from None
        out: dict[int, Address] = {}
        for i, r in enumerate(pool.ranges):
            for a in found:
                if a.version == r.version and r.contains(int(a)):
                    out[i] = a
                    break
        return out

    def release_address(self, network_name: str, ip: Address) -> dict[str, Any] | None:
        """Free one address by hand (metactl), sticky or not; its former entry, or None when not allocated."""
        with self._pool_lock(network_name):
            call = _Call(self)
            for obj in list(self._all_blocks(call, network_name).values()):
                if ip in _net(str(obj.data.get("cidr"))) and str(ip) in (obj.data.get("allocations") or {}):
                    gone: list[dict[str, Any]] = []

                    def drop(data: dict[str, Any] | None) -> Decision:
                        if data is None or str(ip) not in data["allocations"]:
                            return None
                        gone.append(data["allocations"].pop(str(ip)))
                        return data, ip

                    if self._write(call, network_name, obj.name, obj, drop):
                        return gone[-1]
            return None

    def free(self, network_name: str, targets: Sequence[collect.Held], known: Mapping[str, Versioned] | None = None,
             on_freed: Callable[[collect.Held], None] | None = None) -> list[collect.Held]:
        """Garbage collection: remove each target's allocation while it is still exactly that allocation
        (collect.drop), one write per block; a lost race re-reads the block and decides again, so an entry
        that changed hands meanwhile stays. `known`: blocks as the collector read them (spares a GET each).
        `on_freed` hears of each target as soon as its block is written (so what was freed before a later
        block failed is still reported). The targets freed."""
        with self._pool_lock(network_name):
            call = _Call(self)
            out: list[collect.Held] = []
            by_block: dict[str, list[collect.Held]] = {}
            for t in targets:
                by_block.setdefault(t.block, []).append(t)
            try:
                for name, mine in sorted(by_block.items()):
                    obj = (known or {}).get(name)
                    if obj is None:
                        obj = self._get(call, network_name, name)
                    freed: list[collect.Held] = []

                    def decide(data: dict[str, Any] | None, mine: list[collect.Held] = mine,
                               freed: list[collect.Held] = freed) -> Decision:
                        freed[:] = collect.drop(data, mine) if data is not None else []
                        return (data, _ip(freed[0].ip)) if data is not None and freed else None

                    if obj is not None and self._write(call, network_name, name, obj, decide):
                        out += freed
                        if on_freed is not None:
                            for t in freed:
                                on_freed(t)
            except Unavailable as e:
                raise _fail(network_name, f"store unavailable: {e}", TRY_AGAIN_LATER) from None
            return out

    def forget(self) -> None:
        """Drop the caches (tests; or after the store was changed behind our back)."""
        with self._guard:
            self._blocks.clear()
            self._pools_ok.clear()

    # --- pool -------------------------------------------------------------------------------------------

    def _pool_lock(self, pool: str) -> threading.Lock:
        # Requests of one pool in this process take turns: they would only conflict with each other.
        with self._guard:
            return self._pool_locks.setdefault(pool, threading.Lock())

    def _ensure_pool(self, pool: PoolSpec) -> None:
        want = pool.data()
        with self._guard:
            if self._pools_ok.get(pool.network_name) == want:
                return
        name = pool_object_name(pool.network_name)
        obj = self.store.get(POOL, name)
        for _ in range(3):
            if obj is not None:
                break
            try:
                obj = self.store.create(POOL, name, want)
            except Conflict:
                obj = self.store.get(POOL, name)
        if obj is None:
            raise Unavailable(f"pool object {name} keeps disappearing")
        if obj.data.get("pool") != pool.network_name:
            raise _fail(pool.network_name, f"pool object {name} belongs to network_name {obj.data.get('pool')!r}")
        if not pool.agrees_with(obj.data):
            raise _fail(pool.network_name,
                        f"this config has ranges {want['ranges']} with blockPrefix {want['blockPrefix']}, "
                        f"but the pool was "
                        f"created with ranges {obj.data.get('ranges')} with blockPrefix {obj.data.get('blockPrefix')}: "
                        f"configs sharing a network_name must have the same ranges, or use their own network_name",
                        INVALID_CONFIG)
        with self._guard:
            self._pools_ok[pool.network_name] = want

    # --- reading, with the cache ------------------------------------------------------------------------

    def _seen(self, call: _Call, pool: str, name: str, obj: Versioned | None) -> None:
        """Record what the store said about one block (read or written)."""
        call.fresh.add(name)
        if call.all is not None:
            if obj is None:
                call.all.pop(name, None)
            else:
                call.all[name] = obj
        with self._guard:
            cache = self._blocks.setdefault(pool, {})
            if obj is not None and obj.data.get("node") == self.node:
                cache[name] = obj
            else:
                cache.pop(name, None)

    def _get(self, call: _Call, pool: str, name: str) -> Versioned | None:
        obj = self.store.get(BLOCK, name)
        if obj is not None and obj.data.get("pool") != pool:
            raise _fail(pool, f"block object {name} belongs to network_name {obj.data.get('pool')!r}")
        self._seen(call, pool, name, obj)
        return obj

    def _node_blocks(self, call: _Call, pool: str, refresh: bool = False) -> list[Versioned]:
        with self._guard:
            cached = self._blocks.get(pool)
        if cached is None or refresh:
            objs = self.store.list(BLOCK, pool, node=self.node)
            call.node_listed = True
            with self._guard:
                self._blocks[pool] = {o.name: o for o in objs}
            call.fresh.update(o.name for o in objs)
            if call.all is not None:
                call.all.update({o.name: o for o in objs})
            cached = {o.name: o for o in objs}
        return sorted(cached.values(), key=_start)

    def _all_blocks(self, call: _Call, pool: str) -> dict[str, Versioned]:
        if call.all is None:
            objs = self.store.list(BLOCK, pool)
            call.all = {}
            with self._guard:
                self._blocks[pool] = {}
            for o in objs:
                self._seen(call, pool, o.name, o)
        return call.all

    # --- writing ----------------------------------------------------------------------------------------

    def _write(self, call: _Call, pool: str, name: str, obj: Versioned | None,
               decide: Callable[[dict[str, Any] | None], Decision]) -> tuple[Versioned | None, Address] | None:
        """Apply `decide` to the block's body and write it with the version read; on Conflict re-read and
        decide again. An answer that needs no write is only trusted when read in this call."""
        while True:
            outcome = decide(copy.deepcopy(obj.data) if obj is not None else None)
            if outcome is None:
                return None
            new, chosen = outcome
            if new is None:
                if name in call.fresh:
                    return obj, chosen
                obj = self._get(call, pool, name)  # the cache said so: confirm
                continue
            new["used"] = len(new["allocations"])
            try:
                written = self.store.update(obj, new) if obj is not None else self.store.create(BLOCK, name, new)
            except Conflict:
                call.conflict(pool)
                obj = self._get(call, pool, name)
                continue
            self._seen(call, pool, name, written)
            if not new["allocations"] and not new.get("node"):
                # Nobody leases it and nothing is in it: an empty object is only clutter.
                try:
                    self.store.delete(written)
                    self._seen(call, pool, name, None)
                except Conflict:
                    pass
            return written, chosen

    def _lease(self, pool: PoolSpec, i: int, name: str, ip: Address) -> Lease:
        r = pool.ranges[i]
        return Lease(range_index=i, address=ip, prefixlen=r.prefixlen, gateway=r.gateway, block=name)

    def _take(self, call: _Call, pool: PoolSpec, i: int, obj: Versioned, ip: str, owner: Owner,
              claim: str | None = None) -> Lease | None:
        """Make `ip` of `obj` the owner's when it is the owner's already, an older sandbox's of the same pod
        and interface, or released for `claim`."""

        def decide(data: dict[str, Any] | None) -> Decision:
            e = (data or {}).get("allocations", {}).get(ip)
            if data is None or e is None:
                return None
            if owner.owns(e):
                return None, _ip(ip)
            if owner.replaces(e) or (claim is not None and e.get("released") and e.get("claim") == claim):
                data["allocations"][ip] = owner.entry(self.node, static=bool(e.get("static")), claim=e.get("claim"))
                return data, _ip(ip)
            return None

        done = self._write(call, pool.network_name, obj.name, obj, decide)
        return self._lease(pool, i, obj.name, done[1]) if done else None

    # --- allocation -------------------------------------------------------------------------------------

    def _one(self, call: _Call, pool: PoolSpec, i: int, owner: Owner, static: Address | None,
             claim: str | None) -> Lease:
        if static is not None:
            return self._static(call, pool, i, owner, static)
        r = pool.ranges[i]
        for obj in self._node_blocks(call, pool.network_name):
            if not _overlaps(obj, r):
                continue
            for ip, e in list((obj.data.get("allocations") or {}).items()):
                if _in_range(ip, r) and (owner.owns(e) or owner.replaces(e)):
                    got = self._take(call, pool, i, obj, ip, owner)
                    if got:
                        return got
        if claim is not None:
            got = self._claimed(call, pool, i, owner, claim)
            if got:
                return got
        return self._dynamic(call, pool, i, owner, claim)

    def _owned_in(self, objs: Iterable[Versioned], r: Range, owner: Owner) -> tuple[Versioned, str] | None:
        for obj in objs:
            if _overlaps(obj, r):
                for ip, e in (obj.data.get("allocations") or {}).items():
                    if _in_range(ip, r) and owner.owns(e):
                        return obj, ip
        return None

    def _static(self, call: _Call, pool: PoolSpec, i: int, owner: Owner, ip: Address) -> Lease:
        r = pool.ranges[i]
        prefix = pool.prefix_of(r)
        start = block_start(int(ip), prefix, r.version)
        name = block_name(pool.network_name, address(r.version, start))
        # Read afresh: refusing because of a stale cache entry would be wrong.
        other = self._owned_in(self._node_blocks(call, pool.network_name, refresh=not call.node_listed), r, owner)
        if other is not None and other[1] != str(ip):
            raise _fail(pool.network_name, f"{owner} already holds {other[1]} in {r.network}; it asked for {ip}")
        key = str(ip)

        def decide(data: dict[str, Any] | None) -> Decision:
            if data is None:
                # The block of a static address is made on the spot, leased to nobody: static addresses are
                # reserved wherever they fall, whoever leases (or later leases) their block.
                data = {"pool": pool.network_name, "cidr": block_cidr(start, prefix, r.version), "node": "",
                        "used": 0, "allocations": {}}
            e = data["allocations"].get(key)
            if e is not None:
                if owner.owns(e):
                    return None, ip
                if not owner.replaces(e):
                    raise _fail(pool.network_name, f"requested address {ip} is taken by {describe(e)}")
            data["allocations"][key] = owner.entry(self.node, static=True)
            return data, ip

        done = self._write(call, pool.network_name, name, self._get(call, pool.network_name, name), decide)
        assert done is not None
        return self._lease(pool, i, name, ip)

    def _claimed(self, call: _Call, pool: PoolSpec, i: int, owner: Owner, claim: str) -> Lease | None:
        """The claim's address wherever it is (the pod may come back on another node), so the whole pool is
        read: the price of stickiness."""
        r = pool.ranges[i]
        blocks = self._all_blocks(call, pool.network_name)
        mine = self._owned_in(blocks.values(), r, owner)
        if mine is not None:
            return self._lease(pool, i, mine[0].name, _ip(mine[1]))
        for obj in list(blocks.values()):
            if not _overlaps(obj, r):
                continue
            for ip, e in list((obj.data.get("allocations") or {}).items()):
                if not (_in_range(ip, r) and e.get("claim") == claim and e.get("ifname") == owner.ifname):
                    continue
                if not e.get("released") and not owner.replaces(e):
                    raise _fail(pool.network_name, f"{ip} of claim {claim} is still held by {describe(e)}; it passes "
                                                   f"to {owner} once that attachment is deleted", TRY_AGAIN_LATER)
                got = self._take(call, pool, i, obj, ip, owner, claim)
                if got:
                    return got
        return None

    def _slot(self, r: Range, prefix: int) -> int:
        digest = hashlib.sha256(f"{self.node}".encode()).digest()
        return int.from_bytes(digest[:16], "big") % block_slots(r, prefix)[1]

    def _free_in(self, call: _Call, pool: PoolSpec, i: int, name: str, start: int, obj: Versioned | None,
                 owner: Owner, claim: str | None, mode: str) -> Lease | None:
        """A dynamic address of one block: `mine` (leased to this node), `lease` (unleased or missing: lease
        it in the same write), or `borrow` (anyone's)."""
        r = pool.ranges[i]
        prefix = pool.prefix_of(r)

        def decide(data: dict[str, Any] | None) -> Decision:
            if data is None:
                if mode != "lease":
                    return None
                data = {"pool": pool.network_name, "cidr": block_cidr(start, prefix, r.version), "node": "",
                        "used": 0, "allocations": {}}
            holder = data.get("node") or ""
            if mode == "mine" and holder != self.node:
                return None
            if mode == "lease":
                if holder not in ("", self.node):
                    return None
                data["node"] = self.node
            ip = pick_free(r, start, prefix, data["allocations"])
            if ip is None:
                return None
            data["allocations"][str(ip)] = owner.entry(self.node, claim=claim)
            return data, ip

        done = self._write(call, pool.network_name, name, obj, decide)
        return self._lease(pool, i, name, done[1]) if done else None

    def _dynamic(self, call: _Call, pool: PoolSpec, i: int, owner: Owner, claim: str | None) -> Lease:
        r = pool.ranges[i]
        prefix = pool.prefix_of(r)
        nn = pool.network_name
        # 1. blocks leased to this node; when the cache finds none with room, once more from the store
        #    (another process of this node may have leased one).
        for refresh in (False, True):
            if refresh and call.node_listed:
                break
            mine = self._node_blocks(call, nn, refresh)
            for obj in mine:
                if _overlaps(obj, r) and free_dynamic(r, obj, prefix) > 0:
                    got = self._free_in(call, pool, i, obj.name, _start(obj), obj, owner, claim, "mine")
                    if got:
                        return got
        # 2. lease a block: missing ones are created, unleased ones taken, in one write with the address.
        blocks = self._all_blocks(call, nn)
        mine_found = self._owned_in(blocks.values(), r, owner)
        if mine_found is not None:  # the owner's address from an earlier ADD, in a borrowed block
            return self._lease(pool, i, mine_found[0].name, _ip(mine_found[1]))
        for start in dynamic_block_starts(r, prefix, self._slot(r, prefix)):
            name = block_name(nn, address(r.version, start))
            known = blocks.get(name)
            if known is not None and ((known.data.get("node") or "") not in ("", self.node)
                                      or free_dynamic(r, known, prefix) <= 0):
                continue
            got = self._free_in(call, pool, i, name, start, known, owner, claim, "lease")
            if got:
                return got
        # 3. borrow from any block with room, starting after this node's slot.
        candidates = sorted((o for o in blocks.values() if _overlaps(o, r)), key=_start)
        first_block, _ = block_slots(r, prefix)
        pivot = first_block + self._slot(r, prefix) * block_size(prefix, r.version)
        candidates = [o for o in candidates if _start(o) >= pivot] + [o for o in candidates if _start(o) < pivot]
        for obj in candidates:
            if free_dynamic(r, obj, prefix) > 0:
                got = self._free_in(call, pool, i, obj.name, _start(obj), obj, owner, claim, "borrow")
                if got:
                    return got
        held = sum(1 for o in blocks.values() for k, e in (o.data.get("allocations") or {}).items()
                   if _in_range(k, r) and e.get("released"))
        extra = f", {held} of them kept for sticky claims" if held else ""
        raise _fail(nn, f"no addresses available in range {r.canonical()} "
                        f"({r.count_dynamic(r.first, r.last)} dynamic addresses, all allocated{extra})")

    # --- release ----------------------------------------------------------------------------------------

    def _owned(self, call: _Call, pool: PoolSpec, owner: Owner,
               hints: Sequence[Address]) -> list[tuple[Address, Versioned]]:
        """The owner's addresses: in this node's blocks, the hinted blocks, and, when some range is still
        unaccounted for, the whole pool."""
        nn = pool.network_name
        found: dict[str, tuple[Address, Versioned]] = {}

        def scan(objs: Iterable[Versioned]) -> None:
            for obj in objs:
                for ip, e in (obj.data.get("allocations") or {}).items():
                    if owner.owns(e):
                        found[ip] = (_ip(ip), obj)

        def complete() -> bool:
            return all(any(a.version == r.version and r.contains(int(a)) for a, _ in found.values())
                       for r in pool.ranges)

        scan(self._node_blocks(call, nn, refresh=True))
        for ip in hints:
            r = next((x for x in pool.ranges if x.version == ip.version and x.contains(int(ip))), None)
            if r is None or str(ip) in found:
                continue
            start = block_start(int(ip), pool.prefix_of(r), r.version)
            obj = self._get(call, nn, block_name(nn, address(r.version, start)))
            if obj is not None:
                scan([obj])
        if not complete():
            scan(self._all_blocks(call, nn).values())
        return list(found.values())

    def _release(self, call: _Call, pool: PoolSpec, owner: Owner, hints: Sequence[Address]) -> list[Address]:
        out: list[Address] = []
        by_block: dict[str, Versioned] = {}
        for _, obj in self._owned(call, pool, owner, hints):
            by_block[obj.name] = obj
        for name, obj in sorted(by_block.items()):
            freed: list[Address] = []

            def drop(data: dict[str, Any] | None) -> Decision:
                freed.clear()
                if data is None:
                    return None
                for ip, e in list(data["allocations"].items()):
                    if owner.owns(e):
                        if e.get("claim"):
                            e["released"] = True  # kept for the claim (its next ADD, or metactl ipam release)
                        else:
                            del data["allocations"][ip]
                        freed.append(_ip(ip))
                return (data, freed[0]) if freed else None

            if self._write(call, pool.network_name, name, obj, drop):
                out += freed
        return sorted(out, key=lambda a: (a.version, int(a)))


def owner_entries(blocks: Iterable[Versioned]) -> Iterator[tuple[Versioned, str, dict[str, Any]]]:
    """Every allocation of some blocks, in address order (for `metactl ipam allocations`)."""
    for obj in sorted(blocks, key=lambda o: (_net(str(o.data.get("cidr"))).version, _start(o))):
        for ip, e in sorted((obj.data.get("allocations") or {}).items(), key=lambda kv: int(_ip(kv[0]))):
            yield obj, ip, e
