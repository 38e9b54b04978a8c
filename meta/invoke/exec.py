"""Exec'ing delegate CNI binaries found on CNI_PATH, as libcni's pkg/invoke does."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from ..cni.errors import DELEGATE_FAILED, INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from . import Invocation

# A plugin type is a file name, never a path (no "/", no "..", no leading dot).
TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def find(plugin_type: str, path: tuple[str, ...], where: str) -> Path:
    """The first regular file named `plugin_type` in the directories of `path` (libcni FindInPath)."""
    if not TYPE_RE.match(plugin_type) or len(plugin_type) > 255:
        raise CNIError(INVALID_CONFIG, f"{where}: type {plugin_type!r} is not a plain plugin name")
    for d in path:
        candidate = Path(d) / plugin_type
        if candidate.is_file():
            return candidate
    raise CNIError(INVALID_CONFIG, f"{where}: failed to find plugin {plugin_type!r} in path {list(path)}")


class ExecInvoker:
    """Runs each plugin as a child process with the CNI environment; kills it (and its children) on timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def run(self, plugin_type: str, stdin: bytes, inv: Invocation) -> bytes:
        binary = find(plugin_type, inv.path, inv.where)
        env = dict(os.environ)
        env.update(
            CNI_COMMAND=inv.command, CNI_CONTAINERID=inv.container_id, CNI_NETNS=inv.netns,
            CNI_IFNAME=inv.ifname, CNI_ARGS=inv.cni_args, CNI_PATH=os.pathsep.join(inv.path),
        )
        try:
            proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            raise CNIError(DELEGATE_FAILED, f"{inv.where}: cannot exec {binary}: {e.strerror}") from None
        try:
            out, err = proc.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # The plugin may have forked its own delegates (IPAM): kill the whole session.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise CNIError(TRY_AGAIN_LATER, f"{inv.where}: {plugin_type} {inv.command} did not finish within {self.timeout:g}s") from None
        if err:
            sys.stderr.write(err.decode(errors="replace"))
        if proc.returncode != 0:
            raise _plugin_error(plugin_type, inv, proc.returncode, out, err)
        return out


def _plugin_error(plugin_type: str, inv: Invocation, rc: int, out: bytes, err: bytes) -> CNIError:
    try:
        data = json.loads(out)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("code"), int):
        msg = f"{inv.where}: {plugin_type} {inv.command}: {data.get('msg', '')}"
        return CNIError(data["code"], msg, str(data.get("details") or ""))
    text = (err or out).decode(errors="replace").strip()
    return CNIError(DELEGATE_FAILED, f"{inv.where}: {plugin_type} {inv.command} failed (exit {rc}): {text[:500]}")
