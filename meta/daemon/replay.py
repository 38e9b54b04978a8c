"""Finding and replaying the DELs the shim spooled while the daemon was unreachable.

A pass replays the spooled DELs of every cniDir the daemon knows, oldest first: those it was told about
(`--cni-dir`, the default one included) and every cniDir a request ever used. The latter are remembered in
`<first --cni-dir>/.daemon-cni-dirs.json`, so that a restarted daemon (or a rebooted node: host-local's
reservations outlive it) still finds DELs spooled under a cniDir only a config names. A DEL that fails stays
spooled for the next pass (one at start-up, then periodically), as a runtime would retry it.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from .. import atomicfile
from . import spool
from .dispatch import Dispatcher

log = logging.getLogger("meta-cni.daemon")
STATE = ".daemon-cni-dirs.json"


class Replayer:
    def __init__(self, dispatcher: Dispatcher, cni_dirs: Iterable[str]) -> None:
        self.dispatcher = dispatcher
        self.configured = tuple(dict.fromkeys(cni_dirs))
        self.lock = threading.Lock()
        self.state = Path(self.configured[0]) / STATE if self.configured else None
        self.remembered: list[str] = self._load()
        dispatcher.on_new_cni_dir = self.remember

    def _load(self) -> list[str]:
        if self.state is None:
            return []
        try:
            data = json.loads(self.state.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): replaying only the configured cniDirs", self.state, e)
            return []
        return [d for d in data if isinstance(d, str) and d.startswith("/")] if isinstance(data, list) else []

    def remember(self, cni_dir: str) -> None:
        with self.lock:
            if self.state is None or cni_dir in self.configured or cni_dir in self.remembered:
                return
            self.remembered.append(cni_dir)
            try:
                self.state.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                atomicfile.write(self.state, json.dumps(self.remembered).encode(), durable=True)
            except OSError as e:
                log.warning("cannot record cniDir %s in %s: %s", cni_dir, self.state, e)

    def cni_dirs(self) -> list[str]:
        with self.dispatcher.lock:
            seen = set(self.dispatcher.cni_dirs)
        with self.lock:
            remembered = list(self.remembered)
        return list(dict.fromkeys([*self.configured, *remembered, *sorted(seen)]))

    def pending(self) -> list[Path]:
        return [p for d in self.cni_dirs() for p in spool.pending(d)]

    def count(self) -> int:
        return len(self.pending())

    def replay_all(self, stop: threading.Event | None = None) -> int:
        """One pass over every spooled DEL (cut short when `stop` is set, so a shutdown does not wait for a
        long backlog); how many are still pending afterwards."""
        left = 0
        for path in self.pending():
            if stop is not None and stop.is_set():
                left += 1
                continue
            try:
                done = self.dispatcher.replay(path)
            except Exception:  # one broken file must not stop the others
                log.exception("replaying %s failed", path)
                done = False
            left += not done
        return left
