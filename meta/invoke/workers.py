"""Worker processes that make in-process attachments beside the calling thread (the node daemon only).

Built-in delegates are CPU-bound Python (pyroute2 encodes and decodes every netlink message): on threads,
the attachments of one pod only contend for the GIL, so core makes them one after the other. With a few
worker processes, started once by the daemon, the secondary attachments of a pod run at the same time as
each other and as the request's own thread, on the node's other cores.

A worker runs `chain.add` for one attachment at a time with its own long-lived invoker (the same built-in
delegates, imports and netlink sockets warm) and answers with the result or the CNIError, plus the time each
delegate call took (the daemon's metrics are in the parent). Workers are forked from a fork server the
daemon starts once at start-up (multiprocessing's "forkserver": forking the multi-threaded daemon itself
could copy a lock some other thread holds). A worker that dies or does not answer in time is killed
and replaced; its attachment fails with a CNIError like any failed delegate, and core's rollback undoes
whatever part of it was made. When no worker is idle, core makes the attachment itself: a burst of pods
never waits for workers.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ..cni.errors import INTERNAL, CNIError
from ..plan import Attachment
from . import Invocation
from .timed import Observation, TimedInvoker

log = logging.getLogger("meta-cni.workers")
# Imported once in the fork server, so that every worker starts warm.
PRELOAD = ["meta.core", "meta.invoke.chain", "meta.invoke.builtin", "meta.invoke.exec", "delegates._plugin",
           "delegates.bridge", "delegates.macvlan", "delegates.ipvlan", "delegates.host_local", "meta.ipam.plugin"]
# Beyond the delegates' own timeouts (an exec'd plugin's delegateTimeout, meta-ipam's apiTimeout and retries):
# a worker that is silent this long is stuck, not slow.
ANSWER_MARGIN = 60.0

# Before a dead worker's replacement starts.
REPLACE_DELAY = 0.5


def _serve(conn: Connection, log_level: str) -> None:
    """A worker's life: one attachment per message until the daemon closes the pipe."""
    from ..daemon import logs
    from ..invoke.builtin import BuiltinInvoker
    from ..invoke.exec import ExecInvoker
    from . import chain

    logs.setup(log_level)
    invokers: dict[tuple[float, bool], BuiltinInvoker] = {}
    while True:
        try:
            att_dict, base, timeout, standard = conn.recv()
        except (EOFError, OSError):
            return
        inv = invokers.get((timeout, standard))
        if inv is None:
            inv = invokers[(timeout, standard)] = BuiltinInvoker(ExecInvoker(timeout), standard)
        calls: list[Observation] = []
        try:
            reply: tuple[Any, ...] = ("ok", chain.add(Attachment.from_dict(att_dict), TimedInvoker(inv, calls.append), base))
        except CNIError as e:
            reply = ("error", e.code, e.msg, e.details)
        except Exception as e:  # a bug in a delegate: the daemon gets an error like any other, never a hang
            log.exception("attachment worker: internal error")
            reply = ("error", INTERNAL, f"internal error: {type(e).__name__}: {e}", "")
        conn.send(reply + (calls,))


