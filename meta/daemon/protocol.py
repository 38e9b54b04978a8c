"""The shim <-> daemon wire protocol: one HTTP/1.0 exchange over the daemon's unix socket per CNI call.

    POST /v1/cni      body {"env": {"CNI_COMMAND": ..., every CNI_* variable}, "config": base64(stdin bytes)}
                      answer {"exitCode": int, "stdout": str}: what `meta-cni` prints and exits with, unchanged
                      (HTTP 200; 400 when the daemon cannot read the request, still with an answer body)
    GET  /healthz     200 while the process serves
    GET  /readyz      200 once pending DELs were replayed and every watch cache synced, else 503
    GET  /metrics     Prometheus text format

The stdin config travels as base64 so the daemon sees the exact bytes the runtime sent (error messages and
the undecodable-input case stay identical to thin mode). The version is in the path so that a shim and a
daemon of different releases (a rolling update) fail loudly instead of misreading each other.

Standard library only: imported by the shim on every forwarded call.
"""
from __future__ import annotations

import base64
import binascii
import json
import socket

# The typing module costs the shim milliseconds per CNI call; annotations are never evaluated at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

CNI = "/v1/cni"
HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
# Bigger than any sane CNI config (a conflist with prevResult is a few KiB); bounds what the daemon buffers.
MAX_BODY = 16 * 1024 * 1024
ENV_PREFIX = "CNI_"


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the runtime's environment that is the CNI request (the daemon never uses its own)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def encode_request(env: Mapping[str, str], stdin: bytes) -> bytes:
    return json.dumps({"env": dict(env), "config": base64.b64encode(stdin).decode("ascii")}).encode()


def decode_request(body: bytes) -> tuple[dict[str, str], bytes]:
    """(env, stdin) of a request body; ValueError when it is not one."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("request is not a JSON object")
    env, config = data.get("env"), data.get("config")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("request field 'env' must map names to strings")
    if not isinstance(config, str):
        raise ValueError("request field 'config' must be a base64 string")
    try:
        stdin = base64.b64decode(config, validate=True)
    except binascii.Error as e:
        raise ValueError(f"request field 'config' is not base64: {e}") from None
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}, stdin


def encode_answer(exit_code: int, stdout: str) -> bytes:
    return json.dumps({"exitCode": exit_code, "stdout": stdout}).encode()


def decode_answer(body: bytes) -> tuple[int, str]:
    """(exit code, stdout) of an answer body; ValueError when it is not one."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    code, out = data.get("exitCode"), data.get("stdout")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(out, str):
        raise ValueError("answer lacks an integer 'exitCode' and a string 'stdout'")
    return code, out


class ExchangeError(Exception):
    """No usable HTTP answer; the message says why in a few words (for the shim's CNI error)."""


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def exchange(path: str, method: str, target: str, body: bytes = b"", *, connect_timeout: float = 10.0,
             answer_timeout: float = 300.0) -> tuple[int, bytes]:
    """One HTTP/1.0 exchange over the unix socket at `path`: (status, body).

    A minimal client on purpose: http.client costs the shim ~30 ms of imports (email, ssl) on every CNI
    call, and the daemon always answers with Content-Length and closes the connection.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    chunks: list[bytes] = []
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(path)
        except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
            raise ExchangeError(_reason(e)) from None
        sock.settimeout(answer_timeout)
        head = (f"{method} {target} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            sock.sendall(head + body)
            size = 0
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                size += len(data)
                if size > MAX_BODY + 65536:
                    raise ExchangeError("answer too large")
                chunks.append(data)
        except OSError as e:
            raise ExchangeError(f"no answer: {_reason(e)}") from None
    finally:
        sock.close()
    return _parse(b"".join(chunks))


def _parse(raw: bytes) -> tuple[int, bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ExchangeError("no answer: the connection closed before a complete HTTP answer" if raw else
                            "no answer: the connection closed without one")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ExchangeError("not an HTTP answer")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    if length is not None:
        if len(rest) < length:
            raise ExchangeError("no answer: the connection closed in the middle of the answer")
        rest = rest[:length]
    return int(parts[1]), rest
