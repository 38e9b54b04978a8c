"""samples/deploy applied to a real kube-apiserver v1.20.2 with RBAC: every object is accepted and stored as
written (strictly checked against the server's own OpenAPI), and the node ServiceAccount may do exactly what
the daemon needs, checked both by SubjectAccessReview and by calling the API with that account's own token.

There is no kubelet, scheduler or controller-manager: the DaemonSet and Deployment are stored, no pod runs.
"""
from __future__ import annotations

import copy
import json
import ssl
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes.client
import pytest
from kubernetes.client import ApiException

from tests.deploy.manifests import CRDS, DEPLOY, NAMESPACE, NODE_FORBIDDEN, NODE_NEEDS, doc_id, documents
from tests.infra.kube_cluster import KubeCluster

NODE_SA = f"system:serviceaccount:{NAMESPACE}:meta-cni"
WEBHOOK_SA = f"system:serviceaccount:{NAMESPACE}:meta-cni-webhook"


def _delete(kube: KubeCluster, doc: dict[str, Any]) -> None:
    resource = kube.dynamic_client().resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    try:
        resource.delete(name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"))
    except ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture(scope="module")
def applied(kube_cluster: KubeCluster) -> Iterator[dict[str, dict[str, Any]]]:
    """crds/ then all of samples/deploy, as stored by the server; keyed like doc_id (without the file).

    The sample ValidatingWebhookConfiguration is cluster-wide and points at a Service with no pods: while it
    exists no NAD can be written anywhere (failurePolicy Fail), and a NAD write would make the API server dial
    the Service's cluster IP. So nothing here writes a NAD, and everything is deleted again at the end.
    """
    kube_cluster.apply(CRDS)
    try:
        stored = kube_cluster.apply(DEPLOY)
        yield {f"{o['kind']}/{o['metadata']['name']}": o for o in stored}
    finally:
        for _, doc in reversed(documents()):
            # Without a controller-manager a deleted namespace stays Terminating for good; an empty one is
            # harmless, and leaving it lets a later apply in this session work.
            if doc["kind"] != "Namespace":
                _delete(kube_cluster, doc)


def _subset_problems(written: Any, stored: Any, path: str = "") -> list[str]:
    """Where `stored` lost or changed something of `written` (defaults the server adds are fine)."""
    if isinstance(written, dict):
        if not isinstance(stored, dict):
            return [f"{path}: stored as {stored!r}"]
        out = []
        for k, v in written.items():
            if k not in stored:
                out.append(f"{path}.{k}: dropped by the server")
            else:
                out += _subset_problems(v, stored[k], f"{path}.{k}")
        return out
    if isinstance(written, list):
        if not isinstance(stored, list) or len(stored) != len(written):
            return [f"{path}: stored as {stored!r}"]
        return [p for i, (w, s) in enumerate(zip(written, stored)) for p in _subset_problems(w, s, f"{path}[{i}]")]
    return [] if written == stored else [f"{path}: {written!r} stored as {stored!r}"]


@pytest.mark.parametrize("item", documents(), ids=doc_id)
def test_stored_as_written(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster,
                           item: tuple[str, dict[str, Any]]) -> None:
    _, doc = item
    resource = kube_cluster.dynamic_client().resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    # Read back rather than trust apply's answer: it is what every client will see.
    stored = resource.get(name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace")).to_dict()
    assert _subset_problems(doc, stored) == []


@pytest.fixture(scope="module")
def openapi_1_20(kube_cluster: KubeCluster) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(kube_cluster.ca_file))
    req = urllib.request.Request(f"{kube_cluster.host}/openapi/v2", headers={"Authorization": f"Bearer {kube_cluster.token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
        spec = json.loads(r.read())
    assert spec["info"]["version"].startswith("v1.20.")
    return spec


def _strict_validator(spec: dict[str, Any], api_version: str, kind: str) -> jsonschema.Draft4Validator:
    """The server's OpenAPI definition of apiVersion/kind as a JSON Schema that, like kubernetes-validate's
    strict mode, refuses fields the schema does not name (kube-apiserver 1.20 silently drops them)."""
    defs = copy.deepcopy(spec["definitions"])
    group, _, version = api_version.rpartition("/")
    found = [name for name, d in defs.items()
             if {"group": group, "version": version, "kind": kind} in d.get("x-kubernetes-group-version-kind", [])]
    assert len(found) == 1, (api_version, kind, found)
    for d in defs.values():
        if "properties" in d and "additionalProperties" not in d:
            d["additionalProperties"] = False
    # Swagger 2 can only say "string" for these; the API accepts numbers too (as openapi2jsonschema renders them).
    defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["string", "integer"]}
    defs["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {"type": ["string", "number"]}
    return jsonschema.Draft4Validator({"definitions": defs, "$ref": f"#/definitions/{found[0]}"})


@pytest.mark.parametrize("item", documents(), ids=doc_id)
def test_valid_for_the_1_20_api_strict(openapi_1_20: dict[str, Any], item: tuple[str, dict[str, Any]]) -> None:
    _, doc = item
    validator = _strict_validator(openapi_1_20, doc["apiVersion"], doc["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []


def test_strict_1_20_check_refuses_a_field_1_20_does_not_have(openapi_1_20: dict[str, Any]) -> None:
    # DaemonSet maxSurge only came in 1.21: proof that the check above knows which release it checks.
    ds = next(d for _, d in documents() if d["kind"] == "DaemonSet")
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 1
    assert not _strict_validator(openapi_1_20, "apps/v1", "DaemonSet").is_valid(ds)


def test_no_pods_run_without_a_kubelet(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster) -> None:
    # Stored, but nothing schedules or runs them here; the objects are what this test is about.
    assert "DaemonSet/meta-cni-node" in applied and "Deployment/meta-cni-webhook" in applied
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    assert core.list_namespaced_pod(NAMESPACE).items == []


@pytest.mark.parametrize("kind", ["DaemonSet", "Deployment"])
def test_pod_templates_are_admitted_as_pods(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster,
                                            kind: str) -> None:
    # Pod admission (the Priority plugin resolving system-node-critical outside kube-system, privileged and
    # hostPath pods) only runs on Pods, which no controller makes here: make one from the template by hand.
    (workload,) = [d for _, d in documents() if d["kind"] == kind]
    template = workload["spec"]["template"]
    name = f"from-{kind.lower()}"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**template["metadata"], "name": name, "namespace": NAMESPACE},
           "spec": {**template["spec"], "nodeName": "node-a"}}
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    created = core.create_namespaced_pod(NAMESPACE, pod)
    try:
        assert created.status.phase == "Pending"
        if "priorityClassName" in template["spec"]:
            scheduling = kubernetes.client.SchedulingV1Api(kube_cluster.api_client())
            assert created.spec.priority == scheduling.read_priority_class(template["spec"]["priorityClassName"]).value
    finally:
        core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)


# ----------------------------------------------------------------------------------------------- RBAC


def _allowed(kube: KubeCluster, user: str, group: str, resource: str, verb: str, namespace: str | None) -> bool:
    res, _, sub = resource.partition("/")
    ns_name = user.split(":")[2]
    review = kubernetes.client.V1SubjectAccessReview(spec=kubernetes.client.V1SubjectAccessReviewSpec(
        user=user,
        # The groups a ServiceAccount token authenticates with, so group grants are counted as for the real token.
        groups=["system:serviceaccounts", f"system:serviceaccounts:{ns_name}", "system:authenticated"],
        resource_attributes=kubernetes.client.V1ResourceAttributes(
            group=group, resource=res, subresource=sub or None, verb=verb, namespace=namespace)))
    answer = kubernetes.client.AuthorizationV1Api(kube.api_client()).create_subject_access_review(review)
    return bool(answer.status.allowed)


@pytest.mark.parametrize("namespace", ["default", "some-tenant", None], ids=["default", "other-ns", "all-namespaces"])
@pytest.mark.parametrize("need", sorted(NODE_NEEDS), ids=lambda n: f"{n[2]}-{n[1]}")
def test_node_sa_may_do_what_the_daemon_needs(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster,
                                               need: tuple[str, str, str], namespace: str | None) -> None:
    group, resource, verb = need
    assert _allowed(kube_cluster, NODE_SA, group, resource, verb, namespace)


@pytest.mark.parametrize("forbidden", sorted(NODE_FORBIDDEN), ids=lambda n: f"{n[2]}-{n[1]}")
def test_node_sa_may_not_do_more(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster,
                                 forbidden: tuple[str, str, str]) -> None:
    group, resource, verb = forbidden
    for namespace in ("default", NAMESPACE, "kube-system"):
        assert not _allowed(kube_cluster, NODE_SA, group, resource, verb, namespace), namespace


@pytest.mark.parametrize("need", sorted(NODE_NEEDS), ids=lambda n: f"{n[2]}-{n[1]}")
def test_webhook_sa_has_no_access(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster,
                                  need: tuple[str, str, str]) -> None:
    group, resource, verb = need
    assert not _allowed(kube_cluster, WEBHOOK_SA, group, resource, verb, "default")


@pytest.fixture(scope="module")
def node_api(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster) -> Iterator[kubernetes.client.ApiClient]:
    """A client with a real token of the node ServiceAccount. No controller-manager mints Secret tokens here,
    but the TokenRequest API (what the kubelet uses for projected tokens) works with the server alone."""
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    token = core.create_namespaced_service_account_token("meta-cni", NAMESPACE, kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))).status.token
    client = kube_cluster.api_client(token)
    yield client
    client.close()


