"""The daemon in-process: listeners, readiness, graceful shutdown; its logs and wire protocol."""
from __future__ import annotations

import io
import json
import logging
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta.cni.errors import CNIError
from meta.daemon import app, dispatch, logs, protocol
from tests.daemon.conftest import metric
from tests.unit.test_daemon_dispatch import FakeCore


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    fake = FakeCore()
    monkeypatch.setattr(dispatch, "execute", fake)
    monkeypatch.setattr(app, "warm_up", lambda: None)
    return fake


@pytest.fixture
def daemon(tmp_path: Path, core: FakeCore) -> Iterator[app.Daemon]:
    opts = app.Options(socket=tmp_path / "run" / "d.sock", metrics_address="127.0.0.1:0",
                       cni_dirs=(str(tmp_path / "cni"),), in_cluster=False)
    d = app.Daemon(opts)
    d.start()
    assert d.dispatcher.replayed.wait(60)
    yield d
    if not d.stopping.is_set():
        d.stop()


def post(sock: Path, command: str, **env: str) -> tuple[int, str]:
    body = protocol.encode_request({"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", **env},
                                   json.dumps({"cniVersion": "1.0.0", "name": "meta"}).encode())
    status, raw = protocol.exchange(str(sock), "POST", protocol.CNI, body)
    assert status == 200
    return protocol.decode_answer(raw)


def test_socket_and_endpoints(daemon: app.Daemon, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "d.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert protocol.exchange(str(sock), "GET", protocol.HEALTHZ)[0] == 200
    assert protocol.exchange(str(sock), "GET", protocol.READYZ) == (200, b'{"ready": true, "reasons": []}\n')
    assert post(sock, "DEL") == (0, "")
    assert metric(daemon.metrics.render().decode(), "meta_cni_requests_total", command="DEL", result="ok") == 1
    assert daemon.tcp is not None and daemon.tcp.address.startswith("127.0.0.1:")


def test_second_daemon_on_a_live_socket_refuses(daemon: app.Daemon, tmp_path: Path) -> None:
    other = app.Daemon(app.Options(socket=tmp_path / "run" / "d.sock", metrics_address=None, in_cluster=False))
    with pytest.raises(RuntimeError, match="another meta-cni daemon serves"):
        other.start()
    other.stop()
    assert protocol.exchange(str(tmp_path / "run" / "d.sock"), "GET", protocol.HEALTHZ)[0] == 200


def test_graceful_stop_finishes_in_flight_requests(daemon: app.Daemon, core: FakeCore, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "d.sock"
    release = core.block("DEL")
    answers: list[tuple[int, str]] = []
    t = threading.Thread(target=lambda: answers.append(post(sock, "DEL")))
    t.start()
    assert core.entered["DEL"].wait(60)
    stopper = threading.Thread(target=daemon.stop)
    stopper.start()
    while not daemon.stopping.is_set():
        stopper.join(0.01)
    assert "shutting down" in daemon.not_ready()
    assert answers == [] and stopper.is_alive(), "stop waits for the request in flight"
    release.set()
    stopper.join()
    t.join()
    assert answers == [(0, "")]
    assert not sock.exists(), "our socket is removed"
    with pytest.raises(protocol.ExchangeError):
        protocol.exchange(str(sock), "GET", protocol.HEALTHZ)


def test_not_ready_until_replayed(tmp_path: Path, core: FakeCore) -> None:
    d = app.Daemon(app.Options(socket=tmp_path / "d.sock", metrics_address=None, in_cluster=False))
    assert d.not_ready() == ["DELs spooled while the daemon was down are not replayed yet"]
    assert metric(d.metrics.render().decode(), "meta_cni_ready") == 0


def test_stale_socket_replaced(tmp_path: Path, core: FakeCore) -> None:
    import socket

    path = tmp_path / "d.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    d = app.Daemon(app.Options(socket=path, metrics_address=None, in_cluster=False))
    d.start()
    try:
        assert protocol.exchange(str(path), "GET", protocol.HEALTHZ)[0] == 200
    finally:
        d.stop()


# --- logs ----------------------------------------------------------------------------------------------

def test_json_logs_with_request_context(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    logs.setup("info", out)
    log = logging.getLogger("meta-cni.test")
    with logs.request(command="ADD", containerID="c1", pod=None):
        log.info("hello %s", "world", extra={"fields": {"duration_ms": 1.5, "result": "ok"}})
        sys.stderr.write("a delegate's own line\npartial")
        sys.stderr.write(" line\n")
    log.debug("not shown")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["level"], e["msg"]) for e in lines] == [
        ("info", "hello world"), ("warning", "a delegate's own line"), ("warning", "partial line"), ("error", "failed")]
    first = lines[0]
    assert first["command"] == "ADD" and first["containerID"] == "c1" and "pod" not in first
    assert first["duration_ms"] == 1.5 and first["result"] == "ok" and first["time"].endswith("Z")
    assert lines[1]["containerID"] == "c1" and lines[1]["logger"] == "meta-cni.stderr"
    assert "command" not in lines[3] and "ValueError: boom" in lines[3]["error"]


# --- protocol ------------------------------------------------------------------------------------------

def test_request_round_trip_keeps_exact_bytes() -> None:
    stdin = b'\xff\x00{"not": "utf-8"}\0\0'
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=1;B=\udcff", "HOME": "/root", "CNI_EMPTY": ""}
    got_env, got = protocol.decode_request(protocol.encode_request(env, stdin))
    assert got == stdin, "the stdin bytes after the environment are kept exactly, NUL bytes included"
    assert got_env == {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=1;B=\udcff", "CNI_EMPTY": ""}, \
        "only CNI_* variables, and any byte of a value (undecodable ones as os.fsdecode keeps them)"


def test_a_request_that_cannot_be_framed_is_refused() -> None:
    with pytest.raises(ValueError, match="CNI_A=B"):
        protocol.encode_request({"CNI_A=B": "x"}, b"")
    with pytest.raises(ValueError):
        protocol.encode_request({"CNI_A": "x\0y"}, b"")


@pytest.mark.parametrize("body", [b"", b"CNI_COMMAND=ADD", b"CNI_COMMAND=ADD\0", b"NOEQUALS\0\0{}", b"=x\0\0{}"])
def test_bad_requests(body: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.decode_request(body)


@pytest.mark.parametrize("body", [b"", b"0", b"x\nout", b"-1\nout", b"1000\nout", b'{"exitCode": 0, "stdout": ""}'])
def test_bad_answers(body: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.decode_answer(body)


@pytest.mark.parametrize("raw,expected", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", (200, b"ok")),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\nbody", (503, b"body")),
])
def test_answer_parsing(raw: bytes, expected: tuple[int, bytes]) -> None:
    assert protocol._parse(raw) == expected


@pytest.mark.parametrize("raw,words", [(b"", "without one"), (b"HTTP/1.0 200", "before a complete"),
                                       (b"SSH-2.0\r\n\r\n", "not an HTTP answer"),
                                       (b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nshort", "in the middle")])
def test_broken_answers(raw: bytes, words: str) -> None:
    with pytest.raises(protocol.ExchangeError, match=words):
        protocol._parse(raw)


def test_cni_error_survives_the_trip() -> None:
    out = CNIError(7, "bad", "details").to_json("1.0.0")
    assert protocol.decode_answer(protocol.encode_answer(1, out)) == (1, out)
