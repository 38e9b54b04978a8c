"""Thick mode of `meta-cni`: hand the CNI call to the node daemon and print its answer unchanged.

When the daemon cannot be reached the answer never pretends success for work that was not done: ADD, CHECK
and GC fail with code 11 (try again later), so a pod never starts without its secondary networks, and STATUS
says 50 (not available). DEL is the exception the runtime needs: it is spooled durably for the daemon to
replay (see meta/daemon/spool.py) and answered with success, so a sandbox can be torn down while the daemon
restarts without leaking what ADD made.

Two ways in: `forward`, from meta/main.py once it has parsed the config (the venv's `meta-cni`), and
`installed_main`, what the shim `metactl install` puts on a node runs (meta/daemon/install.py). The installed
shim runs on every CNI call of every pod, so its common path imports nothing beyond this module and the
wire protocol (no json, no socket module: together ~10 ms of a ~20 ms call) and finds `daemonSocket` in
the config bytes without parsing them; anything out of the ordinary (VERSION, a config it cannot read that
way, an unreachable daemon) goes through meta/main.py as before.

Standard library only (installed with nothing but python3 on the node).
"""
import sys

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


def call(socket_path: str, env: "Mapping[str, str]", stdin: bytes) -> "tuple[int, str]":
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


def forward(socket_path: str, environ: "Mapping[str, str]", stdin: bytes, config: "dict[str, Any]") -> "tuple[int, str]":
    """(exit code, stdout) for the runtime: the daemon's answer, or our fallback when it is unreachable."""
    env = protocol.forwarded_env(environ)
    try:
        return call(socket_path, env, stdin)
    except Unreachable as e:
        return fallback(socket_path, env, stdin, config, str(e))


def fallback(socket_path: str, env: "Mapping[str, str]", stdin: bytes, config: "dict[str, Any]",
             reason: str) -> "tuple[int, str]":
    from .cni.errors import NOT_AVAILABLE, TRY_AGAIN_LATER, CNIError  # json: only this path needs it

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


SOCKET_KEY = b'"daemonSocket"'


def config_socket(stdin: bytes) -> "str | None":
    """The config's `daemonSocket` read straight from its bytes, or None when that cannot be done with
    certainty (then the caller parses the config properly): the key must occur exactly once, followed by
    a colon and a plain string (no escapes) that is an absolute path."""
    at = stdin.find(SOCKET_KEY)
    if at < 0 or stdin.find(SOCKET_KEY, at + 1) >= 0:
        return None
    rest = stdin[at + len(SOCKET_KEY):].lstrip(b" \t\r\n")
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip(b" \t\r\n")
    end = rest.find(b'"', 1)
    if not rest.startswith(b'"') or end < 0:
        return None
    value = rest[1:end]
    if not value.startswith(b"/") or b"\\" in value:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def installed_main() -> int:
    """What the installed shim runs: forward an ordinary CNI call without the cost of parsing anything,
    else do what `meta-cni` (meta/main.py) does."""
    from posix import environ  # bytes, and already loaded: `os` is not, and costs a millisecond

    command = environ.get(b"CNI_COMMAND", b"")
    if not command or command == b"VERSION":
        return _meta_main(None)
    try:
        stdin = sys.stdin.buffer.read()
    except OSError:
        return _meta_main(None)  # it reads again, and reports the error as the spec says
    socket_path = config_socket(stdin)
    if socket_path is None:
        return _meta_main(stdin)
    env = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
           for k, v in environ.items() if k.startswith(b"CNI_")}
    try:
        rc, out = call(socket_path, env, stdin)
    except Unreachable as e:
        from .main import stdin_config

        config = stdin_config(stdin)
        rc, out = fallback(socket_path, env, stdin, config if isinstance(config, dict) else {}, str(e))
    sys.stdout.write(out)
    return rc


def _meta_main(stdin: "bytes | None") -> int:
    from .main import main

    return main(stdin)
