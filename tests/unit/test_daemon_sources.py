"""The daemon's memoizing source factory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meta.cni.errors import CNIError
from meta.config import MetaConfig
from meta.daemon.sources import DaemonSources
from meta.sources import kube


def cfg(tmp_path: Path, **kw: Any) -> MetaConfig:
    fields: dict[str, Any] = {"manifests_dir": str(tmp_path / "m"), "cni_dir": str(tmp_path / "cni"), **kw}
    return MetaConfig(name="meta", cni_version="1.0.0", cluster_network="primary", **fields)


def write_pod(directory: Path, name: str, networks: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": networks}}}))
    return path


def test_manifests_memoized_until_a_file_changes(tmp_path: Path) -> None:
    ds = DaemonSources(None, None, None, use_in_cluster=False)
    c = cfg(tmp_path)
    first = ds(c)
    assert first.get_pod("default", "p1") is None
    assert ds(c) is first, "nothing changed: the same parsed source"
    write_pod(tmp_path / "m", "p1", "a")
    second = ds(c)
    assert second is not first
    pod = second.get_pod("default", "p1")
    assert pod is not None and pod.annotations["k8s.v1.cni.cncf.io/networks"] == "a"
    assert ds(c) is second
    path = write_pod(tmp_path / "m", "p1", "b")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    pod = ds(c).get_pod("default", "p1")
    assert pod is not None and pod.annotations["k8s.v1.cni.cncf.io/networks"] == "b"
    path.unlink()
    assert ds(c).get_pod("default", "p1") is None
    other = cfg(tmp_path, manifests_dir=str(tmp_path / "other"))
    assert ds(other) is not ds(c), "one per manifestsDir"


def same(a: object, b: object) -> bool:
    return a is b


class FakeKube:
    made: list[Any] = []
    fail: Exception | None = None

    def __init__(self, kubeconfig: str | None, node: str | None, timeout: float) -> None:
        self.args = (kubeconfig, node, timeout)
        self.is_ready = False
        self.closed = False

    @classmethod
    def watching(cls, kubeconfig: str | None, node_name: str | None, timeout: float) -> "FakeKube":
        if cls.fail is not None:
            raise cls.fail
        src = cls(kubeconfig, node_name, timeout)
        cls.made.append(src)
        return src

    def ready(self) -> bool:
        return self.is_ready

    def cache_ages(self) -> dict[str, float]:
        return {"pods": 1.0, "nads": 2.0}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_kube(monkeypatch: pytest.MonkeyPatch) -> type[FakeKube]:
    monkeypatch.setattr(FakeKube, "made", [])
    monkeypatch.setattr(FakeKube, "fail", None)
    monkeypatch.setattr(kube, "KubeSource", FakeKube)
    return FakeKube


def test_daemon_wide_credentials_share_one_watching_source(tmp_path: Path, fake_kube: type[FakeKube]) -> None:
    ds = DaemonSources("/etc/daemon.kubeconfig", "node1", None, use_in_cluster=False)
    assert ds.expected_ready() == ["Kubernetes watches not started"]
    ds.start()
    assert len(fake_kube.made) == 1
    src: Any = fake_kube.made[0]
    assert src.args == ("/etc/daemon.kubeconfig", "node1", 10.0)
    assert same(ds(cfg(tmp_path, kubeconfig="/a", api_timeout=3.0)), src)
    assert same(ds(cfg(tmp_path, kubeconfig="/b")), src)
    assert len(fake_kube.made) == 1
    assert ds.expected_ready() == ["watch caches of the Kubernetes API not synced"]
    src.is_ready = True
    assert ds.expected_ready() == []
    assert ds.cache_ages() == {"kube": {"pods": 1.0, "nads": 2.0}}
    ds.close()
    assert src.closed
    with pytest.raises(CNIError) as e:
        ds(cfg(tmp_path, kubeconfig="/a"))
    assert e.value.code == 11


def test_in_cluster_daemon(tmp_path: Path, fake_kube: type[FakeKube]) -> None:
    ds = DaemonSources(None, None, 4.0, use_in_cluster=True)
    ds.start()
    assert fake_kube.made[0].args == (None, None, 4.0)
    assert same(ds(cfg(tmp_path, kubeconfig="/x")), fake_kube.made[0])


def test_without_daemon_credentials_the_configs_kubeconfig(tmp_path: Path, fake_kube: type[FakeKube]) -> None:
    ds = DaemonSources(None, "n", None, use_in_cluster=False)
    ds.start()
    assert fake_kube.made == [] and ds.expected_ready() == [], "nothing to watch before a config asks"
    a = ds(cfg(tmp_path, kubeconfig="/a", api_timeout=3.0))
    assert a.args == ("/a", "n", 3.0)  # type: ignore[attr-defined]
    assert same(ds(cfg(tmp_path, kubeconfig="/a")), a)
    b = ds(cfg(tmp_path, kubeconfig="/b"))
    assert b is not a
    assert set(ds.cache_ages()) == {"kube:/a", "kube:/b"}
    assert len(ds.expected_ready()) == 2


def test_failed_start_is_an_error_11_and_retried(tmp_path: Path, fake_kube: type[FakeKube]) -> None:
    ds = DaemonSources("/k", None, None, use_in_cluster=False)
    fake_kube.fail = RuntimeError("connection refused")
    ds.start()  # logged, not raised: the daemon still starts and serves DELs
    with pytest.raises(CNIError) as e:
        ds(cfg(tmp_path, kubeconfig="/k"))
    assert e.value.code == 11 and "connection refused" in e.value.msg and "/k" in e.value.msg
    fake_kube.fail = CNIError(7, "bad kubeconfig")
    with pytest.raises(CNIError) as e:
        ds(cfg(tmp_path, kubeconfig="/k"))
    assert e.value.code == 7, "a CNI error of the source keeps its code"
    fake_kube.fail = None
    ds.ensure_started()
    assert len(fake_kube.made) == 1 and ds(cfg(tmp_path, kubeconfig="/k")) is fake_kube.made[0]
