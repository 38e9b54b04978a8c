"""The webhook's HTTPS server: TLS with a CA-signed certificate, routes, status codes, certificate reload,
and `metactl webhook` as a process (started, answering, stopped by SIGTERM)."""
from __future__ import annotations

import http.client
import json
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meta import webhook

CERTS_SCRIPT = Path(__file__).resolve().parents[2] / "samples" / "deploy" / "webhook-certs.sh"
METACTL = Path(sys.prefix) / "bin" / "metactl"

REVIEW = {
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "u-1", "operation": "CREATE", "namespace": "ns1", "name": "x",
        "kind": {"group": "k8s.cni.cncf.io", "version": "v1", "kind": "NetworkAttachmentDefinition"},
        "resource": {"group": "k8s.cni.cncf.io", "version": "v1", "resource": "network-attachment-definitions"},
        "object": {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                   "metadata": {"name": "x", "namespace": "ns1"},
                   "spec": {"config": '{"cniVersion": "1.0.0", "type": "bridge", "mtu": "big"}'}},
    },
}


def make_certs(out: Path, *sans: str) -> Path:
    assert shutil.which("openssl"), "openssl not installed"
    subprocess.run(["sh", str(CERTS_SCRIPT), str(out), *sans], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), "IP:127.0.0.1", "DNS:localhost")


@pytest.fixture
def server(certs: Path) -> Iterator[webhook.WebhookServer]:
    srv = webhook.WebhookServer(("127.0.0.1", 0), webhook.CertReloader(certs / "tls.crt", certs / "tls.key"))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join()


Connect = Callable[..., http.client.HTTPSConnection]


@pytest.fixture
def connect(server: webhook.WebhookServer, certs: Path) -> Connect:
    def make(ca: Path = certs / "ca.crt") -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(ca))
        return http.client.HTTPSConnection("127.0.0.1", server.server_address[1], context=ctx, timeout=30)
    return make


def post(conn: http.client.HTTPSConnection, body: bytes, path: str = "/validate") -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def test_review_over_tls(connect: Connect) -> None:
    conn = connect()
    status, body = post(conn, json.dumps(REVIEW).encode())
    assert status == 200
    resp = json.loads(body)["response"]
    assert resp["uid"] == "u-1" and resp["allowed"] is False
    assert "NetworkAttachmentDefinition ns1/x: bridge: mtu:" in resp["status"]["message"]
    # The API server keeps connections open between reviews.
    status, _ = post(conn, json.dumps(REVIEW).encode())
    assert status == 200
    conn.close()


def test_malformed_review_is_400(connect: Connect) -> None:
    conn = connect()
    status, body = post(conn, b'{"apiVersion": "admission.k8s.io/v1beta1"}')
    assert status == 400
    assert b"malformed AdmissionReview" in body
    conn.close()


def test_a_bug_is_answered_500_and_the_server_goes_on(connect: Connect, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(request: dict[str, object]) -> dict[str, object]:
        raise KeyError("surprise")

    monkeypatch.setattr(webhook, "decide", broken)
    conn = connect()
    status, body = post(conn, json.dumps(REVIEW).encode())
    assert status == 500 and b"KeyError" in body
    monkeypatch.undo()
    status, _ = post(conn, json.dumps(REVIEW).encode())
    assert status == 200
    conn.close()


def test_healthz_and_unknown_paths(connect: Connect) -> None:
    conn = connect()
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"ok\n")
    conn.request("GET", "/validate")
    r = conn.getresponse()
    r.read()
    assert r.status == 404
    status, _ = post(conn, b"{}", path="/mutate")
    assert status == 404
    conn.close()


def test_oversized_body_is_refused_unread(connect: Connect) -> None:
    conn = connect()
    conn.putrequest("POST", "/validate")
    conn.putheader("Content-Length", str(webhook.MAX_BODY + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    conn.close()


def test_client_that_distrusts_the_ca_cannot_connect(connect: Connect, tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other", "IP:127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(other / "ca.crt").request("GET", "/healthz")


def test_rotated_certificate_is_served_without_restart(tmp_path: Path) -> None:
    first = make_certs(tmp_path / "first", "IP:127.0.0.1")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("tls.crt", "tls.key"):
        shutil.copy(first / name, live / name)
    srv = webhook.WebhookServer(("127.0.0.1", 0), webhook.CertReloader(live / "tls.crt", live / "tls.key"))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        def healthz(ca: Path) -> int:
            ctx = ssl.create_default_context(cafile=str(ca))
            conn = http.client.HTTPSConnection("127.0.0.1", srv.server_address[1], context=ctx, timeout=30)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            return status

        assert healthz(first / "ca.crt") == 200
        second = make_certs(tmp_path / "second", "IP:127.0.0.1")
        # As the kubelet updates a Secret volume: new files replace the old ones.
        for name in ("tls.crt", "tls.key"):
            shutil.copy(second / name, live / f".{name}.new")
            (live / f".{name}.new").replace(live / name)
        assert healthz(second / "ca.crt") == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            healthz(first / "ca.crt")
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def test_broken_rotation_keeps_the_last_good_certificate(tmp_path: Path) -> None:
    good = make_certs(tmp_path / "good", "IP:127.0.0.1")
    live = tmp_path / "live"
    shutil.copytree(good, live)
    reloader = webhook.CertReloader(live / "tls.crt", live / "tls.key")
    ctx = reloader.context()
    (live / "tls.key").write_text("not a key\n")
    assert reloader.context() is ctx
    (live / "tls.crt").unlink()
    assert reloader.context() is ctx


def test_metactl_webhook_process(certs: Path) -> None:
    p = subprocess.Popen([str(METACTL), "webhook", "--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key"),
                          "--address", "127.0.0.1", "--port", "0"],
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        assert "serving AdmissionReview admission.k8s.io/v1 on https://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        status, body = post(conn, json.dumps(REVIEW).encode())
        conn.close()
        assert status == 200 and json.loads(body)["response"]["allowed"] is False
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_metactl_webhook_reports_a_missing_certificate(tmp_path: Path) -> None:
    p = subprocess.run([str(METACTL), "webhook", "--cert", str(tmp_path / "none.crt"), "--key", str(tmp_path / "none.key"),
                        "--port", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "none.crt" in p.stderr
