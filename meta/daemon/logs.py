"""The daemon's structured logs: one JSON object per line on stderr.

Every line has `time`, `level`, `logger` and `msg`; lines logged while a CNI request is served also carry
that request's `command`, `containerID`, `ifname`, `network` and `pod`, and the line that closes a request
adds `duration_ms` and `result`. Anything else written to stderr (an exec'd delegate's own messages) is
turned into log lines too, so the stream stays machine-readable.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

LOGGER = "meta-cni"
_request: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("meta_cni_request", default={})
LEVELS = ("debug", "info", "warning", "error")


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _timestamp(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "request", None) or {})
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _RequestFilter(logging.Filter):
    """Stamps each record with the request being served by the logging thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request = _request.get()
        return True


class _StderrToLog(io.TextIOBase):
    """A stand-in for sys.stderr that logs each complete line it is given."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.partial = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        buf = getattr(self.partial, "text", "") + s
        *lines, self.partial.text = buf.split("\n")
        for line in lines:
            if line.strip():
                self.logger.warning(line.rstrip())
        return len(s)

    def flush(self) -> None:
        text = getattr(self.partial, "text", "")
        if text.strip():
            self.partial.text = ""
            self.logger.warning(text.rstrip())


def setup(level: str, stream: TextIO | None = None) -> None:
    """Route every logger to JSON lines on `stream` (the real stderr) and capture stray stderr writes."""
    out = stream or sys.__stderr__ or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(_RequestFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    sys.stderr = _StderrToLog(logging.getLogger(f"{LOGGER}.stderr"))


@contextlib.contextmanager
def request(**fields: Any) -> Iterator[dict[str, Any]]:
    """Attach `fields` to every line logged by this thread until the block ends; the dict may be extended."""
    current = dict(_request.get())
    current.update({k: v for k, v in fields.items() if v not in (None, "")})
    token = _request.set(current)
    try:
        yield current
    finally:
        _request.reset(token)
