"""The NAD CRD and the samples against a real kube-apiserver v1.20.2 (+ etcd): storage, optimistic
concurrency, watch, printer columns, restart and RBAC, i.e. the API behaviour meta-cni relies on."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch
import pytest
import urllib3
import yaml
from kubernetes.client import ApiException

from tests.infra.kube_cluster import KubeCluster
from tests.kube.conftest import CRDS, GROUP, PLURAL, SAMPLE_NADS, SAMPLE_PODS, VERSION, nad

RESOURCE_NAME = "k8s.v1.cni.cncf.io/resourceName"
NETWORKS = "k8s.v1.cni.cncf.io/networks"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"

# The kubeconfigs skip TLS verification on purpose (like most test kubeconfigs); api_client() verifies.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def core(kube_cluster: KubeCluster) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_cluster.api_client())


@pytest.fixture(scope="module")
def samples(kube_cluster: KubeCluster, nad_crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every sample NAD and pod created in its namespace; keyed by "Kind/namespace/name"."""
    for path in SAMPLE_NADS + SAMPLE_PODS:
        kube_cluster.ensure_namespace(load(path)["metadata"]["namespace"])
    stored = kube_cluster.apply(SAMPLE_NADS + SAMPLE_PODS)
    return {f"{o['kind']}/{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in stored}


@pytest.fixture
def namespace(kube_cluster: KubeCluster, core: kubernetes.client.CoreV1Api) -> Iterator[str]:
    """A fresh namespace per test (without a controller-manager a deleted one stays Terminating, harmlessly)."""
    name = f"kt-{uuid.uuid4().hex[:8]}"
    kube_cluster.ensure_namespace(name)
    yield name
    core.delete_namespace(name)


def test_crd_is_established_with_the_npwg_names(kube_cluster: KubeCluster, nad_crd: dict[str, Any]) -> None:
    assert nad_crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    conditions = {c["type"]: c["status"] for c in nad_crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    # A non-structural schema would be accepted by v1 CRDs only with this condition set.
    assert "NonStructuralSchema" not in conditions
    accepted = nad_crd["status"]["acceptedNames"]
    assert (accepted["kind"], accepted["plural"], accepted["shortNames"]) == \
        ("NetworkAttachmentDefinition", PLURAL, ["net-attach-def"])
    resource = kube_cluster.dynamic_client().resources.get(api_version=f"{GROUP}/{VERSION}",
                                                           kind="NetworkAttachmentDefinition")
    assert resource.namespaced and resource.short_names == ["net-attach-def"]


def test_applying_the_crd_again_replaces_it(kube_cluster: KubeCluster, nad_crd: dict[str, Any]) -> None:
    (again,) = [c for c in kube_cluster.apply(CRDS) if c["metadata"]["name"] == nad_crd["metadata"]["name"]]
    assert again["metadata"]["uid"] == nad_crd["metadata"]["uid"]


def test_every_sample_nad_is_stored_as_written(samples: dict[str, dict[str, Any]],
                                               custom: kubernetes.client.CustomObjectsApi) -> None:
    assert SAMPLE_NADS
    for path in SAMPLE_NADS:
        doc = load(path)
        meta = doc["metadata"]
        got = custom.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])
        assert got["spec"] == doc["spec"], path.name
        assert (got["metadata"].get("annotations") or {}) == (meta.get("annotations") or {}), path.name
        assert got["metadata"]["uid"] and got["metadata"]["resourceVersion"]
    names = {o["metadata"]["name"] for o in custom.list_namespaced_custom_object(GROUP, VERSION, "telco", PLURAL)["items"]}
    assert {load(p)["metadata"]["name"] for p in SAMPLE_NADS} <= names


