"""samples/deploy loaded once for the deployment tests: every document, by kind and name."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "samples" / "deploy"
CRDS = ROOT / "crds"
NAMESPACE = "meta-cni"
CONFIG_KEY = "00-meta-cni.conflist"


@functools.cache
def _documents() -> tuple[tuple[str, str], ...]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, json.dumps(doc)))
    return tuple(out)


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every document; fresh copies, so a test may change them."""
    return [(name, json.loads(text)) for name, text in _documents()]


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {DEPLOY}, found {len(found)}"
    return found[0]


def all_of(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] == kind]


def daemonset() -> dict[str, Any]:
    return one("DaemonSet")


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["initContainers" if init else "containers"] if c["name"] == name]
    return c


def flag(command: list[str], name: str) -> str:
    """The value after `name` in an argv list (the manifests spell options as separate items)."""
    assert command.count(name) == 1, (name, command)
    return command[command.index(name) + 1]


def meta_cni_config() -> dict[str, Any]:
    """The meta-cni plugin config of the ConfigMap's conflist, with name and cniVersion injected as the
    runtime (libcni) does before it execs the plugin."""
    conflist = json.loads(one("ConfigMap")["data"][CONFIG_KEY])
    (plugin,) = conflist["plugins"]
    return dict(plugin, name=conflist["name"], cniVersion=conflist["cniVersion"])


# What the node daemon (and its thin fallback) needs from the API, and nothing more:
# (apiGroup, resource[/subresource], verb).
NODE_NEEDS = {
    ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
    ("", "pods/status", "patch"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "get"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "list"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "watch"),
    ("", "events", "create"), ("", "events", "patch"),
    *{("ipam.meta-cni.dev", r, v) for r in ("ippools", "ipblocks") for v in ("get", "list", "create", "update", "delete")},
}
# Things the node's ServiceAccount must never be able to do.
NODE_FORBIDDEN = {
    ("", "secrets", "get"), ("", "secrets", "list"), ("", "configmaps", "get"),
    ("", "pods", "create"), ("", "pods", "update"), ("", "pods", "patch"), ("", "pods", "delete"),
    ("", "pods/status", "update"), ("", "pods/exec", "create"), ("", "pods/eviction", "create"),
    ("", "nodes", "get"), ("", "nodes", "patch"), ("", "nodes/status", "patch"),
    ("", "serviceaccounts/token", "create"), ("", "events", "delete"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "create"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "update"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "patch"),
    ("k8s.cni.cncf.io", "network-attachment-definitions", "delete"),
    ("rbac.authorization.k8s.io", "clusterroles", "escalate"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "delete"),
}
