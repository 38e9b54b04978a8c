"""`metactl install`: the shim and its library (run by the system python3, no venv), the config, the kubeconfig."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from meta import cli
from meta.daemon import install, protocol
from tests.unit.test_shim import FakeDaemon, echo_answer

SYSTEM_PYTHON = "/usr/bin/python3"


def conflist(tmp_path: Path, **meta: Any) -> Path:
    plugin = {"type": "meta-cni", "clusterNetwork": "primary", "cniDir": str(tmp_path / "cni"),
              "daemonSocket": str(tmp_path / "d.sock"), **meta}
    path = tmp_path / "00-meta.conflist"
    path.write_text(json.dumps({"cniVersion": "1.0.0", "name": "meta", "plugins": [plugin]}))
    return path


def run_shim(shim: Path, env: dict[str, str], stdin: bytes, *python_options: str) -> subprocess.CompletedProcess[bytes]:
    """Run the installed shim as a runtime does: exec'd by its path (the shebang picks the system python3 -IS:
    only the standard library and the shim's zip), or under `python_options` for a look inside."""
    argv = [SYSTEM_PYTHON, "-IS", *python_options, str(shim)] if python_options else [str(shim)]
    return subprocess.run(argv, input=stdin, capture_output=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, Path]:
    conf = conflist(tmp_path)
    written = install.install(tmp_path / "bin", tmp_path / "net.d", conf)
    assert written == [tmp_path / "bin" / "meta-cni", tmp_path / "bin" / install.LIBRARY, tmp_path / "net.d" / conf.name]
    return written[0], conf


def test_shim_layout(installed: tuple[Path, Path]) -> None:
    shim, conf = installed
    assert stat.S_IMODE(shim.stat().st_mode) == 0o755
    assert shim.read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")
    library = shim.parent / install.LIBRARY
    assert stat.S_IMODE(library.stat().st_mode) == 0o644
    with zipfile.ZipFile(library) as zf:
        names = sorted(zf.namelist())
        assert names == sorted([f"meta/{m}" for m in install.SHIM_MODULES] +
                               [f"meta/{m[:-3]}.pyc" for m in install.SHIM_MODULES])
        pyc = zf.read("meta/shim.pyc")
    assert pyc[:4] == importlib.util.MAGIC_NUMBER and pyc[4:8] == (1).to_bytes(4, "little"), \
        "bytecode of this interpreter, unchecked-hash (zipimport never compares it with a timestamp)"
    installed_conf = shim.parent.parent / "net.d" / conf.name
    assert installed_conf.read_bytes() == conf.read_bytes() and stat.S_IMODE(installed_conf.stat().st_mode) == 0o600