def test_every_sample_pod_is_stored_and_pending(samples: dict[str, dict[str, Any]],
                                                core: kubernetes.client.CoreV1Api) -> None:
    assert SAMPLE_PODS
    for path in SAMPLE_PODS:
        meta = load(path)["metadata"]
        pod = core.read_namespaced_pod(meta["name"], meta["namespace"])
        # The annotation reaches the API verbatim (JSON form included): meta-cni parses it, not the server.
        assert pod.metadata.annotations[NETWORKS] == meta["annotations"][NETWORKS], path.name
        # No scheduler, no kubelet: stored, never started.
        assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_a_json_form_networks_annotation_survives_as_json(samples: dict[str, dict[str, Any]]) -> None:
    pod = samples["Pod/telco/amf-0"]
    elements = json.loads(pod["metadata"]["annotations"][NETWORKS])
    assert [e["name"] for e in elements] == ["bridge-data", "ipvlan-l3", "sriov-net"]


def test_duplicate_create_is_409_already_exists(nad_crd: dict[str, Any], namespace: str,
                                                custom: kubernetes.client.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, nad("dup", namespace))
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, nad("dup", namespace))
    assert err.value.status == 409
    assert json.loads(err.value.body)["reason"] == "AlreadyExists"


def test_replace_with_a_stale_resource_version_is_409(nad_crd: dict[str, Any], namespace: str,
                                                      custom: kubernetes.client.CustomObjectsApi) -> None:
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, nad("cas", namespace))
    stale = created["metadata"]["resourceVersion"]
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cas",
                                                    {"metadata": {"annotations": {"who": "first"}}})
    assert patched["metadata"]["resourceVersion"] != stale
    body = {**created, "spec": {"config": '{"cniVersion":"1.0.0","type":"macvlan"}'}}
    with pytest.raises(ApiException) as err:
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cas", body)
    assert err.value.status == 409
    assert json.loads(err.value.body)["reason"] == "Conflict"
    body["metadata"] = patched["metadata"]
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "cas", body)
    assert replaced["spec"]["config"] == body["spec"]["config"]


def test_the_schema_rejects_a_non_string_config(nad_crd: dict[str, Any], namespace: str,
                                                custom: kubernetes.client.CustomObjectsApi) -> None:
    body = nad("bad", namespace)
    body["spec"]["config"] = {"type": "bridge"}
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    assert err.value.status == 422 and "spec.config" in err.value.body


def test_watch_delivers_added_then_modified(nad_crd: dict[str, Any], namespace: str,
                                            custom: kubernetes.client.CustomObjectsApi) -> None:
    since = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, nad("watched", namespace))
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "watched",
                                          {"metadata": {"labels": {"step": "2"}}})
    seen: list[tuple[str, str]] = []
    # Starting from the list's resourceVersion replays both events; no second thread needed.
    watch = kubernetes.watch.Watch()
    for event in watch.stream(custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                              resource_version=since, timeout_seconds=10):
        seen.append((event["type"], event["object"]["metadata"]["name"]))
        if len(seen) == 2:
            watch.stop()
    assert seen == [("ADDED", "watched"), ("MODIFIED", "watched")]


def test_server_side_table_has_the_printer_columns(kube_cluster: KubeCluster,
                                                   samples: dict[str, dict[str, Any]]) -> None:
    response = kube_cluster.dynamic_client().request(
        "get", f"/apis/{GROUP}/{VERSION}/namespaces/telco/{PLURAL}", header_params={"Accept": TABLE},
        serialize=False)
    table = json.loads(response.data)
    assert table["kind"] == "Table"
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == ["Name", "Resource", "Age"]
    rows = {r["cells"][0]: r["cells"] for r in table["rows"]}
    assert rows["sriov-net"][1] == "example.com/sriov_vf"
    assert rows["bridge-data"][1] in (None, "")
    assert all(cells[2].endswith("s") or cells[2].endswith("m") for cells in rows.values())


