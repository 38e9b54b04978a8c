"""The `meta-cni` entry point run in-process (meta/main.py): output is always a result or an error structure."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

from meta import main as metamain
from meta import schema
from meta.cni import version as cniversion


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def run_main(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], stdin: bytes) -> tuple[int, str, str]:
    # Every CNI_* variable, not only the six of the spec: the shim forwards whatever starts with CNI_.
    for k in [k for k in os.environ if k.startswith("CNI_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out, err = io.StringIO(), io.StringIO()
    # core.run points the module-global schema memo at its cniDir; restore it so other tests are unaffected.
    monkeypatch.setattr(schema, "memo", schema.memo)
    monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    rc = metamain.main()
    return rc, out.getvalue(), err.getvalue()


def add_env(tmp_path: Path) -> dict[str, str]:
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
            "CNI_ARGS": "", "CNI_PATH": str(tmp_path)}


def test_no_command_prints_about(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, err = run_main(monkeypatch, {}, b"")
    assert rc == 0 and out == ""
    assert "CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in err


@pytest.mark.parametrize("stdin,expected", [
    (b"", cniversion.CURRENT), (b'{"cniVersion": "0.4.0"}', "0.4.0"), (b'{"cniVersion": "0.2.0"}', cniversion.CURRENT),
    (b"garbage", cniversion.CURRENT), (b'{"cniVersion": 5}', cniversion.CURRENT),
])
def test_version(monkeypatch: pytest.MonkeyPatch, stdin: bytes, expected: str) -> None:
    rc, out, _ = run_main(monkeypatch, {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy"}, stdin)
    assert rc == 0
    assert json.loads(out) == {"cniVersion": expected, "supportedVersions": list(cniversion.SUPPORTED)}


def test_unknown_command(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, _ = run_main(monkeypatch, {"CNI_COMMAND": "FOO"}, b"{}")
    assert rc == 1
    assert json.loads(out) == {"code": 4, "msg": "unknown CNI_COMMAND: FOO"}


def test_error_carries_stdin_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # cniDir under tmp: run() keeps a schema memo there, never in the host's /var/lib/cni.
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "cniDir": str(tmp_path / "cni")}).encode()
    rc, out, _ = run_main(monkeypatch, add_env(tmp_path), stdin)
    assert rc == 1
    data = json.loads(out)
    assert data["cniVersion"] == "1.0.0" and data["code"] == 7 and "clusterNetwork" in data["msg"]


def test_unresolvable_cluster_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = {"cniVersion": "1.1.0", "name": "meta", "type": "meta-cni", "clusterNetwork": "nope",
           "confDir": str(tmp_path / "conf"), "manifestsDir": str(tmp_path / "m"), "cniDir": str(tmp_path / "cni")}
    rc, out, _ = run_main(monkeypatch, add_env(tmp_path), json.dumps(cfg).encode())
    assert rc == 1
    data = json.loads(out)
    assert data["code"] == 7 and "'nope'" in data["msg"] and "clusterNetwork" in data["msg"]
    assert not (tmp_path / "cni" / "meta").exists(), "nothing is cached before planning succeeded"


@pytest.mark.parametrize("stdin", [b"[" * 100_000, b'{"a":' * 100_000])
def test_add_deeply_nested_stdin_is_an_error_structure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stdin: bytes) -> None:
    rc, out, _ = run_main(monkeypatch, add_env(tmp_path), stdin)
    assert rc == 1
    data = json.loads(out)
    assert data["code"] == 6


def test_version_deeply_nested_stdin_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, _ = run_main(monkeypatch, {"CNI_COMMAND": "VERSION"}, b"[" * 100_000)
    assert rc == 0
    assert json.loads(out)["supportedVersions"] == list(cniversion.SUPPORTED)
