"""The thick-mode shim (meta/shim.py via meta/main.py) against a stand-in daemon on a unix socket."""
from __future__ import annotations

import io
import json
import posix
import socketserver
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from meta import shim
from meta.daemon import protocol, spool
from tests.unit.test_main_entry import _Stdin, run_main


class FakeDaemon:
    """Answers POST /v1/cni with `answer(env, stdin) -> (status, body)` and records what it got."""

    def __init__(self, path: Path, answer: Callable[[dict[str, str], bytes], tuple[int, bytes]]) -> None:
        self.path = path
        self.answer = answer
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                env, stdin = protocol.decode_request(body)
                fake.received.append((self.path, env, stdin))
                status, out = fake.answer(env, stdin)
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeDaemon":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo_answer(rc: int, stdout: str) -> Callable[[dict[str, str], bytes], tuple[int, bytes]]:
    return lambda env, stdin: (200, protocol.encode_answer(rc, stdout))




@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "d.sock"


def config(tmp_path: Path, sock: Path, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "clusterNetwork": "primary",
            "cniDir": str(tmp_path / "cni"), "daemonSocket": str(sock), **extra}


def env_for(command: str, **extra: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
            "CNI_ARGS": "K8S_POD_NAME=p;K8S_POD_NAMESPACE=default", "CNI_PATH": "/opt/cni/bin", **extra}


@pytest.mark.parametrize("rc,stdout", [(0, '{\n    "cniVersion": "1.0.0"\n}'), (1, '{"code": 7, "msg": "x"}'), (0, ""),
                                       (3, "anything at all\n")])
def test_answer_printed_unchanged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path, rc: int, stdout: str) -> None:
    stdin = json.dumps(config(tmp_path, sock)).encode() + b"  \n"
    with FakeDaemon(sock, echo_answer(rc, stdout)) as fake:
        got = run_main(monkeypatch, env_for("ADD", OTHER_VAR="no", CNI_EXTRA="yes"), stdin)
    assert got[:2] == (rc, stdout)
    ((path, env, body),) = fake.received
    assert path == protocol.CNI and body == stdin, "the exact stdin bytes reach the daemon"
    assert env == env_for("ADD", CNI_EXTRA="yes"), "every CNI_* variable and nothing else"


def test_version_answered_locally(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path) -> None:
    rc, out, _ = run_main(monkeypatch, {"CNI_COMMAND": "VERSION"}, json.dumps(config(tmp_path, sock)).encode())
    assert rc == 0 and json.loads(out)["cniVersion"] == "1.0.0"


@pytest.mark.parametrize("command,code,words", [
    ("ADD", 11, "secondary networks included, can be attached"), ("CHECK", 11, "cannot be checked"),
    ("GC", 11, "GC cannot run"), ("STATUS", 50, "cannot serve CNI requests"), ("BOGUS", 11, "try again later"),
])
def test_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path, command: str, code: int, words: str) -> None:
    rc, out, _ = run_main(monkeypatch, env_for(command), json.dumps(config(tmp_path, sock)).encode())
    err = json.loads(out)
    assert rc == 1 and err["code"] == code and err["cniVersion"] == "1.0.0"
    assert err["msg"].startswith(f"meta-cni daemon unreachable at {sock} (No such file or directory)")
    assert words in err["msg"]
    assert not (tmp_path / "cni").exists(), "nothing is written for these commands"


def test_refused_and_foreign_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()
    err = json.loads(run_main(monkeypatch, env_for("ADD"), json.dumps(config(tmp_path, sock)).encode())[1])
    assert err["code"] == 11 and "Connection refused" in err["msg"]
    sock.unlink()
    with FakeDaemon(sock, lambda env, stdin: (404, b"not found")):
        err = json.loads(run_main(monkeypatch, env_for("ADD"), json.dumps(config(tmp_path, sock)).encode())[1])
    assert err["code"] == 11 and "unusable answer (HTTP 404)" in err["msg"]


