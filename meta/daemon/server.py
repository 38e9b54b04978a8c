"""The daemon's HTTP endpoints: CNI requests on the unix socket, health and metrics on both listeners.

The unix socket (0600, root only) is the only way in for CNI requests: whoever can send one can make the
daemon attach interfaces to any namespace. The TCP listener (kubelet probes, Prometheus) serves GET only.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import protocol

log = logging.getLogger("meta-cni.daemon")
ANSWER_TYPE = "application/octet-stream"  # exit code line + stdout bytes (meta/daemon/protocol.py)


class Endpoints:
    """What the handlers call; the Daemon provides them."""

    def __init__(self, cni: Callable[[dict[str, str], bytes], tuple[int, str]],
                 readiness: Callable[[], list[str]], metrics: Callable[[], tuple[bytes, str]]) -> None:
        self.cni = cni
        self.readiness = readiness
        self.metrics = metrics


class _Handler(BaseHTTPRequestHandler):
    server: "_UnixServer | _TCPServer"
    # One exchange per connection (the shim closes after its answer); keeps handler threads short-lived.
    protocol_version = "HTTP/1.0"
    server_version = "meta-cni-daemon"
    # Bounds reading a request and writing its answer (not the CNI work in between): a client that connects
    # and sends nothing must not hold a thread that shutdown then waits for.
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        ep = self.server.endpoints
        path = self.path.split("?", 1)[0]
        if path == protocol.HEALTHZ:
            self._send(200, b'{"status":"ok"}\n')
        elif path == protocol.READYZ:
            reasons = ep.readiness()
            body = json.dumps({"ready": not reasons, "reasons": reasons}).encode() + b"\n"
            self._send(503 if reasons else 200, body)
        elif path == protocol.METRICS:
            body, content_type = ep.metrics()
            self._send(200, body, content_type)
        else:
            self._send(404, b'{"error":"not found"}\n')

    def do_POST(self) -> None:
        if self.path != protocol.CNI or not self.server.serves_cni:
            self._send(404, b'{"error":"not found"}\n')
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= protocol.MAX_BODY:
            self._answer_bad_request(f"Content-Length must be given and at most {protocol.MAX_BODY}")
            return
        body = self.rfile.read(length)
        try:
            env, stdin = protocol.decode_request(body)
        except ValueError as e:
            self._answer_bad_request(str(e))
            return
        rc, out = self.server.endpoints.cni(env, stdin)
        self._send(200, protocol.encode_answer(rc, out), ANSWER_TYPE)

    def _answer_bad_request(self, why: str) -> None:
        from ..cni.errors import DECODE_FAILURE, CNIError

        out = CNIError(DECODE_FAILURE, f"meta-cni daemon cannot read the request: {why}").to_json()
        self._send(400, protocol.encode_answer(1, out), ANSWER_TYPE)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # Shutdown waits for the handler threads: in-flight CNI requests finish before the daemon exits.
    daemon_threads = False
    block_on_close = True
    serves_cni = True
    request_queue_size = 128

    def __init__(self, endpoints: Endpoints) -> None:
        super().__init__("", _Handler, bind_and_activate=False)
        self.endpoints = endpoints

    def get_request(self) -> tuple[socket.socket, str]:
        conn, _ = self.socket.accept()
        return conn, "unix"  # BaseHTTPRequestHandler wants a printable client address


class _TCPServer(ThreadingHTTPServer):
    serves_cni = False
    daemon_threads = True  # probes and scrapes need not be waited for

    def __init__(self, address: tuple[str, int], endpoints: Endpoints) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.endpoints = endpoints


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class _Listener:
    server: socketserver.BaseServer
    thread: threading.Thread | None = None

    def serve(self, name: str) -> threading.Thread:
        t = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)
        t.start()
        self.thread = t
        return t

    def _stop(self) -> None:
        # shutdown() waits for serve_forever to return, which never happens if it never started.
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()


class UnixListener(_Listener):
    """The CNI socket: created beside its final path, chmod 0600, then renamed over it, so there is never a
    window with a socket of the wrong mode, and a stale socket of a dead daemon is replaced atomically."""

    server: _UnixServer

    def __init__(self, path: Path, endpoints: Endpoints) -> None:
        self.path = path
        self.server = _UnixServer(endpoints)
        self.identity: tuple[int, int] | None = None

    def bind(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise RuntimeError(f"another meta-cni daemon serves {self.path}")
            log.info("replacing a stale socket", extra={"fields": {"socket": str(self.path)}})
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        self.server.socket.bind(str(tmp))
        try:
            os.chmod(tmp, 0o600)
            self.server.server_activate()
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Stop accepting, wait for in-flight requests, and remove the socket if it is still ours (a newer
        daemon may have replaced it already)."""
        self._stop()
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass


class TCPListener(_Listener):
    server: _TCPServer

    def __init__(self, address: str, endpoints: Endpoints) -> None:
        host, _, port = address.rpartition(":")
        self.server = _TCPServer((host.strip("[]") or "0.0.0.0", int(port)), endpoints)

    @property
    def address(self) -> str:
        bound = self.server.server_address
        assert isinstance(bound, tuple)
        host, port = str(bound[0]), int(bound[1])
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def close(self) -> None:
        self._stop()
