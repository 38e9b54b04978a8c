"""samples/deploy without a cluster: Kubernetes schemas (kubernetes-validate, strict), least-privilege RBAC, and
that the pieces fit together (config paths mounted from the host, ports, names, the metactl command lines)."""
from __future__ import annotations

import posixpath
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate import utils as kv_utils

from meta import config as meta_config
from tests.deploy.manifests import (CONFIG_KEY, DEPLOY, NAMESPACE, NODE_FORBIDDEN, NODE_NEEDS, all_of, container,
                                    daemonset, doc_id, documents, flag, meta_cni_config, one)

METACTL = Path(sys.prefix) / "bin" / "metactl"
IMAGE = "registry.example.com/meta-cni/meta-cni:0.1.0"

# kubernetes-validate ships schemas for a window of recent releases only (1.25+ in 1.37.0), none for the
# fixture's 1.20: its oldest is the closest to 1.20 and its newest is today's API. What 1.20 itself accepts
# is checked against the running 1.20 server's own OpenAPI (tests/deploy/test_apply.py).
_SHIPPED = sorted({kv_utils.major_minor(v) for v in kv_utils.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
SCHEMA_VERSIONS = sorted({_SHIPPED[0], _SHIPPED[-1]})


def test_there_is_something_to_validate() -> None:
    kinds = {d["kind"] for _, d in documents()}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
            "Deployment", "Service", "ValidatingWebhookConfiguration"} <= kinds


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("item", documents(), ids=doc_id)
def test_kubernetes_schema_strict(item: tuple[str, dict[str, Any]], version: str) -> None:
    _, doc = item
    # strict: additionalProperties false everywhere, so a misspelt or misplaced field fails too.
    assert kubernetes_validate.validate(doc, version, strict=True) == version


def test_strict_validation_catches_a_misplaced_field() -> None:
    # The check above is only worth something if a field in the wrong place really fails.
    ds = daemonset()
    ds["spec"]["template"]["spec"]["containers"][0]["mountPropagation"] = "HostToContainer"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, SCHEMA_VERSIONS[-1], strict=True)


