"""Serving one CNI request in the daemon: admission, ordering, and the same `execute` as thin mode.

- Admission: at most `max_concurrent` requests run at once (delegates are processes and memory: a burst
  of pods must not take the node down); one that cannot start within `max_wait` seconds gets CNI error 11
  and the runtime retries. STATUS is exempt: it attaches nothing, and refusing it would mark the node's
  network not ready in the middle of a burst, which is the opposite of what a burst needs.
- Ordering: requests for the same attachment (cniDir, network, container, interface) run one after the
  other. A runtime that gives up on a slow ADD sends DEL while the ADD still runs here; serialized, the DEL
  undoes the finished ADD instead of racing it.
- Start-up: ADD, CHECK and GC wait until the spooled DELs were replayed once, and an ADD for an attachment
  whose DEL is still spooled replays that DEL first (else the late DEL would undo the new ADD).
- Each request runs `meta.main.execute` with the request's own environment (never the daemon's), one
  long-lived invoker per delegate setting and the daemon's source factory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from .. import config as metaconfig
from ..cni import args as cniargs
from ..cni import request as cnirequest
from ..cni.errors import TRY_AGAIN_LATER, CNIError
from ..invoke import Invoker
from ..invoke.timed import TimedInvoker
from ..invoke.workers import Spread, Workers
from ..main import execute, version_info
from ..sources import SourceFactory
from . import logs, spool
from .metrics import Metrics, result_label

log = logging.getLogger("meta-cni.daemon")
GATED = ("ADD", "CHECK", "GC")
UNBOUNDED = ("STATUS",)


@attrs.frozen
class Peek:
    """What the daemon reads from a request before core.run parses it properly."""

    command: str
    network: str
    container_id: str
    ifname: str
    cni_dir: str
    cni_version: str | None
    pod: str | None
    delegate_timeout: float
    builtin_standard_types: bool

    @property
    def key(self) -> tuple[str, str, str, str] | None:
        if self.command not in ("ADD", "DEL", "CHECK") or not self.container_id:
            return None
        return self.cni_dir, self.network, self.container_id, self.ifname

    @property
    def spool_path(self) -> Path:
        return spool.path_for(self.cni_dir, self.network, self.container_id, self.ifname)

    @classmethod
    def of(cls, env: Mapping[str, str], stdin: bytes) -> "Peek":
        try:
            config: dict[str, Any] = cnirequest.decode_config(stdin)
        except (CNIError, RecursionError):
            config = {}
        try:
            # Validated as core.run will; when that fails core.run reports it, and for DEL it falls back to the
            # defaults too, so the delegate settings here always match what thin mode would use.
            cfg = metaconfig.load(config)
            timeout, standard = cfg.delegate_timeout, cfg.builtin_standard_types
        except Exception:
            fallback = metaconfig.MetaConfig(name="", cni_version="", cluster_network="")
            timeout, standard = fallback.delegate_timeout, fallback.builtin_standard_types
        try:
            pairs = cniargs.parse(env.get("CNI_ARGS", ""))
        except CNIError:
            pairs = ()
        name = cniargs.get(pairs, cniargs.POD_NAME)
        pod = f"{cniargs.get(pairs, cniargs.POD_NAMESPACE) or 'default'}/{name}" if name else None
        network = config.get("name")
        version = config.get("cniVersion")
        return cls(command=env.get("CNI_COMMAND", ""), network=network if isinstance(network, str) else "",
                   container_id=env.get("CNI_CONTAINERID", ""), ifname=env.get("CNI_IFNAME", ""),
                   cni_dir=spool.cni_dir_of(config), cni_version=version if isinstance(version, str) else None,
                   pod=pod, delegate_timeout=timeout, builtin_standard_types=standard)


class KeyLocks:
    """One lock per key, existing only while someone holds or waits for it."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.locks: dict[Any, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def held(self, key: Any) -> Iterator[None]:
        if key is None:
            yield
            return
        with self.guard:
            lock, users = self.locks.get(key, (threading.Lock(), 0))
            self.locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self.guard:
                lock, users = self.locks[key]
                if users == 1:
                    del self.locks[key]
                else:
                    self.locks[key] = (lock, users - 1)


