"""The daemon's source factory: one long-lived Source per distinct configuration, instead of one per call.

- A config with `kubeconfig` gets the daemon's watching KubeSource (watch caches of the node's pods and of
  the NADs). It is built from the daemon's `--kubeconfig`, else the pod's service account when the daemon
  runs in a pod, else the config's own kubeconfig path (then one watching source per path). With a
  daemon-wide credential it is started with the daemon, so the caches are synced before the first pod.
- Any other config reads manifests (standalone mode). ManifestsSource reads its directory once, which is
  right for a process per call but not for a daemon, so one is kept per (manifestsDir, cniDir) and replaced
  when a manifest file appears, disappears or changes (size, mtime or inode).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cni.errors import TRY_AGAIN_LATER, CNIError
from ..config import MetaConfig
from ..sources import Source
from ..sources.manifests import ManifestsSource

if TYPE_CHECKING:
    from ..sources.kube import KubeSource

log = logging.getLogger("meta-cni.daemon")
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod with a service account (what client-go checks)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")
                and SERVICE_ACCOUNT_TOKEN.is_file())


class _Manifests:
    """The current ManifestsSource of one directory."""

    def __init__(self, directory: str, index_cache: Path) -> None:
        self.directory = directory
        self.index_cache = index_cache
        self.lock = threading.Lock()
        self.signature: tuple[Any, ...] | None = None
        self.source: ManifestsSource | None = None

    def current(self) -> ManifestsSource:
        fresh = ManifestsSource(self.directory, self.index_cache)
        sig: list[Any] = []
        for path in fresh.files():
            try:
                st = path.stat()
            except OSError:
                continue
            sig.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
        signature = tuple(sig)
        with self.lock:
            if self.source is None or signature != self.signature:
                # The new source parses lazily, possibly after another change: then the next call sees a
                # signature that differs again and rebuilds, so a stale view never sticks.
                self.source, self.signature = fresh, signature
            return self.source


class DaemonSources:
    """A SourceFactory (callable on a MetaConfig) that memoizes sources; also what /readyz and the
    cache-age metric look at."""

    def __init__(self, kubeconfig: str | None, node_name: str | None, api_timeout: float | None,
                 use_in_cluster: bool | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.api_timeout = api_timeout
        self.in_cluster = in_cluster() if use_in_cluster is None else use_in_cluster
        self.lock = threading.Lock()
        self.manifests: dict[tuple[str, str], _Manifests] = {}
        self.kube: dict[str | None, KubeSource] = {}
        self.closed = False

    @property
    def daemon_wide(self) -> bool:
        """Whether the daemon has its own API credentials (then every kube config shares one source)."""
        return bool(self.kubeconfig) or self.in_cluster

    def __call__(self, cfg: MetaConfig) -> Source:
        if cfg.kubeconfig:
            return self.watching(self.kubeconfig if self.daemon_wide else cfg.kubeconfig, cfg.api_timeout)
        key = (cfg.manifests_dir, cfg.cni_dir)
        with self.lock:
            entry = self.manifests.get(key)
            if entry is None:
                entry = self.manifests[key] = _Manifests(cfg.manifests_dir, Path(cfg.cni_dir) / ".manifests-index.json")
        return entry.current()

    def _key(self, kubeconfig: str | None) -> str | None:
        return None if self.daemon_wide else kubeconfig

    def watching(self, kubeconfig: str | None, timeout: float | None = None) -> KubeSource:
        """The watching source for `kubeconfig` (None: in-cluster), started on first use."""
        key = self._key(kubeconfig)
        with self.lock:
            src = self.kube.get(key)
            if src is not None:
                return src
            if self.closed:
                raise CNIError(TRY_AGAIN_LATER, "meta-cni daemon is shutting down")
            from ..sources.kube import KubeSource

            budget = self.api_timeout or timeout or 10.0
            try:
                # Under the lock: two first requests must not start two sets of watches.
                src = KubeSource.watching(kubeconfig, self.node_name, budget)
            except CNIError:
                raise
            except Exception as e:
                what = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
                raise CNIError(TRY_AGAIN_LATER, f"cannot watch the Kubernetes API with {what}: {type(e).__name__}: {e}") from None
            self.kube[key] = src
            log.info("watching the Kubernetes API", extra={"fields": {
                "kubeconfig": kubeconfig or "in-cluster", "node": self.node_name or "(all nodes)"}})
            return src

    def start(self) -> None:
        """Start the daemon-wide watches now (no-op without daemon-wide credentials); failures are logged and
        retried by `ensure_started` so a daemon started before the API server comes up recovers."""
        self.ensure_started()

    def ensure_started(self) -> None:
        if not self.daemon_wide or self.closed:
            return
        try:
            self.watching(self.kubeconfig)
        except CNIError as e:
            log.error("cannot start the Kubernetes watches: %s", e.msg)

    def expected_ready(self) -> list[str]:
        """Why the sources are not ready (empty when they are)."""
        with self.lock:
            started = dict(self.kube)
        if self.daemon_wide and None not in started:
            return ["Kubernetes watches not started"]
        return [f"watch caches of {('kubeconfig ' + k) if k else 'the Kubernetes API'} not synced"
                for k, src in started.items() if not src.ready()]

    def cache_ages(self) -> dict[str, dict[str, float]]:
        with self.lock:
            started = dict(self.kube)
        return {(f"kube:{k}" if k else "kube"): src.cache_ages() for k, src in started.items()}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            started, self.kube = list(self.kube.values()), {}
        for src in started:
            try:
                src.close()
            except Exception:  # shutting down: a broken connection must not stop the others closing
                log.exception("closing a Kubernetes source failed")
