"""The IPAM store seam: versioned JSON objects with optimistic concurrency.

Two implementations: `kubestore.KubeStore` (custom resources of crds/, resourceVersion, 409) and
`filestore.FileStore` (one JSON file per object under a directory, a version counter, flock). The
allocator sees only this protocol, so both stores give the same guarantees: a write names the version it
read, and loses (Conflict) when anyone wrote in between.
"""
from __future__ import annotations

from typing import Any, Protocol

import attrs

# Object kinds. A pool records the ranges a network was first used with (so two NADs that share a
# network_name cannot silently disagree); a block holds one small CIDR's lease holder and allocations.
POOL = "pool"
BLOCK = "block"


@attrs.frozen
class Versioned:
    """One stored object: its name, its body as JSON data, and the version a write must name."""

    kind: str
    name: str
    data: dict[str, Any] = attrs.field(eq=False)
    version: str


class Conflict(Exception):
    """The object changed since it was read, or (on create) it exists already: re-read and retry."""


class Unavailable(Exception):
    """The store cannot be read or written now (API down or too slow): CNI error 11, try again later."""


class Store(Protocol):
    def get(self, kind: str, name: str) -> Versioned | None:
        """The object, or None when it does not exist."""

    def list(self, kind: str, pool: str, node: str | None = None) -> list[Versioned]:
        """Every object of `kind` belonging to network `pool` (data["pool"]); with `node`, only blocks
        leased to that node (data["node"]), which a store may answer from an index (a label)."""

    def create(self, kind: str, name: str, data: dict[str, Any]) -> Versioned:
        """Create; Conflict when it exists."""

    def update(self, obj: Versioned, data: dict[str, Any]) -> Versioned:
        """Replace obj's body if it is still at obj.version; Conflict otherwise (also when it is gone)."""

    def delete(self, obj: Versioned) -> None:
        """Delete if still at obj.version; Conflict otherwise; nothing when it is gone already."""
