"""The daemon's meta-ipam garbage collector: frees this node's allocations whose pod no longer exists.

DEL frees an attachment's addresses, but a DEL that never comes (a node that rebooted, a runtime that lost its
state, an allocating process killed before it could answer) leaks them, and nothing in a pool tells a leak
from a live pod. Every `--ipam-gc-interval` seconds (the first round sooner, see `first_delay`) a round:

1. lists every IPBlock of every pool with the daemon's credentials;
2. takes this node's held allocations that name a pod (collect.pod_candidates);
3. judges each pod once: alive when the daemon's pod watch cache has it under the recorded UID, otherwise
   after a direct GET: alive when the API returns it with that UID, gone on 404 or another UID (a namesake);
4. frees nothing at all when anything could not be read (the list, or any one pod: timeout, 5xx, 401/403,
   API down): an unreadable API must never look like a deleted pod;
5. frees what gone pods hold, each entry only while it is still exactly that owner's (Allocator.free:
   versioned writes, re-read on conflict), as DEL would (an entry with a sticky claim is kept, released),
   and logs each address.

Released sticky addresses are never freed here (only `metactl ipam release` does), nor allocations without a
pod UID (cnitool, podman without a pod: CNI GC and DEL free those), nor another node's (its daemon judges
them). The pure decisions are in meta/ipam/collect.py; this module does the I/O, logs and metrics.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import attrs

from ..cni.errors import CNIError
from ..ipam import collect
from ..ipam.allocator import Allocator
from ..ipam.kubestore import KubeStore, NotInstalled
from ..ipam.store import BLOCK, Store, Unavailable, Versioned
from ..sources import Pod
from .metrics import Metrics

log = logging.getLogger("meta-cni.daemon.ipam-gc")

OK = "ok"
API_UNREADABLE = "api-unreadable"
ERROR = "error"
DEFAULT_INTERVAL = 60.0
# The first round comes this long after start-up (or after one interval when that is shorter): leaks from
# before a node's reboot are freed soon, without adding to the start-up burst of ADDs.
FIRST_ROUND_DELAY = 30.0


class PodLookup(Protocol):
    def get_pod(self, namespace: str, name: str, uid: str | None = None) -> Pod | None:
        """The pod as the watch cache (under `uid`) or the API has it; None when the API has no such pod;
        raises CNIError when the API cannot be read."""


class BlockStore(Store, Protocol):
    def list_all(self, kind: str) -> list[Versioned]:
        """Every object of `kind`, all pools."""


@attrs.frozen
class Round:
    """What one round did: its result label, what it freed (or released for a claim), and why it stopped."""

    result: str
    freed: tuple[collect.Held, ...] = ()
    error: str = ""


def _message(e: BaseException) -> str:
    return e.msg if isinstance(e, CNIError) else str(e)


class IpamCollector:
    """Rounds of garbage collection for one node. `store` and `pods` are called for the cluster store and the
    pod lookup when a round needs them (and again after they failed), so a daemon that starts before the API
    server comes up recovers by itself."""

    def __init__(self, node: str, store: Callable[[], BlockStore], pods: Callable[[], PodLookup],
                 metrics: Metrics) -> None:
        self.node = node
        self._make_store = store
        self._make_pods = pods
        self.metrics = metrics
        self._opened: tuple[BlockStore, Allocator] | None = None
        self._lock = threading.Lock()  # one round at a time (the loop, or a test calling run_once)

    def run(self, stop: threading.Event, interval: float, first_delay: float | None = None) -> None:
        """Rounds until `stop` is set: the first after `first_delay` (default min(interval, 30 s))."""
        delay = min(interval, FIRST_ROUND_DELAY) if first_delay is None else first_delay
        while not stop.wait(delay):
            self.run_once()
            delay = interval

    def run_once(self) -> Round:
        with self._lock:
            try:
                done = self._round()
            except Exception as e:  # a bug must not end the collector; the next round tries again
                log.exception("ipam gc: round failed")
                done = Round(ERROR, error=f"{type(e).__name__}: {e}")
        self.metrics.ipam_gc_rounds.labels(done.result).inc()
        if done.result == OK:
            self.metrics.ipam_gc_last_success.set_to_current_time()
        # A quiet round is only worth a debug line (the metrics say that rounds run); anything else is news.
        level = logging.DEBUG if done.result == OK and not done.freed else logging.INFO
        log.log(level, "ipam gc: round done", extra={"fields": {
            "result": done.result, "node": self.node, "freed": len(done.freed), "error": done.error or None}})
        return done

    def _open(self) -> tuple[BlockStore, Allocator]:
        # Kept for the daemon's life: the allocator's conflict handling and the store's connection pool.
        if self._opened is None:
            store = self._make_store()
            self._opened = store, Allocator(store, self.node)
        return self._opened

    def _round(self) -> Round:
        try:
            store, allocator = self._open()
            try:
                blocks = store.list_all(BLOCK)
            except NotInstalled as e:
                # A cluster that does not use meta-ipam: nothing to collect, nothing to warn about.
                log.debug("ipam gc: %s", e.msg)
                return Round(OK)
            candidates = collect.pod_candidates(blocks, self.node)
            verdicts = self._judge(candidates)
        except (Unavailable, CNIError) as e:
            log.warning("ipam gc: the API cannot be read, nothing freed this round: %s", _message(e))
            return Round(API_UNREADABLE, error=_message(e))
        gone = collect.gone(candidates, verdicts)
        known = {o.name: o for o in blocks}
        freed: list[collect.Held] = []

        def record(h: collect.Held) -> None:
            freed.append(h)
            if h.outcome == "freed":
                self.metrics.ipam_gc_freed.inc()
            log.info("ipam gc: %s %s: its pod is gone", h.outcome, h.ip, extra={"fields": {
                "pool": h.pool, "ip": h.ip, "owner": h.describe(), "network": h.network, "claim": h.claim,
                "node": self.node}})

        try:
            for pool, targets in sorted(collect.by_pool(gone).items()):
                allocator.free(pool, targets, known, on_freed=record)
        except (Unavailable, CNIError) as e:
            log.warning("ipam gc: freeing stopped: %s", _message(e))
            return Round(ERROR, tuple(freed), _message(e))
        return Round(OK, tuple(freed))

    def _judge(self, candidates: list[collect.Held]) -> dict[collect.PodKey, bool]:
        """Each candidate pod alive (True) or gone (False); the CNIError of the first one that cannot be judged."""
        keys = collect.pods_to_check(candidates)
        if not keys:
            return {}
        pods = self._make_pods()
        out: dict[collect.PodKey, bool] = {}
        for ns, name, uid in keys:
            pod = pods.get_pod(ns, name, uid)
            out[(ns, name, uid)] = collect.alive(uid, pod.uid if pod is not None else None)
        return out


def cluster_store(kubeconfig: str | None, timeout: float) -> BlockStore:
    """The IPAM store of the cluster with the daemon's credentials: its kubeconfig, else its service account."""
    if kubeconfig:
        return KubeStore.from_kubeconfig(kubeconfig, timeout)
    return KubeStore.in_cluster(timeout)