def test_del_spooled_when_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path) -> None:
    cfg = config(tmp_path, sock)
    stdin = json.dumps(cfg).encode()
    rc, out, err = run_main(monkeypatch, env_for("DEL"), stdin)
    assert (rc, out) == (0, "")
    assert "DEL spooled" in err
    (path,) = spool.pending(cfg["cniDir"])
    assert path == spool.path_for(cfg["cniDir"], "meta", "c1", "eth0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert spool.trusted(path)
    assert spool.read(path) == (env_for("DEL"), stdin)
    # The same DEL again replaces its own file.
    run_main(monkeypatch, env_for("DEL"), stdin)
    assert spool.pending(cfg["cniDir"]) == [path]


def test_del_spooled_when_the_daemon_dies_mid_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path) -> None:
    cfg = config(tmp_path, sock)

    def die(env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
        raise ConnectionResetError  # the handler drops the connection without an answer

    with FakeDaemon(sock, die):
        rc, out, _ = run_main(monkeypatch, env_for("DEL"), json.dumps(cfg).encode())
    assert (rc, out) == (0, "")
    assert len(spool.pending(cfg["cniDir"])) == 1


def test_del_fails_when_it_cannot_be_spooled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = config(tmp_path, sock, cniDir=str(tmp_path / "file" / "cni"))
    rc, out, _ = run_main(monkeypatch, env_for("DEL"), json.dumps(cfg).encode())
    err = json.loads(out)
    assert rc == 1 and err["code"] == 11 and "could not be spooled" in err["msg"] and str(sock) in err["msg"]


def test_invalid_socket_value_is_left_to_thin_validation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = config(tmp_path, Path("relative.sock"))
    rc, out, _ = run_main(monkeypatch, env_for("ADD", CNI_NETNS="/proc/self/ns/net"), json.dumps(cfg).encode())
    err = json.loads(out)
    assert rc == 1 and err["code"] == 7 and "daemonSocket" in err["msg"]


@pytest.mark.parametrize("value", ["/with\0nul", "/" + "x" * 200])
def test_unusable_socket_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    cfg = config(tmp_path, Path("/"), daemonSocket=value)
    rc, out, _ = run_main(monkeypatch, env_for("ADD"), json.dumps(cfg).encode())
    assert rc == 1 and json.loads(out)["code"] == 11


def test_forward_keeps_only_cni_variables() -> None:
    assert protocol.forwarded_env({"CNI_A": "1", "PATH": "/bin", "CNIX": "no"}) == {"CNI_A": "1"}


@pytest.fixture(autouse=True)
def _no_real_spool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # A test config always names a cniDir under tmp_path; never spool into the host's default.
    monkeypatch.setattr(spool, "DEFAULT_CNI_DIR", str(tmp_path / "default-cni"))
    yield


def test_shim_module_standalone_call(tmp_path: Path, sock: Path) -> None:
    with FakeDaemon(sock, echo_answer(0, "out")):
        assert shim.call(str(sock), {"CNI_COMMAND": "DEL"}, b"{}") == (0, "out")
    with pytest.raises(shim.Unreachable):
        shim.call(str(sock), {"CNI_COMMAND": "DEL"}, b"{}")


@pytest.mark.parametrize("stdin,expected", [
    (b'{"type": "meta-cni", "daemonSocket": "/run/meta-cni/daemon.sock"}', "/run/meta-cni/daemon.sock"),
    (b'{"daemonSocket"\n\t:  "/d.sock" ,"name": "x"}', "/d.sock"),
    (b'{"daemonSocket": "/caf\xc3\xa9.sock"}', "/caf\u00e9.sock"),
    # Anything it cannot read with certainty goes to the real parser (meta/main.py):
    (b'{"name": "x"}', None),
    (b'{"daemonSocket": "/a.sock", "args": {"daemonSocket": "/b.sock"}}', None),
    (b'{"daemonSocket": "relative.sock"}', None),
    (b'{"daemonSocket": "/with\\"quote.sock"}', None),
    (b'{"daemonSocket": "/esc\\u0061ped"}', None),
    (b'{"daemonSocket": null}', None),
    (b'{"daemonSocket": "/unterminated', None),
    (b'{"note": "daemonSocket", "x": 1}', None),
    (b'{"daemonSocket": "/bad\xff.sock"}', None),
])
def test_config_socket_read_without_parsing(stdin: bytes, expected: str | None) -> None:
    assert shim.config_socket(stdin) == expected


def test_installed_entry_forwards_the_exact_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sock: Path) -> None:
    # installed_main is what the node's shim runs; the same checks as through meta/main.py.
    stdin = json.dumps(config(tmp_path, sock)).encode() + b"\n"
    # The process environment as the kernel gave it (bytes): what installed_main reads, not os.environ.
    environ = {k.encode(): v.encode() for k, v in env_for("ADD", CNI_EXTRA="yes").items()} | {b"NOT_CNI": b"x"}
    monkeypatch.setattr(posix, "environ", environ)
    monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    with FakeDaemon(sock, echo_answer(3, "answer")) as fake:
        assert shim.installed_main() == 3
    assert out.getvalue() == "answer"
    ((path, env, body),) = fake.received
    assert path == protocol.CNI and body == stdin and env == env_for("ADD", CNI_EXTRA="yes")
