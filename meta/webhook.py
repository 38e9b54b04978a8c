"""`metactl webhook`: a validating admission webhook for NetworkAttachmentDefinitions.

The API server POSTs an AdmissionReview (admission.k8s.io/v1) to /validate over TLS; the NAD is checked
with exactly the checks of `metactl validate` (meta/lint.py) and the review is answered with every
problem, each naming the object and field. Only the standard library serves it (http.server + ssl), so
the webhook image needs nothing beyond meta-cni itself.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import lint

log = logging.getLogger("meta-cni.webhook")

API_VERSION = "admission.k8s.io/v1"
NAD_GROUP = "k8s.cni.cncf.io"
NAD_RESOURCE = "network-attachment-definitions"
# An object is at most ~1.5 MiB in etcd and a review carries the new and the old one: anything much larger
# is not from the API server, and reading it whole would only let a client make us buffer it.
MAX_BODY = 8 * 1024 * 1024
# The API server gives up on a webhook after its timeoutSeconds (at most 30): a connection idle longer
# than that is not one it still waits on, so its thread may go.
CONNECTION_TIMEOUT = 35.0


class BadReview(ValueError):
    """The request body is not an AdmissionReview v1 request (answered with 400)."""


def _object_problems(obj: object, namespace: str | None) -> list[str]:
    if not isinstance(obj, dict):
        return ["(top level): the object must be a NetworkAttachmentDefinition map"]
    obj = copy.deepcopy(obj)
    meta = obj.get("metadata")
    # On CREATE the object may carry no namespace yet (it comes from the URL): name it as it will be stored.
    if isinstance(meta, dict) and not meta.get("namespace") and namespace:
        meta["namespace"] = namespace
    return lint.nad_problems(obj)[1]


def _ref(obj: object, request: dict[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    ns = meta.get("namespace") or request.get("namespace") or "default"
    name = meta.get("name") or request.get("name") or "?"
    return f"NetworkAttachmentDefinition {ns}/{name}"


def _is_nad(request: dict[str, Any]) -> bool:
    resource = request.get("resource")
    if isinstance(resource, dict):
        return resource.get("group") == NAD_GROUP and resource.get("resource") == NAD_RESOURCE
    kind = request.get("kind")
    return isinstance(kind, dict) and kind.get("group") == NAD_GROUP and kind.get("kind") == "NetworkAttachmentDefinition"


def decide(request: dict[str, Any]) -> dict[str, Any]:
    """The AdmissionResponse (without uid) for one AdmissionRequest."""
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE") or not _is_nad(request) or request.get("subResource"):
        # DELETE must always go through (a broken NAD must be removable); other kinds or subresources reach
        # us only through a misconfigured rule, and blocking them would not make any NAD safer.
        return {"allowed": True}
    obj = request.get("object")
    problems = _object_problems(obj, request.get("namespace"))
    if not problems:
        return {"allowed": True}
    ref = _ref(obj, request)
    if operation == "UPDATE":
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        deleting = isinstance(meta, dict) and bool(meta.get("deletionTimestamp"))
        old = _object_problems(request.get("oldObject"), request.get("namespace"))
        if deleting or set(problems) <= set(old):
            # A NAD stored before the webhook was installed may already be invalid: edits that add no new
            # problem (labels, finalizers, a partial fix) must still be possible, or it could never be fixed
            # step by step nor finish deleting. The problems are still shown to the client.
            return {"allowed": True, "warnings": [f"{ref}: {p}" for p in problems]}
    return {
        "allowed": False,
        "status": {
            "status": "Failure",
            "code": int(HTTPStatus.UNPROCESSABLE_ENTITY),
            "reason": "Invalid",
            "message": f"{ref}: " + "; ".join(problems),
        },
    }


def review(body: bytes) -> dict[str, Any]:
    """Answer an AdmissionReview request body; BadReview when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadReview(f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadReview("body is not a JSON object")
    if data.get("apiVersion") != API_VERSION or data.get("kind") != "AdmissionReview":
        raise BadReview(f"expected apiVersion {API_VERSION} kind AdmissionReview, got "
                        f"{data.get('apiVersion')!r} {data.get('kind')!r}")
    request = data.get("request")
    if not isinstance(request, dict):
        raise BadReview("request: missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid: missing or not a string")
    if not isinstance(request.get("operation"), str):
        raise BadReview("request.operation: missing or not a string")
    response = decide(request)
    log.info("%s %s %s/%s: %s", uid, request["operation"], request.get("namespace") or "-", request.get("name") or "-",
             "allowed" if response["allowed"] else response["status"]["message"])
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, **response}}