@pytest.fixture(scope="module")
def some_pod(applied: dict[str, dict[str, Any]], kube_cluster: KubeCluster) -> Iterator[str]:
    core = kubernetes.client.CoreV1Api(kube_cluster.api_client())
    name = f"rbac-{uuid.uuid4().hex[:8]}"
    core.create_namespaced_pod("default", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "registry.example.com/pause:1"}]}})
    yield name
    core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


def test_node_token_reads_pods_and_nads_everywhere(node_api: kubernetes.client.ApiClient, some_pod: str) -> None:
    core = kubernetes.client.CoreV1Api(node_api)
    names = [p.metadata.name for p in core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a").items]
    assert some_pod in names
    assert core.read_namespaced_pod(some_pod, "default").metadata.name == some_pod
    custom = kubernetes.client.CustomObjectsApi(node_api)
    custom.list_cluster_custom_object("k8s.cni.cncf.io", "v1", "network-attachment-definitions")
    custom.list_namespaced_custom_object("k8s.cni.cncf.io", "v1", "kube-system", "network-attachment-definitions")


def test_node_token_may_ask_api_readiness(node_api: kubernetes.client.ApiClient, kube_cluster: KubeCluster) -> None:
    # The kube source probes /readyz; the bootstrap role system:public-info-viewer grants that, not ours.
    ctx = ssl.create_default_context(cafile=str(kube_cluster.ca_file))
    auth = node_api.configuration.api_key["authorization"]
    req = urllib.request.Request(f"{kube_cluster.host}/readyz", headers={"Authorization": auth})
    with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
        assert r.status == 200


def test_node_token_writes_network_status_only_through_pods_status(node_api: kubernetes.client.ApiClient,
                                                                    some_pod: str) -> None:
    core = kubernetes.client.CoreV1Api(node_api)
    patch = {"metadata": {"annotations": {"k8s.v1.cni.cncf.io/network-status": "[]"}}}
    pod = core.patch_namespaced_pod_status(some_pod, "default", patch)
    assert pod.metadata.annotations["k8s.v1.cni.cncf.io/network-status"] == "[]"
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod(some_pod, "default", patch)
    assert e.value.status == 403
    with pytest.raises(ApiException) as e:
        core.delete_namespaced_pod(some_pod, "default")
    assert e.value.status == 403


def test_node_token_creates_events_but_reads_no_secrets(node_api: kubernetes.client.ApiClient, some_pod: str) -> None:
    core = kubernetes.client.CoreV1Api(node_api)
    core.create_namespaced_event("default", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "meta-cni-"},
        "involvedObject": {"kind": "Pod", "namespace": "default", "name": some_pod},
        "reason": "ErrorAddingNetwork", "message": "test", "type": "Warning",
        "source": {"component": "meta-cni", "host": "node-a"}})
    for call in (lambda: core.list_namespaced_secret("default"), lambda: core.list_namespaced_secret(NAMESPACE),
                 lambda: core.read_node("node-a"), lambda: core.list_namespaced_config_map("kube-system")):
        with pytest.raises(ApiException) as e:
            call()
        assert e.value.status == 403
