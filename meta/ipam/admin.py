"""`metactl ipam`: what the pools hold, and releasing an address by hand.

Tables are plain text for people. Listing every pool needs a store that can enumerate objects of a kind
(`list_all(kind)`, which FileStore has); the Store protocol itself only lists one pool's objects.
"""
from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .allocator import Allocator, owner_entries
from .ranges import RangeError, parse_canonical
from .store import BLOCK, POOL, Store, Versioned


class AdminError(Exception):
    """A request metactl refuses; the message says why."""


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells) + "\n"


def _pools(store: Store, name: str | None) -> list[Versioned]:
    if name is not None:
        from .ranges import pool_object_name

        obj = store.get(POOL, pool_object_name(name))
        if obj is None or obj.data.get("pool") != name:
            raise AdminError(f"no pool {name!r} in this store")
        return [obj]
    list_all = getattr(store, "list_all", None)
    if list_all is None:
        raise AdminError("this store cannot enumerate pools: name one (metactl ipam pools POOL)")
    return sorted(list_all(POOL), key=lambda o: str(o.data.get("pool")))


def _size(ranges: Sequence[str]) -> int:
    n = 0
    for text in ranges:
        try:
            n += parse_canonical(text).count_assignable()
        except RangeError:
            continue
    return n


def pools(store: Store, name: str | None = None) -> str:
    """One line per pool: ranges, assignable addresses, allocations (released sticky ones included, as they
    stay held), free, and block leases by node."""
    rows = []
    for p in _pools(store, name):
        pool = str(p.data.get("pool"))
        blocks = store.list(BLOCK, pool)
        used = sum(len(b.data.get("allocations") or {}) for b in blocks)
        size = _size(p.data.get("ranges") or [])
        leases = Counter(str(b.data.get("node") or "(unleased)") for b in blocks)
        by_node = " ".join(f"{n}={c}" for n, c in sorted(leases.items())) or "-"
        rows.append([pool, "; ".join(p.data.get("ranges") or []), size, used, size - used, len(blocks), by_node])
    return table(["POOL", "RANGES", "SIZE", "USED", "FREE", "BLOCKS", "LEASES BY NODE"], rows)


def allocations(store: Store, name: str | None = None) -> str:
    rows = []
    for p in _pools(store, name):
        pool = str(p.data.get("pool"))
        for obj, ip, e in owner_entries(store.list(BLOCK, pool)):
            kind = "static" if e.get("static") else (f"claim {e['claim']}" if e.get("claim") else "dynamic")
            pod = f"{e.get('podNamespace')}/{e.get('podName')}" if e.get("podName") else "-"
            rows.append([pool, ip, obj.data.get("cidr"), e.get("node") or "-", e.get("network") or "-", pod,
                         e.get("podUID") or "-", str(e.get("containerID"))[:12], e.get("ifname"), kind,
                         "released" if e.get("released") else "held"])
    return table(["POOL", "ADDRESS", "BLOCK", "NODE", "NETWORK", "POD", "UID", "CONTAINER", "IFNAME", "KIND", "STATE"],
                 rows)


def release(store: Store, pool: str, ip_text: str) -> str:
    """Free one address whoever holds it (a sticky one too); refused when it is not allocated."""
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise AdminError(f"{ip_text!r} is not an IP address") from None
    _pools(store, pool)
    entry = Allocator(store, node="").release_address(pool, ip)
    if entry is None:
        raise AdminError(f"{ip} is not allocated in pool {pool!r}")
    pod = f"pod {entry.get('podNamespace')}/{entry.get('podName')}, " if entry.get("podName") else ""
    return f"released {ip} from pool {pool} ({pod}container {entry.get('containerID')} {entry.get('ifname')})\n"