def test_every_shim_module_imports_on_the_bare_standard_library(installed: tuple[Path, Path]) -> None:
    shim, _ = installed
    modules = [f"meta.{m[:-3].replace('/', '.')}".removesuffix(".__init__") for m in install.SHIM_MODULES]
    code = f"import sys; sys.path.insert(0, {str(shim.parent / install.LIBRARY)!r}); import " + ", ".join(modules)
    p = subprocess.run([SYSTEM_PYTHON, "-IS", "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_shim_answers_and_forwards(installed: tuple[Path, Path], tmp_path: Path) -> None:
    shim, conf = installed
    config = json.loads(conf.read_text())["plugins"][0] | {"cniVersion": "1.0.0", "name": "meta"}
    about = run_shim(shim, {}, b"")
    assert about.returncode == 0 and b"CNI protocol versions supported" in about.stderr
    v = run_shim(shim, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert v.returncode == 0 and json.loads(v.stdout)["cniVersion"] == "0.4.0"
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/b"}
    with FakeDaemon(tmp_path / "d.sock", echo_answer(0, '{"cniVersion": "1.0.0"}')) as fake:
        r = run_shim(shim, env, json.dumps(config).encode())
    assert r.returncode == 0 and r.stdout == b'{"cniVersion": "1.0.0"}'
    assert fake.received[0][1] == env
    down = run_shim(shim, env, json.dumps(config).encode())
    assert down.returncode == 1 and json.loads(down.stdout)["code"] == 11
    spooled = run_shim(shim, env | {"CNI_COMMAND": "DEL"}, json.dumps(config).encode())
    assert spooled.returncode == 0 and len(list((tmp_path / "cni" / "pending-del").iterdir())) == 1
    thin = run_shim(shim, env, json.dumps({k: v for k, v in config.items() if k != "daemonSocket"}).encode())
    err = json.loads(thin.stdout)
    assert thin.returncode == 1 and "needs daemonSocket" in err["msg"]


def imported(run: subprocess.CompletedProcess[bytes]) -> set[str]:
    """The modules a run imported, from its -X importtime report."""
    return {line.split("|")[-1].strip() for line in run.stderr.decode().splitlines() if line.startswith("import time:")}


def test_an_ordinary_call_imports_neither_json_nor_socket(installed: tuple[Path, Path], tmp_path: Path) -> None:
    # What keeps the shim at a bare interpreter start plus ~1 ms: the common path must not pay for json (and
    # re), the socket module (enum, selectors) or os. The fallback path may.
    shim, conf = installed
    config = json.loads(conf.read_text())["plugins"][0] | {"cniVersion": "1.0.0", "name": "meta"}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}
    heavy = {"json", "re", "socket", "os", "enum", "typing", "base64"}
    with FakeDaemon(tmp_path / "d.sock", echo_answer(0, "{}")):
        fast = run_shim(shim, env, json.dumps(config).encode(), "-X", "importtime")
    assert fast.returncode == 0 and fast.stdout == b"{}"
    assert {"meta.shim", "meta.daemon.protocol"} <= imported(fast) and not heavy & imported(fast)
    down = run_shim(shim, env, json.dumps(config).encode(), "-X", "importtime")
    assert json.loads(down.stdout)["code"] == 11 and "json" in imported(down)


def test_bytecode_of_another_python_is_ignored(installed: tuple[Path, Path], tmp_path: Path) -> None:
    # A DaemonSet image whose python differs from the node's: zipimport must fall back to the sources.
    shim, conf = installed
    library = shim.parent / install.LIBRARY
    with zipfile.ZipFile(library) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(library, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, b"\0\0\r\n" + data[4:] if name.endswith(".pyc") else data)
    config = json.loads(conf.read_text())["plugins"][0] | {"cniVersion": "1.0.0", "name": "meta"}
    env = {"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}
    with FakeDaemon(tmp_path / "d.sock", echo_answer(0, "")) as fake:
        r = run_shim(shim, env, json.dumps(config).encode())
    assert r.returncode == 0 and fake.received[0][1] == env


def test_python_option(tmp_path: Path) -> None:
    conf = conflist(tmp_path)
    install.install(tmp_path / "bin", tmp_path / "net.d", conf, python="/usr/local/bin/python3.11")
    assert (tmp_path / "bin" / "meta-cni").read_bytes().startswith(b"#!/usr/local/bin/python3.11 -IS\n")
    for bad in ("python3", "/usr/bin/env python3"):
        with pytest.raises(install.InstallError, match="--python"):
            install.install(tmp_path / "bin2", tmp_path / "net.d", conf, python=bad)
    assert not (tmp_path / "bin2").exists()


def test_reinstall_replaces_atomically(installed: tuple[Path, Path], tmp_path: Path) -> None:
    shim, conf = installed
    before = shim.stat().st_ino, shim.read_bytes()
    install.install(tmp_path / "bin", tmp_path / "net.d", conf)
    assert shim.stat().st_ino != before[0], "a new file renamed over the old one (never 'text file busy')"
    assert shim.read_bytes() == before[1]
    library = shim.parent / install.LIBRARY
    assert library.read_bytes() == install.shim_library(), "the archive is reproducible"
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["meta-cni", install.LIBRARY]


@pytest.mark.parametrize("content,words", [
    ("{", "not JSON"),
    (json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}), "no plugin of type meta-cni"),
    (json.dumps({"cniVersion": "1.0.0", "name": "x", "type": "meta-cni", "clusterNetwork": "p"}), "needs daemonSocket"),
])
def test_config_is_checked_before_anything_is_written(tmp_path: Path, content: str, words: str) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(content)
    with pytest.raises(install.InstallError) as e:
        install.install(tmp_path / "bin", tmp_path / "net.d", conf)
    assert words in str(e.value)
    assert not (tmp_path / "bin").exists() and not (tmp_path / "net.d").exists()


def test_single_plugin_conf(tmp_path: Path) -> None:
    conf = tmp_path / "10-meta.conf"
    conf.write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "type": "meta-cni", "daemonSocket": "/run/d.sock"}))
    install.install(tmp_path / "bin", tmp_path / "net.d", conf)
    assert (tmp_path / "net.d" / "10-meta.conf").is_file()


@pytest.mark.parametrize("host,server", [("10.96.0.1", "https://10.96.0.1:443"), ("fd00::1", "https://[fd00::1]:443")])
def test_kubeconfig_from_serviceaccount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, server: str) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("secret-token\n")
    (sa / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    conf = conflist(tmp_path)
    rc = cli.main(["install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d"), "--config",
                   str(conf), "--kubeconfig-from-serviceaccount", "--serviceaccount-dir", str(sa)])
    assert rc == 0
    path = tmp_path / "net.d" / "meta-cni.d" / "meta-cni.kubeconfig"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["clusters"][0]["cluster"]["server"] == server
    assert doc["users"][0]["user"] == {"token": "secret-token"}

    from kubernetes.client import Configuration
    from kubernetes.config import load_kube_config

    loaded = Configuration()
    load_kube_config(config_file=str(path), client_configuration=loaded, persist_config=False)
    assert loaded.host == server and "Bearer secret-token" in loaded.api_key.values()


def test_kubeconfig_needs_a_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc = cli.main(["install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d"), "--config",
                   str(conflist(tmp_path)), "--kubeconfig-from-serviceaccount"])
    assert rc == 1 and "not in a pod" in capsys.readouterr().err
    assert not (tmp_path / "net.d").exists(), "the config is written last"


def test_protocol_constants_are_in_the_library() -> None:
    assert "daemon/protocol.py" in install.SHIM_MODULES and protocol.CNI == "/v2/cni"
    assert os.path.isfile(install.PACKAGE_ROOT / "daemon" / "spool.py")