def test_kubectl_get_net_attach_def_with_the_kubeconfig(kube_cluster: KubeCluster,
                                                        samples: dict[str, dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the server-side Table test covers the columns")
    p = subprocess.run([kubectl, "--kubeconfig", str(kube_cluster.kubeconfig), "get", "net-attach-def",
                        "-n", "telco"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["NAME", "RESOURCE", "AGE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["sriov-net"][1] == "example.com/sriov_vf"
    assert {load(p)["metadata"]["name"] for p in SAMPLE_NADS} == set(rows)


def test_the_kubeconfig_loads_in_the_python_client(kube_cluster: KubeCluster) -> None:
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kube_cluster.kubeconfig), client_configuration=cfg)
    assert cfg.host == kube_cluster.host
    with kubernetes.client.ApiClient(cfg) as api:
        assert kubernetes.client.VersionApi(api).get_code().git_version.startswith("v1.20.")


def test_the_plain_user_gets_403_until_rbac_grants_it(kube_cluster: KubeCluster, namespace: str,
                                                      nad_crd: dict[str, Any],
                                                      custom: kubernetes.client.CustomObjectsApi) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, nad("secret-net", namespace))
    with kube_cluster.api_client(kube_cluster.user_token) as user_api:
        as_user = kubernetes.client.CustomObjectsApi(user_api)
        for call in (lambda: as_user.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL),
                     lambda: as_user.list_cluster_custom_object(GROUP, VERSION, PLURAL),
                     lambda: kubernetes.client.CoreV1Api(user_api).list_namespace()):
            with pytest.raises(ApiException) as err:
                call()
            assert err.value.status == 403
            # Authenticated (so not 401), just not authorised.
            assert f'"{kube_cluster.user_name}"' in json.loads(err.value.body)["message"]
        # A namespaced read-only grant is honoured, and only for what it names.
        rbac = kubernetes.client.RbacAuthorizationV1Api(kube_cluster.api_client())
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "nad-reader"},
            "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "nad-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "nad-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": kube_cluster.user_name}]})
        deadline = time.monotonic() + 10
        while True:  # the RBAC authorizer learns of new bindings through an informer
            try:
                items = as_user.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
                break
            except ApiException as e:
                if e.status != 403 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert [i["metadata"]["name"] for i in items] == ["secret-net"]
        with pytest.raises(ApiException) as err:
            as_user.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "secret-net")
        assert err.value.status == 403


def test_a_kubeconfig_for_another_token_authenticates_as_that_user(kube_cluster: KubeCluster,
                                                                   tmp_path: Path) -> None:
    def may_list_nads(kubeconfig: Path) -> bool:
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        with kubernetes.client.ApiClient(cfg) as api:
            # Every authenticated user may ask about itself (system:basic-user), so this also proves who it is.
            review = kubernetes.client.AuthorizationV1Api(api).create_self_subject_access_review({"spec": {
                "resourceAttributes": {"group": GROUP, "resource": PLURAL, "verb": "list", "namespace": "telco"}}})
        return bool(review.status.allowed)

    assert may_list_nads(kube_cluster.kubeconfig)
    assert not may_list_nads(kube_cluster.kubeconfig_for(kube_cluster.user_token, tmp_path / "user.kubeconfig"))


def test_restarting_the_api_server_keeps_every_object(kube_cluster: KubeCluster,
                                                      samples: dict[str, dict[str, Any]],
                                                      custom: kubernetes.client.CustomObjectsApi,
                                                      core: kubernetes.client.CoreV1Api) -> None:
    before = custom.list_namespaced_custom_object(GROUP, VERSION, "telco", PLURAL)["items"]
    t0 = time.monotonic()
    kube_cluster.stop_apiserver()
    assert not kube_cluster.apiserver_running
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.list_namespace(_request_timeout=2)
    kube_cluster.start_apiserver()
    restart = time.monotonic() - t0
    after = custom.list_namespaced_custom_object(GROUP, VERSION, "telco", PLURAL)["items"]
    assert [(o["metadata"]["uid"], o["metadata"]["resourceVersion"], o["spec"]) for o in after] == \
        [(o["metadata"]["uid"], o["metadata"]["resourceVersion"], o["spec"]) for o in before]
    for key, obj in samples.items():
        if key.startswith("Pod/"):
            pod = core.read_namespaced_pod(obj["metadata"]["name"], obj["metadata"]["namespace"])
            assert pod.metadata.uid == obj["metadata"]["uid"]
    assert restart < 60, f"apiserver restart took {restart:.1f} s"
