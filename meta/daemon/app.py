"""The daemon process (`metactl daemon`): listeners, spooled-DEL replay, readiness and shutdown.

Start-up: the CNI socket and the metrics listener come up first (a DEL can be served at once, and kubelet's
probes see a live process), the Kubernetes watches start, then one pass replays the DELs spooled while the
daemon was down; only after that pass are ADD, CHECK and GC served. Then a pass runs every
`replay_interval` seconds. With API credentials of its own (--kubeconfig, or in a pod) the daemon also runs
meta-ipam's garbage collector in a thread of its own (ipamgc.py), every `ipam_gc_interval` seconds (0: off).
SIGTERM/SIGINT: /readyz turns 503, no new connection is accepted, in-flight requests finish, the watches are
closed.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import attrs

from .. import config as metaconfig
from ..ipam import config as ipamconfig
from . import ipamgc, logs
from ..invoke.workers import Workers
from .dispatch import Dispatcher
from .metrics import CONTENT_TYPE, Metrics
from .replay import Replayer
from .server import Endpoints, TCPListener, UnixListener
from .sources import DaemonSources

log = logging.getLogger("meta-cni.daemon")
DEFAULT_SOCKET = "/run/meta-cni/daemon.sock"
DEFAULT_METRICS = "127.0.0.1:9095"
DEFAULT_API_TIMEOUT = 10.0


@attrs.frozen
class Options:
    socket: Path = Path(DEFAULT_SOCKET)
    metrics_address: str | None = DEFAULT_METRICS
    kubeconfig: str | None = None
    node_name: str | None = None
    max_concurrent: int = 8
    max_wait: float = 30.0
    cni_dirs: tuple[str, ...] = (str(metaconfig.DEFAULTS["cniDir"]),)
    replay_interval: float = 30.0
    api_timeout: float | None = None
    in_cluster: bool | None = None
    ipam_gc_interval: float = ipamgc.DEFAULT_INTERVAL
    attach_workers: int = 2


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.metrics = Metrics()
        self.sources = DaemonSources(opts.kubeconfig, opts.node_name, opts.api_timeout, opts.in_cluster)
        self.workers = Workers(opts.attach_workers) if opts.attach_workers > 0 else None
        self.dispatcher = Dispatcher(self.sources, self.metrics, opts.max_concurrent, opts.max_wait, self.workers)
        self.replayer = Replayer(self.dispatcher, opts.cni_dirs)
        self.stopping = threading.Event()
        endpoints = Endpoints(self.dispatcher.handle, self.not_ready, self.render_metrics)
        self.unix = UnixListener(opts.socket, endpoints)
        self.tcp = TCPListener(opts.metrics_address, endpoints) if opts.metrics_address else None
        self.metrics.observe_state(self.replayer.count, self.sources.cache_ages, lambda: not self.not_ready())
        self.maintenance: threading.Thread | None = None
        self.ipam_gc: ipamgc.IpamCollector | None = None
        if opts.ipam_gc_interval > 0 and self.sources.daemon_wide:
            # Without credentials of its own the daemon cannot list every pool's blocks or ask about pods.
            timeout = opts.api_timeout or DEFAULT_API_TIMEOUT
            self.ipam_gc = ipamgc.IpamCollector(
                ipamconfig.node_name(opts.node_name), lambda: ipamgc.cluster_store(opts.kubeconfig, timeout),
                lambda: self.sources.watching(self.sources.kubeconfig), self.metrics)
        self.ipam_gc_thread: threading.Thread | None = None

    def not_ready(self) -> list[str]:
        """Why /readyz is not 200 (empty when ready)."""
        reasons = ["shutting down"] if self.stopping.is_set() else []
        if not self.dispatcher.replayed.is_set():
            reasons.append("DELs spooled while the daemon was down are not replayed yet")
        return reasons + self.sources.expected_ready()

    def render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE

    def start(self) -> None:
        self.unix.bind()
        self.unix.serve("unix-server")
        if self.tcp is not None:
            self.tcp.serve("tcp-server")
        log.info("serving", extra={"fields": {
            "socket": str(self.opts.socket), "metrics_address": self.tcp.address if self.tcp else None,
            "max_concurrent": self.opts.max_concurrent, "max_wait_s": self.opts.max_wait,
            "node": self.opts.node_name, "cni_dirs": list(self.opts.cni_dirs)}})
        self.sources.start()
        self.maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)
        self.maintenance.start()
        if self.ipam_gc is not None:
            collector = self.ipam_gc
            self.ipam_gc_thread = threading.Thread(
                target=lambda: collector.run(self.stopping, self.opts.ipam_gc_interval), name="ipam-gc", daemon=True)
            self.ipam_gc_thread.start()

    def _maintain(self) -> None:
        warm_up()
        if self.workers is not None:
            self.workers.start()  # until then, requests make every attachment themselves
        left = self.replayer.replay_all(self.stopping)
        self.dispatcher.replayed.set()
        log.info("start-up replay of spooled DELs done", extra={"fields": {"still_pending": left}})
        while not self.stopping.wait(self.opts.replay_interval):
            self.sources.ensure_started()
            if self.replayer.pending():
                self.replayer.replay_all(self.stopping)

    def stop(self) -> None:
        self.stopping.set()
        log.info("shutting down: finishing in-flight requests")
        self.unix.close()
        if self.tcp is not None:
            self.tcp.close()
        if self.maintenance is not None:
            self.maintenance.join()  # a replay in progress finishes like any other request
        if self.workers is not None:
            self.workers.close()
        if self.ipam_gc_thread is not None:
            self.ipam_gc_thread.join()  # a round's API calls are bounded by the API timeout
        self.sources.close()
        log.info("stopped")


def warm_up() -> None:
    """Import what serving a request needs now rather than in the first pod's ADD (pyroute2 and the built-in
    delegates alone take a few hundred milliseconds)."""
    import importlib

    for name in ("meta.core", "jsonschema", "yaml", "pyroute2", "delegates.bridge", "delegates.macvlan",
                 "delegates.ipvlan"):
        try:
            importlib.import_module(name)
        except ImportError as e:  # a build without some delegate: requests report it when they need it
            log.warning("cannot preload %s: %s", name, e)


def run(opts: Options, log_level: str = "info") -> int:
    logs.setup(log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon = Daemon(opts)
    except (OSError, ValueError) as e:
        log.error("cannot start: %s", e)
        return 1
    daemon.stopping = stop
    try:
        daemon.start()
    except (OSError, RuntimeError) as e:
        log.error("cannot start: %s", e)
        daemon.stop()
        return 1
    # A timed wait: the main thread must wake up to run the signal handler promptly.
    while not daemon.stopping.wait(1.0):
        pass
    daemon.stop()
    return 0