class CertReloader:
    """A server TLS context that follows the certificate files: cert-manager (or an operator) replaces the
    mounted Secret's files in place, and the new pair must be served without a restart."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] = ()
        self._context = self._load()

    def _files_stamp(self) -> tuple[int, ...]:
        out: list[int] = []
        for p in (self.cert, self.key):
            st = p.stat()
            out += [st.st_ino, st.st_mtime_ns, st.st_size]
        return tuple(out)

    def _load(self) -> ssl.SSLContext:
        stamp = self._files_stamp()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        self._stamp = stamp
        return ctx

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                if self._files_stamp() != self._stamp:
                    self._context = self._load()
                    log.info("reloaded TLS certificate %s", self.cert)
            except (OSError, ssl.SSLError) as e:
                # Mid-rotation the pair can be briefly missing or mismatched: keep serving the last good one.
                log.warning("keeping the previous TLS certificate: %s", e)
            return self._context


class Handler(BaseHTTPRequestHandler):
    server_version = "meta-cni-webhook"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, code: int, message: str) -> None:
        self._send(code, (message + "\n").encode(), "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] in ("/healthz", "/readyz"):
            self._text(200, "ok")
        else:
            self._text(404, "not found")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/validate":
            self._text(404, "not found")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._text(411, "Content-Length required")
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._text(413, f"body larger than {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        try:
            answer = review(body)
        except BadReview as e:
            log.warning("malformed AdmissionReview from %s: %s", self.address_string(), e)
            self._text(400, f"malformed AdmissionReview: {e}")
            return
        except Exception as e:  # noqa: BLE001
            # A bug must not cost the connection (the API server would only report "failed calling webhook"):
            # answer, log the traceback, and let failurePolicy decide.
            log.exception("reviewing a request from %s failed", self.address_string())
            self._text(500, f"internal error: {type(e).__name__}: {e}")
            return
        self._send(200, json.dumps(answer).encode())


class WebhookServer(ThreadingHTTPServer):
    """HTTPS: each accepted connection is wrapped with the current certificate; the handshake happens in the
    connection's own thread, so a slow or stuck client cannot hold up accepting others."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], certs: CertReloader) -> None:
        self.certs = certs
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(CONNECTION_TIMEOUT)
        return self.certs.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshake failures (scanners, clients that distrust our CA) are routine, not tracebacks.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.info("connection from %s: %s", client_address, exc)
        else:
            super().handle_error(request, client_address)


def serve(cert: Path, key: Path, address: str = "0.0.0.0", port: int = 8443) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    server = WebhookServer((address, port), CertReloader(cert, key))
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever() to return, so it cannot run in the thread that serves.
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, bound = str(server.server_address[0]), server.server_address[1]
    # With --port 0 this line is how a caller learns the port (the tests read it).
    log.info("serving AdmissionReview %s on https://%s:%s/validate", API_VERSION,
             f"[{host}]" if ":" in host else host, bound)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(cert: str, key: str, address: str, port: int) -> int:
    level = os.environ.get("META_CNI_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level if level in ("ERROR", "WARNING", "INFO", "DEBUG") else "INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(Path(cert), Path(key), address, port)
    except (OSError, ssl.SSLError) as e:
        print(f"metactl webhook: {e}", file=sys.stderr)
        return 1