class Worker:
    """One worker process and its end of the pipe; used by one request at a time (see Workers.lease)."""

    def __init__(self, ctx: Any, log_level: str) -> None:
        self.conn, child = multiprocessing.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, log_level), name="meta-cni-attach-worker", daemon=True)
        self.process.start()
        child.close()
        self.busy_with: str | None = None

    def send(self, att: Attachment, base: Invocation, timeout: float, standard: bool) -> None:
        self.busy_with = att.name
        self.conn.send((att.to_dict(), base, timeout, standard))

    def receive(self, wait: float) -> tuple[dict[str, Any] | CNIError, list[Observation]]:
        """The outcome of the attachment sent (its result, or the CNIError it failed with) and the delegate
        calls made; raises a CNIError when the worker died or did not answer within `wait` seconds (it is
        then killed: `alive` turns False)."""
        what = f"attachment worker (pid {self.process.pid}) making {self.busy_with}"
        try:
            if not self.conn.poll(wait):
                self.kill()
                raise CNIError(INTERNAL, f"{what}: no answer in {wait:g}s; killed")
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise CNIError(INTERNAL, f"{what}: the worker died (exit code {self.process.exitcode})") from None
        finally:
            self.busy_with = None
        *outcome, calls = reply
        if outcome[0] == "ok":
            return outcome[1], calls
        _, code, msg, details = outcome
        return CNIError(code, msg, details), calls

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and not self.conn.closed

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class Workers:
    """A fixed number of attachment workers, leased to requests while idle."""

    def __init__(self, size: int) -> None:
        self.size = size
        # The daemon's own level (logs.setup ran before): a worker logs JSON lines the same way.
        self.log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._idle: list[Worker] = []
        self._all: list[Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the fork server and the workers (a few hundred milliseconds: the preload imports). Requests
        served meanwhile find no idle worker and make their attachments themselves."""
        for _ in range(self.size):
            if not self._add(Worker(self._ctx, self.log_level)):
                return

    def lease(self, count: int) -> list[Worker]:
        """Up to `count` idle workers, now; give each back with `give_back`. A worker found dead on the way
        is replaced in the background."""
        taken: list[Worker] = []
        dead: list[Worker] = []
        with self._lock:
            while self._idle and len(taken) < count:
                w = self._idle.pop(0)
                (taken if w.alive else dead).append(w)
        for w in dead:
            self.give_back(w)
        return taken

    def give_back(self, worker: Worker) -> None:
        """Return a leased worker; a dead one is replaced in the background (starting a process must not
        add to the request that found it dead)."""
        with self._lock:
            if self._closed:
                worker.kill()
                return
            if worker.alive:
                self._idle.append(worker)
                return
            self._all.remove(worker)
        log.warning("attachment worker (pid %s) is gone: starting another", worker.process.pid)
        threading.Thread(target=self._replace, name="attach-worker-start", daemon=True).start()

    def _replace(self) -> None:
        time.sleep(REPLACE_DELAY)  # a worker that keeps dying must not become a fork loop
        try:
            self._add(Worker(self._ctx, self.log_level))
        except Exception as e:
            log.error("cannot start an attachment worker: %s", e)

    def _add(self, worker: Worker) -> bool:
        """Make a new worker idle; False (and the worker ended) once the pool is closed."""
        with self._lock:
            if not self._closed:
                self._all.append(worker)
                self._idle.append(worker)
                return True
        worker.kill()
        return False

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = self._all, [], []
        for w in workers:
            w.conn.close()  # the worker's recv() ends: it exits on its own
        for w in workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.kill()


class Spread:
    """What core uses for one request: its invoker's settings bound to the daemon's workers, and where the
    delegate timings made in a worker (`observe`) and each worker attachment's outcome (`done`: None or the
    CNI error code) go."""

    def __init__(self, workers: Workers, timeout: float, standard: bool,
                 observe: Callable[[Observation], None] | None = None,
                 done: Callable[[int | None], None] | None = None) -> None:
        self.workers = workers
        self.timeout = timeout
        self.standard = standard
        self.observe = observe
        self.done = done

    def lease(self, count: int) -> list[Worker]:
        return self.workers.lease(count)

    def give_back(self, worker: Worker) -> None:
        self.workers.give_back(worker)

    def send(self, worker: Worker, att: Attachment, base: Invocation) -> None:
        worker.send(att, base, self.timeout, self.standard)

    def receive(self, worker: Worker, att: Attachment) -> dict[str, Any]:
        try:
            outcome, calls = worker.receive(self.timeout * max(1, _plugin_calls(att)) + ANSWER_MARGIN)
        except CNIError as e:
            self._record([], e.code)
            raise
        if isinstance(outcome, CNIError):
            self._record(calls, outcome.code)
            raise outcome
        self._record(calls, None)
        return outcome

    def _record(self, calls: Sequence[Observation], code: int | None) -> None:
        if self.observe is not None:
            for call in calls:
                self.observe(call)
        if self.done is not None:
            self.done(code)


def _plugin_calls(att: Attachment) -> int:
    """Plugin calls an ADD of `att` can make: each plugin and its IPAM."""
    return sum(2 if isinstance(p.get("ipam"), dict) else 1 for p in att.network.plugins)

