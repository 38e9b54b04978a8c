"""meta-cni's own network configuration (the stdin config a runtime sends to `meta-cni`)."""
from __future__ import annotations

from typing import Any

import attrs

from . import schema

DEFAULTS = {
    "networksNamespace": "kube-system",
    "globalNamespaces": ("default",),
    "systemNamespaces": ("kube-system",),
    "manifestsDir": "/etc/meta-cni/manifests",
    "confDir": "/etc/cni/meta-cni/net.d",
    "cniDir": "/var/lib/cni/meta-cni",
    "kubeletCheckpoint": "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint",
    "deviceInfoDir": "/run/k8s.cni.cncf.io/devinfo/cni",
    "delegateTimeout": 60.0,
    "apiTimeout": 10.0,
}


@attrs.frozen
class MetaConfig:
    """Validated meta-cni settings; field names mirror the JSON keys (see README, "Configuration")."""

    name: str
    cni_version: str
    cluster_network: str
    default_networks: tuple[str, ...] = ()
    networks_namespace: str = DEFAULTS["networksNamespace"]
    namespace_isolation: bool = False
    global_namespaces: tuple[str, ...] = DEFAULTS["globalNamespaces"]
    system_namespaces: tuple[str, ...] = DEFAULTS["systemNamespaces"]
    manifests_dir: str = DEFAULTS["manifestsDir"]
    conf_dir: str = DEFAULTS["confDir"]
    cni_dir: str = DEFAULTS["cniDir"]
    bin_dir: str | None = None
    kubelet_checkpoint: str = DEFAULTS["kubeletCheckpoint"]
    device_info_dir: str = DEFAULTS["deviceInfoDir"]
    delegate_timeout: float = DEFAULTS["delegateTimeout"]
    builtin_standard_types: bool = False
    parallel_attachments: bool = True
    kubeconfig: str | None = None
    api_timeout: float = DEFAULTS["apiTimeout"]
    daemon_socket: str | None = None
    runtime_config: dict[str, Any] = attrs.field(factory=dict, eq=False)


def _namespaces(value: object) -> tuple[str, ...]:
    if isinstance(value, str):  # Multus's comma-separated string form
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)  # type: ignore[arg-type]


def load(config: dict[str, Any]) -> MetaConfig:
    """Validate the stdin config against schemas/netconf.json and build a MetaConfig."""
    schema.check("netconf", config, f"meta-cni network config {config.get('name', '')!r}".replace(" ''", ""))
    g = config.get
    return MetaConfig(
        name=config["name"],
        cni_version=config["cniVersion"],
        cluster_network=config["clusterNetwork"],
        default_networks=tuple(g("defaultNetworks", ())),
        networks_namespace=g("networksNamespace", DEFAULTS["networksNamespace"]),
        namespace_isolation=bool(g("namespaceIsolation", False)),
        global_namespaces=_namespaces(g("globalNamespaces", DEFAULTS["globalNamespaces"])),
        system_namespaces=tuple(g("systemNamespaces", DEFAULTS["systemNamespaces"])),
        manifests_dir=g("manifestsDir", DEFAULTS["manifestsDir"]),
        conf_dir=g("confDir", DEFAULTS["confDir"]),
        cni_dir=g("cniDir", DEFAULTS["cniDir"]),
        bin_dir=g("binDir"),
        kubelet_checkpoint=g("kubeletCheckpoint", DEFAULTS["kubeletCheckpoint"]),
        device_info_dir=g("deviceInfoDir", DEFAULTS["deviceInfoDir"]),
        delegate_timeout=float(g("delegateTimeout", DEFAULTS["delegateTimeout"])),
        builtin_standard_types=bool(g("builtinStandardTypes", False)),
        parallel_attachments=bool(g("parallelAttachments", True)),
        kubeconfig=g("kubeconfig"),
        api_timeout=float(g("apiTimeout", DEFAULTS["apiTimeout"])),
        daemon_socket=g("daemonSocket"),
        runtime_config=dict(g("runtimeConfig") or {}),
    )
