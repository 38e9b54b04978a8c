"""Thick mode of `meta-cni`: hand the CNI call to the node daemon and print its answer unchanged.

When the daemon cannot be reached the answer never pretends success for work that was not done: ADD, CHECK
and GC fail with code 11 (try again later), so a pod never starts without its secondary networks, and STATUS
says 50 (not available). DEL is the exception the runtime needs: it is spooled durably for the daemon to
replay (see meta/daemon/spool.py) and answered with success, so a sandbox can be torn down while the daemon
restarts without leaking what ADD made.

Standard library only (it runs on every CNI call, and installed as a zipapp with nothing but python3).
"""
from __future__ import annotations

import sys

from .cni.errors import NOT_AVAILABLE, TRY_AGAIN_LATER, CNIError
from .daemon import protocol

# The typing module costs the shim milliseconds per CNI call; annotations are never evaluated at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# connect() on a unix socket answers at once unless the listen queue is full; a daemon that accepts nothing
# for this long is as good as down.
CONNECT_TIMEOUT = 10.0
# The daemon bounds the work itself (admission wait, delegateTimeout per delegate); this only guards against
# a daemon that hangs. A runtime that gives up sooner kills the shim, and the daemon's work still completes.
ANSWER_TIMEOUT = 300.0


class Unreachable(Exception):
    """The daemon gave no usable answer (no socket, refused, timed out, died mid-call, foreign answer)."""


def call(socket_path: str, env: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    """One request to the daemon: its (exit code, stdout)."""
    try:
        status, body = protocol.exchange(socket_path, "POST", protocol.CNI, protocol.encode_request(env, stdin),
                                         connect_timeout=CONNECT_TIMEOUT, answer_timeout=ANSWER_TIMEOUT)
    except protocol.ExchangeError as e:
        raise Unreachable(str(e)) from None
    try:
        return protocol.decode_answer(body)
    except ValueError as e:
        raise Unreachable(f"unusable answer (HTTP {status}): {e}") from None


def forward(socket_path: str, environ: Mapping[str, str], stdin: bytes, config: dict[str, Any]) -> tuple[int, str]:
    """(exit code, stdout) for the runtime: the daemon's answer, or our fallback when it is unreachable."""
    env = protocol.forwarded_env(environ)
    try:
        return call(socket_path, env, stdin)
    except Unreachable as e:
        return fallback(socket_path, env, stdin, config, str(e))


def fallback(socket_path: str, env: Mapping[str, str], stdin: bytes, config: dict[str, Any], reason: str) -> tuple[int, str]:
    command = env.get("CNI_COMMAND", "")
    version = config.get("cniVersion") if isinstance(config.get("cniVersion"), str) else None
    where = f"meta-cni daemon unreachable at {socket_path} ({reason})"
    if command == "DEL":
        from .daemon import spool  # hashlib and tempfile: only this path needs them

        try:
            path = spool.write(env, stdin, config)
        except (OSError, ValueError) as e:
            # Not kept means not done: the runtime must retry this DEL.
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            err = CNIError(TRY_AGAIN_LATER, f"{where}, and the DEL could not be spooled for it: {reason}")
            return 1, err.to_json(version)
        sys.stderr.write(f"{where}: DEL spooled to {path}, the daemon replays it when it starts\n")
        return 0, ""
    if command == "STATUS":
        return 1, CNIError(NOT_AVAILABLE, f"{where}: cannot serve CNI requests").to_json(version)
    if command == "ADD":
        msg = f"{where}: no network of the pod, secondary networks included, can be attached; try again later"
    elif command == "CHECK":
        msg = f"{where}: the pod's networks, secondary networks included, cannot be checked; try again later"
    else:
        msg = f"{where}: {command or 'the command'} cannot run; try again later"
    return 1, CNIError(TRY_AGAIN_LATER, msg).to_json(version)
