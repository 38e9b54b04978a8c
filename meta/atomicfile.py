"""Replacing a file atomically: readers see the old content or the new, never a partial write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = False) -> None:
    """Write `data` to a temporary file beside `path` and rename it over `path`.

    `durable` also fsyncs the file and its directory, so the new content survives a crash or power loss
    (needed for what DEL relies on; not for caches that can be rebuilt).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:  # mkstemp made it 0600; a chmod costs ~0.2 ms on a busy journal
                os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
