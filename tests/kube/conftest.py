"""The NAD CRD and the sample NADs/pods, applied once per module to the session's real API server."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.infra.kube_cluster import KubeCluster

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
SAMPLE_NADS = sorted((ROOT / "samples" / "nads").glob("*.yaml"))
SAMPLE_PODS = sorted((ROOT / "samples" / "pods").glob("*.yaml"))

GROUP, VERSION, PLURAL = "k8s.cni.cncf.io", "v1", "network-attachment-definitions"


@pytest.fixture(scope="module")
def nad_crd(kube_cluster: KubeCluster) -> dict[str, Any]:
    """The NAD CRD, Established, with every other CRD of crds/ applied beside it."""
    (crd,) = [c for c in kube_cluster.apply(CRDS) if c["metadata"]["name"] == f"{PLURAL}.{GROUP}"]
    return crd


def nad(name: str, namespace: str, config: str = '{"cniVersion":"1.0.0","type":"bridge"}') -> dict[str, Any]:
    """A NetworkAttachmentDefinition manifest."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"config": config}}
