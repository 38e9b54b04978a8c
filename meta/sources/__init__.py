"""Where pods and NADs come from, and where the network-status goes: the Source seam.

Two implementations are planned: `manifests` (the embedded default: YAML manifests on disk) and `kube`
(the Kubernetes API with watch caches, a later issue). Core code only sees this protocol.
"""
from __future__ import annotations

from typing import Any, Protocol

import attrs


@attrs.frozen
class Pod:
    namespace: str
    name: str
    uid: str | None
    annotations: dict[str, str] = attrs.field(factory=dict, eq=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class Source(Protocol):
    def get_pod(self, namespace: str, name: str) -> Pod | None:
        """The pod, or None when the source does not know it."""

    def get_nad(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The raw NetworkAttachmentDefinition object, or None when it does not exist."""

    def publish_status(self, namespace: str, name: str, status: list[dict[str, Any]] | None) -> None:
        """Record the pod's network-status (None clears it)."""

    def problem(self) -> str | None:
        """Why the source cannot serve requests right now, or None when it can (for CNI STATUS)."""


def open_source(manifests_dir: str, cache_dir: str | None = None) -> Source:
    from pathlib import Path

    from .manifests import ManifestsSource

    return ManifestsSource(manifests_dir, Path(cache_dir) / ".manifests-index.json" if cache_dir else None)
