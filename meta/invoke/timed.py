"""An Invoker that reports how long each delegate call of the one it wraps took, and how it ended: the
daemon's delegate metrics, and the timings an attachment worker sends back with its result."""
from __future__ import annotations

import time
from collections.abc import Callable

from ..cni.errors import INTERNAL, CNIError
from . import Invocation, Invoker

# (plugin type, command, CNI error code or None, seconds) of one delegate call.
Observation = tuple[str, str, int | None, float]


class TimedInvoker:
    def __init__(self, inner: Invoker, observe: Callable[[Observation], None]) -> None:
        self.inner = inner
        self.observe = observe

    def in_process(self, plugin_type: str) -> bool:
        # core schedules in-process attachments differently (meta/core.py _Attacher.attach_all).
        in_process = getattr(self.inner, "in_process", None)
        return bool(in_process and in_process(plugin_type))

    def run(self, plugin_type: str, stdin: bytes, inv: Invocation) -> bytes:
        start = time.monotonic()
        code: int | None = INTERNAL
        try:
            out = self.inner.run(plugin_type, stdin, inv)
            code = None
            return out
        except CNIError as e:
            code = e.code
            raise
        finally:
            self.observe((plugin_type, inv.command, code, time.monotonic() - start))
