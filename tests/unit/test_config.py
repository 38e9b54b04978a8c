"""meta-cni's own stdin configuration (meta/config.py)."""
from __future__ import annotations

from typing import Any

import pytest

from meta import config as metaconfig
from meta.cni import version as cniversion
from meta.cni.errors import INVALID_CONFIG, CNIError

BASE: dict[str, Any] = {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "clusterNetwork": "k8s-pod-network"}


def load(**extra: Any) -> metaconfig.MetaConfig:
    return metaconfig.load(dict(BASE, **extra))


def load_error(config: dict[str, Any]) -> CNIError:
    with pytest.raises(CNIError) as ei:
        metaconfig.load(config)
    assert ei.value.code == INVALID_CONFIG
    return ei.value


def test_defaults() -> None:
    cfg = load()
    assert cfg.name == "meta"
    assert cfg.cni_version == "1.0.0"
    assert cfg.cluster_network == "k8s-pod-network"
    assert cfg.default_networks == ()
    assert cfg.networks_namespace == "kube-system"
    assert cfg.namespace_isolation is False
    assert cfg.global_namespaces == ("default",)
    assert cfg.system_namespaces == ("kube-system",)
    assert cfg.manifests_dir == "/etc/meta-cni/manifests"
    assert cfg.conf_dir == "/etc/cni/meta-cni/net.d"
    assert cfg.cni_dir == "/var/lib/cni/meta-cni"
    assert cfg.bin_dir is None
    assert cfg.kubelet_checkpoint == "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint"
    assert cfg.device_info_dir == "/run/k8s.cni.cncf.io/devinfo/cni"
    assert cfg.delegate_timeout == 60.0
    assert cfg.runtime_config == {}


def test_every_field() -> None:
    cfg = load(
        defaultNetworks=["a", "ns/b", "/etc/x.conf"], networksNamespace="nets", namespaceIsolation=True,
        globalNamespaces=["g1", "g2"], systemNamespaces=["sys"], manifestsDir="/m", confDir="/c", cniDir="/d",
        binDir="/b", kubeletCheckpoint="/k", deviceInfoDir="/i", delegateTimeout=5, logLevel="debug",
        capabilities={"portMappings": True}, runtimeConfig={"portMappings": [{"containerPort": 80}]},
        args={"cni": {}}, disableCheck="true", disableGC=False, **{"cni.dev/valid-attachments": []},
    )
    assert cfg.default_networks == ("a", "ns/b", "/etc/x.conf")
    assert cfg.networks_namespace == "nets"
    assert cfg.namespace_isolation is True
    assert cfg.global_namespaces == ("g1", "g2")
    assert cfg.system_namespaces == ("sys",)
    assert (cfg.manifests_dir, cfg.conf_dir, cfg.cni_dir, cfg.bin_dir) == ("/m", "/c", "/d", "/b")
    assert (cfg.kubelet_checkpoint, cfg.device_info_dir) == ("/k", "/i")
    assert cfg.delegate_timeout == 5.0 and isinstance(cfg.delegate_timeout, float)
    assert cfg.runtime_config == {"portMappings": [{"containerPort": 80}]}


def test_global_namespaces_comma_string() -> None:
    # Multus's comma-separated string form.
    assert load(globalNamespaces="a, b ,,c ").global_namespaces == ("a", "b", "c")
    assert load(globalNamespaces="").global_namespaces == ()


def test_runtime_config_is_copied() -> None:
    rc: dict[str, Any] = {"bandwidth": {"ingressRate": 1}}
    cfg = load(runtimeConfig=rc)
    rc["x"] = 1
    assert "x" not in cfg.runtime_config


@pytest.mark.parametrize("field", ["bogus", "clusternetwork", "delegates", "cni.devx"])
def test_unknown_field_is_named(field: str) -> None:
    err = load_error(dict(BASE, **{field: 1}))
    assert f"{field}: unknown field" in err.msg
    assert err.msg.startswith("meta-cni network config 'meta': ")


@pytest.mark.parametrize("missing", ["name", "type", "clusterNetwork"])
def test_required_fields(missing: str) -> None:
    cfg = dict(BASE)
    del cfg[missing]
    err = load_error(cfg)
    assert repr(missing) in err.msg


def test_missing_name_message_has_no_empty_quotes() -> None:
    cfg = dict(BASE)
    del cfg["name"]
    assert load_error(cfg).msg.startswith("meta-cni network config: ")


def test_missing_cni_version_is_a_cni_error() -> None:
    # load() validates against the schema; a config the schema accepts must not crash with a KeyError.
    cfg = dict(BASE)
    del cfg["cniVersion"]
    try:
        loaded = metaconfig.load(cfg)
    except CNIError as e:
        assert e.code == INVALID_CONFIG
        assert "cniVersion" in e.msg
    else:
        assert loaded.cni_version in cniversion.SUPPORTED


@pytest.mark.parametrize("field,value", [
    ("clusterNetwork", ""), ("defaultNetworks", "a"), ("defaultNetworks", [""]), ("networksNamespace", "Bad"),
    ("namespaceIsolation", "true"), ("globalNamespaces", ["Bad"]), ("globalNamespaces", 5),
    ("systemNamespaces", "kube-system"), ("manifestsDir", "relative"), ("confDir", ""), ("cniDir", "x/y"),
    ("binDir", "bin"), ("kubeletCheckpoint", "k"), ("deviceInfoDir", "d"), ("delegateTimeout", 0),
    ("delegateTimeout", -1), ("delegateTimeout", 3601), ("delegateTimeout", "5"), ("delegateTimeout", True),
    ("logLevel", "trace"), ("capabilities", {"x": "yes"}), ("runtimeConfig", []), ("disableCheck", "yes"),
    ("name", "bad name"), ("type", ""),
])
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    err = load_error(dict(BASE, **{field: value}))
    assert f": {field}" in err.msg, err.msg
