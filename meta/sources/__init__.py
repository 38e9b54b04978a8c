"""Where pods and NADs come from, and where the network-status goes: the Source seam.

Two implementations: `manifests` (the embedded default: YAML manifests on disk) and `kube` (the
Kubernetes API; with watch caches in the daemon). Core code only sees this protocol.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import MetaConfig

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
    def get_pod(self, namespace: str, name: str, uid: str | None = None) -> Pod | None:
        """The pod, or None when the source does not know it. `uid` is the UID the runtime expects
        (K8S_POD_UID): a source whose copy may be stale (a watch cache) must not answer from a copy with
        another UID without asking again. The answer may still carry another UID; the caller checks it."""

    def get_nad(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The raw NetworkAttachmentDefinition object, or None when it does not exist."""

    def publish_status(self, namespace: str, name: str, status: list[dict[str, Any]] | None,
                       uid: str | None = None) -> None:
        """Record the pod's network-status (None clears it). With `uid`, only on the pod of that UID: a
        DEL of an old sandbox must not clear the status of a pod recreated under the same name."""

    def problem(self) -> str | None:
        """Why the source cannot serve requests right now, or None when it can (for CNI STATUS)."""

    def record_event(self, pod: Pod, type_: str, reason: str, message: str) -> None:
        """Tell the pod's owner what happened (a Kubernetes Event); best effort, never raises."""


SourceFactory = Callable[["MetaConfig"], Source]


def open_source(cfg: MetaConfig) -> Source:
    """The source a config asks for: the Kubernetes API when it names a kubeconfig, else manifests on disk."""
    if cfg.kubeconfig:
        from .kube import KubeSource

        return KubeSource.from_kubeconfig(cfg.kubeconfig, timeout=cfg.api_timeout)
    from pathlib import Path

    from .manifests import ManifestsSource

    return ManifestsSource(cfg.manifests_dir, Path(cfg.cni_dir) / ".manifests-index.json")