class Dispatcher:
    def __init__(self, sources: SourceFactory, metrics: Metrics, max_concurrent: int, max_wait: float,
                 workers: Workers | None = None) -> None:
        self.sources = sources
        self.metrics = metrics
        self.workers = workers
        self.max_concurrent = max_concurrent
        self.max_wait = max_wait
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.keys = KeyLocks()
        self.replayed = threading.Event()
        self.lock = threading.Lock()
        self.invokers: dict[tuple[float, bool], Invoker] = {}
        self.cni_dirs: set[str] = set()
        # Told about each cniDir the first time a request uses it (the replayer remembers them on disk).
        self.on_new_cni_dir: Callable[[str], None] | None = None

    # --- pieces ------------------------------------------------------------------------------------------

    def invoker(self, peek: Peek) -> Invoker:
        """One long-lived invoker per delegate setting: built-in delegates keep their imports and netlink
        sockets warm across requests."""
        key = (peek.delegate_timeout, peek.builtin_standard_types)
        with self.lock:
            inv = self.invokers.get(key)
            if inv is None:
                from ..invoke.builtin import BuiltinInvoker
                from ..invoke.exec import ExecInvoker

                inv = self.invokers[key] = TimedInvoker(BuiltinInvoker(ExecInvoker(key[0]), key[1]),
                                                        self.metrics.delegate_done)
            return inv

    @contextlib.contextmanager
    def slot(self, deadline: float | None) -> Iterator[bool]:
        """Yields whether a slot was obtained (waiting until `deadline`, or forever when None)."""
        self.metrics.waiting.inc()
        try:
            got = self.slots.acquire(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            self.metrics.waiting.dec()
        if not got:
            yield False
            return
        self.metrics.in_flight.inc()
        try:
            yield True
        finally:
            self.metrics.in_flight.dec()
            self.slots.release()

    def _run(self, env: Mapping[str, str], stdin: bytes, peek: Peek) -> tuple[int, str, int | None]:
        with self.lock:
            new = peek.cni_dir not in self.cni_dirs
            self.cni_dirs.add(peek.cni_dir)
        if new and self.on_new_cni_dir is not None:
            self.on_new_cni_dir(peek.cni_dir)
        spread = None
        if self.workers is not None:
            spread = Spread(self.workers, peek.delegate_timeout, peek.builtin_standard_types,
                            self.metrics.delegate_done, self.metrics.worker_done)
        return execute(dict(env), stdin, invoker=self.invoker(peek), sources=self.sources, spread=spread)

    @staticmethod
    def _refuse(peek: Peek, msg: str) -> tuple[int, str, int | None]:
        return 1, CNIError(TRY_AGAIN_LATER, msg).to_json(peek.cni_version), TRY_AGAIN_LATER

    # --- requests from the socket ------------------------------------------------------------------------

    def handle(self, env: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
        """(exit code, stdout) of one CNI request, as `meta-cni` would print it."""
        if env.get("CNI_COMMAND") == "VERSION":
            return 0, version_info(stdin)
        start = time.monotonic()
        peek = Peek.of(env, stdin)
        with logs.request(command=peek.command, containerID=peek.container_id, ifname=peek.ifname,
                          network=peek.network, pod=peek.pod):
            try:
                rc, out, code = self._serve(env, stdin, peek, start + self.max_wait)
            except Exception as e:  # execute() catches everything of core; this is our own bug
                log.exception("daemon error")
                rc, out, code = 1, CNIError(999, f"meta-cni daemon internal error: {type(e).__name__}: {e}").to_json(
                    peek.cni_version), 999
            seconds = time.monotonic() - start
            self.metrics.request_done(peek.command or "(none)", code, seconds)
            fields: dict[str, Any] = {"duration_ms": round(seconds * 1000, 1), "result": result_label(code)}
            if code is not None:
                fields["error"] = _message(out)
            log.log(logging.INFO if code is None else logging.WARNING, "request served", extra={"fields": fields})
        return rc, out

    def _serve(self, env: Mapping[str, str], stdin: bytes, peek: Peek, deadline: float) -> tuple[int, str, int | None]:
        if peek.command in GATED and not self.replayed.wait(max(0.0, deadline - time.monotonic())):
            return self._refuse(peek, "meta-cni daemon is starting (replaying DELs that arrived while it was down); "
                                      "try again later")
        if peek.command in UNBOUNDED:
            with self.metrics.in_flight.track_inprogress():
                return self._run(env, stdin, peek)
        with self.keys.held(peek.key):
            if peek.command == "ADD" and peek.key and peek.spool_path.exists():
                ok, why = self._replay_locked(peek.spool_path)
                if not ok:
                    return self._refuse(peek, f"a DEL of container {peek.container_id} interface {peek.ifname} spooled "
                                              f"while the daemon was down could not be completed yet ({why}); try again later")
            with self.slot(deadline) as got:
                if not got:
                    return self._refuse(peek, f"meta-cni daemon is busy: {self.max_concurrent} requests are running and "
                                              f"this one waited {self.max_wait:g}s for its turn; try again later")
                rc, out, code = self._run(env, stdin, peek)
            if peek.command == "DEL" and rc == 0 and peek.key:
                spool.remove(peek.spool_path)  # this DEL did what the spooled one would have done
        return rc, out, code

    # --- spooled DELs ------------------------------------------------------------------------------------

    def _read_spooled(self, path: Path) -> tuple[dict[str, str], bytes] | None:
        """The request of a spooled DEL; None when there is none to replay (gone, or set aside because it
        can never be replayed)."""
        if not path.exists():
            return None
        why = None if spool.trusted(path) else "untrusted"
        request: tuple[dict[str, str], bytes] | None = None
        if why is None:
            try:
                request = spool.read(path)
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as e:
                why = f"corrupt ({e})"
        if request is not None:
            return request
        aside = spool.set_aside(path, why.split(" ")[0] if why else "corrupt")
        log.error("spooled DEL cannot be replayed, set aside", extra={"fields": {"file": str(aside), "why": why}})
        self.metrics.replays.labels("rejected").inc()
        return None

    def replay(self, path: Path) -> bool:
        """Replay one spooled DEL; True when it is no longer pending (replayed, done meanwhile, or set aside
        because it can never be replayed)."""
        request = self._read_spooled(path)
        if request is None:
            return True
        env, stdin = request
        peek = Peek.of(env, stdin)
        with logs.request(command="DEL", containerID=peek.container_id, ifname=peek.ifname, network=peek.network,
                          pod=peek.pod, origin="pending-del"):
            with self.keys.held(peek.key):
                return self._replay_locked(path, env, stdin, peek)[0]

    def _replay_locked(self, path: Path, env: Mapping[str, str] | None = None, stdin: bytes = b"",
                       peek: Peek | None = None) -> tuple[bool, str]:
        """Replay `path` with its attachment's key lock held: (done, why not)."""
        if env is None or peek is None:
            request = self._read_spooled(path)
            if request is None:
                return True, ""  # nothing left that could undo a later ADD
            env, stdin = request
            peek = Peek.of(env, stdin)
        if not path.exists():
            return True, ""  # done meanwhile by a live DEL
        start = time.monotonic()
        with self.slot(None):
            rc, out, code = self._run(env, stdin, peek)
        fields = {"duration_ms": round((time.monotonic() - start) * 1000, 1), "result": result_label(code)}
        self.metrics.replays.labels(result_label(code)).inc()
        if rc == 0:
            spool.remove(path)
            log.info("spooled DEL replayed", extra={"fields": fields})
            return True, ""
        log.warning("spooled DEL failed, will retry", extra={"fields": dict(fields, error=_message(out))})
        return False, _message(out)


def _message(out: str) -> str:
    """The `msg` of a CNI error structure (the raw text when it is not one)."""
    try:
        data = json.loads(out)
    except ValueError:
        return out.strip()
    return str(data.get("msg", out.strip())) if isinstance(data, dict) else out.strip()
