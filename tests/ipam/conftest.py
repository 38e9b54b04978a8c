"""Fixtures shared by the meta-ipam tests against the real API server (each module's `cluster` fixture applies
the CRDs it needs)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from meta.ipam.kubestore import KubeStore
from tests.infra.kube_cluster import KubeCluster


@pytest.fixture
def store(cluster: KubeCluster) -> Iterator[KubeStore]:
    """The cluster store with the admin's token."""
    s = KubeStore.from_token(cluster.host, cluster.token, str(cluster.ca_file), 30.0)
    yield s
    s.close()
