"""The shim <-> daemon wire protocol: one HTTP/1.0 exchange over the daemon's unix socket per CNI call.

    POST /v2/cni      body: the request's CNI_* variables as `NAME=value` entries, each ended by a NUL byte,
                      then one more NUL, then the exact stdin bytes the runtime sent;
                      answer: the exit code in decimal, a newline, then what `meta-cni` prints on stdout,
                      unchanged (HTTP 200; 400 when the daemon cannot read the request, still with an answer)
    GET  /healthz     200 while the process serves
    GET  /readyz      200 once pending DELs were replayed and every watch cache synced, else 503
    GET  /metrics     Prometheus text format

A binary framing rather than JSON: the shim runs on every CNI call, and importing json (which imports re)
costs it more than the rest of its work; an environment variable can hold no NUL byte, so the framing needs
no escaping, and the daemon sees the exact bytes the runtime sent (error messages and the undecodable-input
case stay identical to thin mode). The version is in the path so that a shim and a daemon of different
releases (a rolling update) fail loudly instead of misreading each other.

Imports nothing but the `_socket` built-in (the `socket` module alone costs ~7 ms of enum and selectors
imports): the shim imports this module on every forwarded call.
"""
import _socket

# The typing module costs the shim milliseconds per CNI call; annotations are never evaluated at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

CNI = "/v2/cni"
HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
# Bigger than any sane CNI config (a conflist with prevResult is a few KiB); bounds what the daemon buffers.
MAX_BODY = 16 * 1024 * 1024
ENV_PREFIX = "CNI_"
# Environment names and values are bytes to the kernel; the same escape os.fsdecode uses keeps any byte.
_ENCODING = ("utf-8", "surrogateescape")


def forwarded_env(environ: "Mapping[str, str]") -> "dict[str, str]":
    """The part of the runtime's environment that is the CNI request (the daemon never uses its own)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def encode_request(env: "Mapping[str, str]", stdin: bytes) -> bytes:
    """The request body of `env`'s CNI_* variables and `stdin`; ValueError for a name or value no
    environment can hold."""
    parts = []
    for name, value in forwarded_env(env).items():
        if "\0" in name or "=" in name or "\0" in value:
            raise ValueError(f"environment variable {name!r} cannot be forwarded: a NUL byte, or '=' in its name")
        parts.append(f"{name}={value}\0".encode(*_ENCODING))
    parts.append(b"\0")
    parts.append(stdin)
    return b"".join(parts)


def decode_request(body: bytes) -> "tuple[dict[str, str], bytes]":
    """(env, stdin) of a request body; ValueError when it is not one."""
    env: dict[str, str] = {}
    pos = 0
    while True:
        end = body.find(b"\0", pos)
        if end < 0:
            raise ValueError("request has no end of its environment (a NUL byte after the last NAME=value)")
        if end == pos:
            break
        name, sep, value = body[pos:end].decode(*_ENCODING).partition("=")
        if not sep or not name:
            raise ValueError(f"request environment entry {body[pos:end][:40]!r} is not NAME=value")
        if name.startswith(ENV_PREFIX):
            env[name] = value
        pos = end + 1
    return env, body[end + 1:]


def encode_answer(exit_code: int, stdout: str) -> bytes:
    return b"%d\n" % exit_code + stdout.encode(*_ENCODING)


def decode_answer(body: bytes) -> "tuple[int, str]":
    """(exit code, stdout) of an answer body; ValueError when it is not one."""
    code, sep, out = body.partition(b"\n")
    if not sep or not code.isdigit() or len(code) > 3:
        raise ValueError("answer does not start with an exit code line")
    return int(code), out.decode(*_ENCODING)


class ExchangeError(Exception):
    """No usable HTTP answer; the message says why in a few words (for the shim's CNI error)."""


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def exchange(path: str, method: str, target: str, body: bytes = b"", *, connect_timeout: float = 10.0,
             answer_timeout: float = 300.0) -> "tuple[int, bytes]":
    """One HTTP/1.0 exchange over the unix socket at `path`: (status, body).

    A minimal client on purpose: http.client costs the shim ~30 ms of imports (email, ssl) on every CNI
    call, and the daemon always answers with Content-Length and closes the connection.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    chunks: list[bytes] = []
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(path)
        except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
            raise ExchangeError(_reason(e)) from None
        sock.settimeout(answer_timeout)
        head = (f"{method} {target} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
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


def _parse(raw: bytes) -> "tuple[int, bytes]":
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