def test_namespaced_objects_are_in_the_meta_cni_namespace() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"}
    for _, doc in documents():
        ns = doc["metadata"].get("namespace")
        assert (ns is None) if doc["kind"] in cluster_scoped else (ns == NAMESPACE), doc_id(("", doc))
    assert one("Namespace")["metadata"]["name"] == NAMESPACE
    # The daemon is privileged: Pod Security must say so for this namespace (and only this one).
    assert one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_images_are_the_documented_placeholder() -> None:
    for kind in ("DaemonSet", "Deployment"):
        spec = one(kind)["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["image"] == IMAGE
    assert IMAGE in (DEPLOY / "README.md").read_text()


# ----------------------------------------------------------------------------------------------- RBAC


def _rules() -> list[dict[str, Any]]:
    return [r for role in all_of("ClusterRole") + all_of("Role") for r in role.get("rules", [])]


def test_no_wildcards_anywhere_in_rbac() -> None:
    for role in all_of("ClusterRole") + all_of("Role"):
        assert "aggregationRule" not in role  # an aggregated role's rules are not the ones written here
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                for value in rule.get(key, []):
                    assert "*" not in value, (role["metadata"]["name"], key, rule)


def test_node_role_grants_exactly_what_the_daemon_needs() -> None:
    granted = {(g, res, verb) for r in _rules() for g in r["apiGroups"] for res in r["resources"] for verb in r["verbs"]}
    assert granted == NODE_NEEDS
    assert not granted & NODE_FORBIDDEN
    assert not any("nonResourceURLs" in r or "resourceNames" in r for r in _rules())


def test_only_the_node_service_account_is_bound() -> None:
    (binding,) = all_of("ClusterRoleBinding")
    assert not all_of("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one("ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meta-cni", "namespace": NAMESPACE}]
    assert daemonset()["spec"]["template"]["spec"]["serviceAccountName"] == "meta-cni"


def test_webhook_has_no_api_credentials() -> None:
    sa = one("ServiceAccount", "meta-cni-webhook")
    spec = one("Deployment")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "meta-cni-webhook"
    assert sa["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False


# ----------------------------------------------------------------------------------------------- node agent


def test_configmap_holds_a_valid_meta_cni_config() -> None:
    conf = meta_cni_config()
    assert conf["type"] == "meta-cni"
    cfg = meta_config.load(conf)
    assert cfg.daemon_socket == "/run/meta-cni/daemon.sock"
    assert cfg.kubeconfig and cfg.cluster_network


def _mounts(c: dict[str, Any], volumes: dict[str, dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in c.get("volumeMounts", [])}


def _host_mount_for(path: str, mounts: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mount whose directory contains `path`; it must be a hostPath mounted at the host's own path, so the
    path means the same in the container and on the node (where the shim and the runtime read it)."""
    best = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    assert best is not None, f"{path} is not under any volume mount"
    mount, volume = mounts[best]
    assert volume.get("hostPath", {}).get("path") == best, f"{best} is not the host's {best}"
    return mount, volume


def test_every_path_of_the_config_is_the_hosts_in_the_daemon() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = _mounts(container(spec, "daemon"), volumes)
    conf = meta_cni_config()
    for key in ("confDir", "cniDir", "binDir", "deviceInfoDir"):
        _host_mount_for(conf[key], mounts)
    for key in ("daemonSocket", "kubeconfig", "kubeletCheckpoint"):
        _host_mount_for(posixpath.dirname(conf[key]), mounts)
    if conf["clusterNetwork"].startswith("/"):
        _host_mount_for(conf["clusterNetwork"], mounts)
    # The cache must be writable; what the daemon only reads is mounted read-only.
    assert not _host_mount_for(conf["cniDir"], mounts)[0].get("readOnly")
    assert not _host_mount_for(posixpath.dirname(conf["daemonSocket"]), mounts)[0].get("readOnly")
    assert _host_mount_for(conf["binDir"], mounts)[0].get("readOnly") is True


def test_daemon_mounts() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    mounts = _mounts(container(spec, "daemon"), {v["name"]: v for v in spec["volumes"]})
    netns, _ = _host_mount_for("/run/netns", mounts)
    assert netns["mountPropagation"] == "HostToContainer"
    assert _host_mount_for("/var/lib/kubelet/device-plugins", mounts)[0]["readOnly"] is True
    for path in ("/opt/cni/bin", "/etc/cni/net.d", "/run/meta-cni", "/var/lib/cni/meta-cni", "/var/lib/cni/networks"):
        _host_mount_for(path, mounts)
    # Nothing else of the host: no / or /var/lib/kubelet as a whole; /run/flannel is what the example primary
    # network's plugin reads (read-only).
    assert set(mounts) == {"/opt/cni/bin", "/etc/cni/net.d", "/etc/cni/meta-cni/net.d", "/run/meta-cni",
                           "/var/lib/cni/meta-cni", "/var/lib/cni/networks", "/run/netns",
                           "/var/lib/kubelet/device-plugins", "/run/k8s.cni.cncf.io", "/run/flannel"}
    assert _host_mount_for("/run/flannel", mounts)[0]["readOnly"] is True


def test_init_container_installs_the_configmaps_config_on_the_host() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    init = container(spec, "install", init=True)
    cmd = init["command"]
    assert cmd[:2] == ["metactl", "install"]
    assert "--kubeconfig-from-serviceaccount" in cmd
    mounts = _mounts(init, volumes)
    config_file = flag(cmd, "--config")
    _, volume = mounts[posixpath.dirname(config_file)]
    assert volume["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert posixpath.basename(config_file) == CONFIG_KEY
    conf = meta_cni_config()
    assert flag(cmd, "--bin-dir") == conf["binDir"]
    _host_mount_for(flag(cmd, "--bin-dir"), mounts)
    _host_mount_for(flag(cmd, "--conf-dir"), mounts)
    # The thin-fallback kubeconfig is written under the host's conf dir, where the config says it is.
    _host_mount_for(posixpath.dirname(conf["kubeconfig"]), mounts)
    assert not init["securityContext"].get("privileged")
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_daemon_command_env_probes_and_scheduling() -> None:
    ds = daemonset()
    spec = ds["spec"]["template"]["spec"]
    daemon = container(spec, "daemon")
    cmd = daemon["command"]
    assert cmd[:2] == ["metactl", "daemon"]
    assert flag(cmd, "--socket") == meta_cni_config()["daemonSocket"]
    port = int(flag(cmd, "--metrics-address").rsplit(":", 1)[1])
    (metrics,) = daemon["ports"]
    assert metrics["containerPort"] == port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert daemon[probe]["httpGet"] == {"path": path, "port": metrics["name"]}
    env = {e["name"]: e for e in daemon["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert daemon["securityContext"]["privileged"] is True
    assert daemon["resources"]["requests"] and daemon["resources"]["limits"]["memory"]
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]  # every taint, so every node
    assert spec["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def _help(*subcommand: str) -> str:
    p = subprocess.run([str(METACTL), *subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("kind, name", [("DaemonSet", "install"), ("DaemonSet", "daemon"), ("Deployment", "webhook")])
def test_command_lines_use_options_metactl_has(kind: str, name: str) -> None:
    spec = one(kind)["spec"]["template"]["spec"]
    (c,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    cmd = c["command"]
    assert cmd[0] == "metactl"
    text = _help(cmd[1])
    for arg in cmd[2:]:
        if arg.startswith("--"):
            assert arg in text, f"metactl {cmd[1]} has no option {arg}"


# ----------------------------------------------------------------------------------------------- webhook


def test_webhook_wiring() -> None:
    deploy, svc, vwc = one("Deployment"), one("Service"), one("ValidatingWebhookConfiguration")
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    c = container(pod["spec"], "webhook")
    (https,) = c["ports"]
    assert int(flag(c["command"], "--port")) == https["containerPort"]
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] == https["name"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS" and c[probe]["httpGet"]["path"] == "/healthz"
    # The TLS Secret is mounted where --cert and --key point.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    for opt, key in (("--cert", "tls.crt"), ("--key", "tls.key")):
        path = flag(c["command"], opt)
        assert posixpath.basename(path) == key
        assert mounts[posixpath.dirname(path)]["secret"]["secretName"] == "meta-cni-webhook-tls"
    (hook,) = vwc["webhooks"]
    assert hook["clientConfig"]["service"] == {"namespace": NAMESPACE, "name": svc["metadata"]["name"],
                                                "path": "/validate", "port": svc_port["port"]}
    assert "caBundle" not in hook["clientConfig"]  # filled by cert-manager or the operator (README)
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/meta-cni-webhook"


def test_webhook_registration() -> None:
    (hook,) = one("ValidatingWebhookConfiguration")["webhooks"]
    assert hook["rules"] == [{"apiGroups": ["k8s.cni.cncf.io"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                              "resources": ["network-attachment-definitions"], "scope": "Namespaced"}]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] <= 30


def test_webhook_pod_runs_unprivileged() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = container(spec, "webhook")["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
