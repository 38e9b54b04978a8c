"""The daemon's Prometheus metrics, on a registry of its own (served on /metrics).

    meta_cni_requests_total{command,result}                 CNI requests served; result "ok" or the CNI error code
    meta_cni_request_duration_seconds{command,result}       their latency, admission wait included
    meta_cni_delegate_duration_seconds{plugin,command,result}  each delegate call (built-in or exec'd)
    meta_cni_worker_attachments_total{result}               attachments made in attachment worker processes
    meta_cni_requests_in_flight / meta_cni_requests_waiting requests running / waiting for a slot
    meta_cni_pending_dels                                   spooled DELs not replayed yet
    meta_cni_pending_del_replays_total{result}              replay attempts
    meta_cni_source_cache_age_seconds{source,cache}         age of each watch cache (time since last event/sync)
    meta_cni_ready                                          1 when /readyz answers 200
    meta_cni_ipam_gc_rounds_total{result}                   meta-ipam GC rounds: ok, api-unreadable, error
    meta_cni_ipam_gc_freed_addresses_total                  addresses the meta-ipam GC freed (pods gone)
    meta_cni_ipam_gc_last_success_timestamp_seconds         when the last round that could judge every pod ended
plus the client library's process and Python runtime collectors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..invoke.timed import Observation

# CNI calls span ~5 ms (a DEL with nothing cached) to minutes (delegates that time out).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OK = "ok"
CONTENT_TYPE = CONTENT_TYPE_LATEST


def result_label(code: int | None) -> str:
    return OK if code is None else str(code)


class _StateCollector(Collector):
    """Gauges read at scrape time from whoever owns the state (no copy to keep in sync)."""

    def __init__(self, pending: Callable[[], int], ages: Callable[[], dict[str, dict[str, float]]],
                 ready: Callable[[], bool]) -> None:
        self.pending, self.ages, self.ready = pending, ages, ready

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meta_cni_pending_dels", "Spooled DEL requests not replayed yet.", value=self.pending())
        age = GaugeMetricFamily("meta_cni_source_cache_age_seconds",
                                "Seconds since each watch cache was last brought up to date.", labels=["source", "cache"])
        for source, caches in sorted(self.ages().items()):
            for cache, seconds in sorted(caches.items()):
                age.add_metric([source, cache], seconds)
        yield age
        yield GaugeMetricFamily("meta_cni_ready", "1 when the daemon is ready to serve ADDs.", value=1 if self.ready() else 0)


class Metrics:
    def __init__(self) -> None:
        # A registry of our own rather than the library's global one, so tests can build several daemons.
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("meta_cni_requests", "CNI requests served, by command and result (ok or CNI error code).",
                                ["command", "result"], registry=r)
        self.request_seconds = Histogram("meta_cni_request_duration_seconds",
                                         "CNI request latency in the daemon, admission wait included.",
                                         ["command", "result"], buckets=BUCKETS, registry=r)
        self.delegate_seconds = Histogram("meta_cni_delegate_duration_seconds",
                                          "Latency of each delegate plugin call, by plugin type and command.",
                                          ["plugin", "command", "result"], buckets=BUCKETS, registry=r)
        self.worker_attachments = Counter("meta_cni_worker_attachments", "Attachments made in attachment worker "
                                          "processes, side by side with the request's own thread, by result.",
                                          ["result"], registry=r)
        self.in_flight = Gauge("meta_cni_requests_in_flight", "CNI requests running now.", registry=r)
        self.waiting = Gauge("meta_cni_requests_waiting", "CNI requests waiting for a free slot.", registry=r)
        self.replays = Counter("meta_cni_pending_del_replays", "Replays of spooled DEL requests, by result.",
                               ["result"], registry=r)
        self.ipam_gc_rounds = Counter("meta_cni_ipam_gc_rounds", "meta-ipam garbage collection rounds, by result "
                                      "(ok; api-unreadable: nothing freed; error).", ["result"], registry=r)
        self.ipam_gc_freed = Counter("meta_cni_ipam_gc_freed_addresses",
                                     "Addresses the meta-ipam garbage collector freed because their pod is gone.",
                                     registry=r)
        self.ipam_gc_last_success = Gauge("meta_cni_ipam_gc_last_success_timestamp_seconds",
                                          "Unix time the last successful meta-ipam garbage collection round ended.",
                                          registry=r)

    def observe_state(self, pending: Callable[[], int], ages: Callable[[], dict[str, dict[str, float]]],
                      ready: Callable[[], bool]) -> None:
        self.registry.register(_StateCollector(pending, ages, ready))

    def request_done(self, command: str, code: int | None, seconds: float) -> None:
        label = result_label(code)
        self.requests.labels(command, label).inc()
        self.request_seconds.labels(command, label).observe(seconds)

    def delegate_done(self, call: Observation) -> None:
        """One delegate call, in this process or in an attachment worker."""
        plugin_type, command, code, seconds = call
        self.delegate_seconds.labels(plugin_type, command, result_label(code)).observe(seconds)

    def worker_done(self, code: int | None) -> None:
        self.worker_attachments.labels(result_label(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

