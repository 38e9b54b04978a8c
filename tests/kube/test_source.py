"""KubeSource against a real kube-apiserver v1.20.2 (+ etcd, RBAC on): lookups, UID checks, NADs across
namespaces, the network-status patch through pods/status, events, the watch caches (including a re-list
after the API server restarts), and the errors for an API that is down or a token without rights."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import pytest

from meta.cni.errors import INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from meta.nad import from_nad
from meta.sources import Pod
from meta.sources.kube import NETWORK_STATUS, KubeSource, UrllibTransport
from tests.infra.kube_cluster import KubeCluster
from tests.kube.conftest import GROUP, PLURAL, VERSION

NETWORKS = "k8s.v1.cni.cncf.io/networks"
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


# --- helpers (also used by test_thin_mode.py) -----------------------------------------------------------

def unique(prefix: str = "mcks") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def core_api(cluster: KubeCluster) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(cluster.api_client())


def create_pod(cluster: KubeCluster, namespace: str, name: str, annotations: dict[str, str] | None = None,
               node: str | None = None) -> dict[str, Any]:
    """A pod as the API server stored it (it stays Pending: there is no scheduler or kubelet)."""
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations or {}},
            "spec": spec}
    # The client's methods take plain dicts as well as its models (its type hints say models only).
    obj = core_api(cluster).create_namespaced_pod(namespace, cast(Any, body))
    return cast(dict[str, Any], cluster.api_client().sanitize_for_serialization(obj))


def delete_pod(cluster: KubeCluster, namespace: str, name: str) -> None:
    # Grace 0: without a kubelet a pod bound to a node would otherwise stay Terminating for ever.
    try:
        core_api(cluster).delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise


def create_nad(cluster: KubeCluster, namespace: str, name: str, config: dict[str, Any] | str) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"config": config if isinstance(config, str) else json.dumps(config)}}
    custom = kubernetes.client.CustomObjectsApi(cluster.api_client())
    return cast(dict[str, Any], custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body))


def pod_annotations(cluster: KubeCluster, namespace: str, name: str) -> dict[str, str]:
    meta = core_api(cluster).read_namespaced_pod(name, namespace).metadata
    assert meta is not None
    return meta.annotations or {}


def pod_events(cluster: KubeCluster, namespace: str, name: str) -> list[kubernetes.client.CoreV1Event]:
    return list(core_api(cluster).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}").items)


def grant(cluster: KubeCluster, namespace: str, rules: list[dict[str, Any]]) -> None:
    """A Role with `rules` bound to the plain user in `namespace` only."""
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api_client())
    name = unique("meta-cni")
    rbac.create_namespaced_role(namespace, cast(Any, {"metadata": {"name": name}, "rules": rules}))
    rbac.create_namespaced_role_binding(namespace, cast(Any, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": cluster.user_name}]}))


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture
def cluster(kube_cluster: KubeCluster, nad_crd: dict[str, Any]) -> KubeCluster:
    return kube_cluster


@pytest.fixture
def namespace(cluster: KubeCluster) -> str:
    """A fresh namespace per test (the cluster is shared by the session; namespaces are never reused)."""
    ns = unique()
    cluster.ensure_namespace(ns)
    return ns


@pytest.fixture
def thin(cluster: KubeCluster) -> Iterator[KubeSource]:
    src = KubeSource.from_kubeconfig(str(cluster.kubeconfig), timeout=10.0)
    yield src
    src.close()


@pytest.fixture
def user_kubeconfig(cluster: KubeCluster, tmp_path: Path) -> str:
    """A kubeconfig for the plain user, who has no rights beyond what a test grants."""
    return str(cluster.kubeconfig_for(cluster.user_token, tmp_path / "user.kubeconfig"))


@pytest.fixture
def api_restored(cluster: KubeCluster) -> Iterator[KubeCluster]:
    """For tests that stop the API server: it runs again afterwards, whatever happened."""
    yield cluster
    cluster.start_apiserver()


# --- thin mode ------------------------------------------------------------------------------------------

def test_pod_lookup(cluster: KubeCluster, namespace: str, thin: KubeSource) -> None:
    stored = create_pod(cluster, namespace, "p1", {NETWORKS: "blue", "other": "x"})
    pod = thin.get_pod(namespace, "p1", stored["metadata"]["uid"])
    assert pod == Pod(namespace, "p1", stored["metadata"]["uid"])
    assert pod is not None and pod.annotations == {NETWORKS: "blue", "other": "x"}
    assert thin.get_pod(namespace, "absent") is None
    assert thin.get_pod("no-such-namespace", "p1") is None


def test_uid_mismatch_is_reported_with_the_api_uid(cluster: KubeCluster, namespace: str, thin: KubeSource) -> None:
    """Recreated under the same name: the API's UID comes back, and core refuses the stale sandbox."""
    old = create_pod(cluster, namespace, "p1")["metadata"]["uid"]
    delete_pod(cluster, namespace, "p1")
    new = create_pod(cluster, namespace, "p1")["metadata"]["uid"]
    pod = thin.get_pod(namespace, "p1", old)
    assert pod is not None and pod.uid == new != old


def test_nads_across_namespaces(cluster: KubeCluster, namespace: str, thin: KubeSource) -> None:
    other = unique()
    cluster.ensure_namespace(other)
    create_nad(cluster, namespace, "blue", {"cniVersion": "1.0.0", "type": "bridge", "bridge": "mcksx"})
    create_nad(cluster, other, "green", {"cniVersion": "1.0.0", "plugins": [{"type": "macvlan", "master": "eth0"}]})
    blue = thin.get_nad(namespace, "blue")
    green = thin.get_nad(other, "green")
    assert blue is not None and green is not None
    assert blue["kind"] == "NetworkAttachmentDefinition" and blue["apiVersion"] == f"{GROUP}/{VERSION}"
    assert blue["metadata"]["namespace"] == namespace and green["metadata"]["namespace"] == other
    assert "managedFields" not in blue["metadata"]
    # What the planner does with it: the same as with a NAD from a manifest.
    assert from_nad(blue, Path("/nonexistent"), "1.0.0").plugins[0]["bridge"] == "mcksx"
    assert from_nad(green, Path("/nonexistent"), "1.0.0").plugins[0]["type"] == "macvlan"
    assert thin.get_nad(namespace, "green") is None


def test_status_lands_on_the_pod_and_is_removed(cluster: KubeCluster, namespace: str, thin: KubeSource) -> None:
    stored = create_pod(cluster, namespace, "p1", {"keep": "me"})
    thin.get_pod(namespace, "p1", stored["metadata"]["uid"])
    status = [{"name": "cluster", "interface": "eth0", "ips": ["10.242.0.5"], "mac": "0a:58:0a:f2:00:05",
               "default": True, "dns": {}},
              {"name": f"{namespace}/blue", "interface": "net1", "ips": ["10.242.1.5"], "default": False, "dns": {}}]
    thin.publish_status(namespace, "p1", status)
    ann = pod_annotations(cluster, namespace, "p1")
    assert json.loads(ann[NETWORK_STATUS]) == status and ann["keep"] == "me"
    thin.publish_status(namespace, "p1", None)
    assert pod_annotations(cluster, namespace, "p1") == {"keep": "me"}
    thin.publish_status(namespace, "gone", None)  # a pod that is already gone is not an error
    thin.publish_status(namespace, "gone", status)


def test_status_is_not_written_on_a_recreated_pod(cluster: KubeCluster, namespace: str, thin: KubeSource) -> None:
    create_pod(cluster, namespace, "p1")
    assert thin.get_pod(namespace, "p1") is not None  # remembers that UID
    delete_pod(cluster, namespace, "p1")
    create_pod(cluster, namespace, "p1")
    thin.publish_status(namespace, "p1", [{"name": "old", "default": True}])
    assert NETWORK_STATUS not in pod_annotations(cluster, namespace, "p1")


def test_clearing_with_an_old_uid_keeps_the_new_pods_status(cluster: KubeCluster, namespace: str,
                                                           thin: KubeSource) -> None:
    """The DEL of an old sandbox names the old pod's UID: the namesake's status stays."""
    old = create_pod(cluster, namespace, "p1")["metadata"]["uid"]
    delete_pod(cluster, namespace, "p1")
    new = create_pod(cluster, namespace, "p1")["metadata"]["uid"]
    thin.publish_status(namespace, "p1", [{"name": "new", "default": True}], new)
    thin.publish_status(namespace, "p1", None, old)
    assert json.loads(pod_annotations(cluster, namespace, "p1")[NETWORK_STATUS]) == [{"name": "new", "default": True}]
    thin.publish_status(namespace, "p1", None, new)
    assert NETWORK_STATUS not in pod_annotations(cluster, namespace, "p1")


def test_status_needs_only_the_pods_status_right(cluster: KubeCluster, namespace: str, user_kubeconfig: str) -> None:
    """As with Multus, RBAC grants `patch pods/status`, not pod updates."""
    grant(cluster, namespace, [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                               {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]}])
    create_pod(cluster, namespace, "p1")
    with KubeSource.from_kubeconfig(user_kubeconfig, timeout=10.0) as src:
        assert src.get_pod(namespace, "p1") is not None
        src.publish_status(namespace, "p1", [{"name": "x", "default": True}])
        assert json.loads(pod_annotations(cluster, namespace, "p1")[NETWORK_STATUS]) == [{"name": "x", "default": True}]
        src.publish_status(namespace, "p1", None)
        assert NETWORK_STATUS not in pod_annotations(cluster, namespace, "p1")


def test_event_recorded_on_the_pod(cluster: KubeCluster, namespace: str, thin: KubeSource) -> None:
    stored = create_pod(cluster, namespace, "p1")
    pod = thin.get_pod(namespace, "p1")
    assert pod is not None
    thin.record_event(pod, "Warning", "AttachmentFailed", "network blue: no such NAD")
    (ev,) = pod_events(cluster, namespace, "p1")
    assert (ev.type, ev.reason, ev.message) == ("Warning", "AttachmentFailed", "network blue: no such NAD")
    assert ev.involved_object.kind == "Pod" and ev.involved_object.uid == stored["metadata"]["uid"]
    assert ev.source is not None and ev.source.component == "meta-cni" and ev.count == 1
    assert ev.first_timestamp is not None and ev.last_timestamp is not None


def test_try_again_later_while_the_api_is_stopped(cluster: KubeCluster, namespace: str,
                                                  api_restored: KubeCluster) -> None:
    create_pod(cluster, namespace, "p1")
    src = KubeSource.from_kubeconfig(str(cluster.kubeconfig), timeout=2.0)
    assert src.problem() is None
    cluster.stop_apiserver()
    with pytest.raises(CNIError) as e:
        src.get_pod(namespace, "p1")
    assert e.value.code == TRY_AGAIN_LATER
    assert cluster.host in e.value.msg and f"pod {namespace}/p1" in e.value.msg
    assert "gave up after" in e.value.msg and "try again later" in e.value.msg
    with pytest.raises(CNIError) as e:
        KubeSource.from_kubeconfig(str(cluster.kubeconfig), timeout=2.0).get_nad(namespace, "blue")
    assert e.value.code == TRY_AGAIN_LATER and f"NetworkAttachmentDefinition {namespace}/blue" in e.value.msg
    problem = KubeSource.from_kubeconfig(str(cluster.kubeconfig), timeout=2.0).problem()
    assert problem is not None and cluster.host in problem
    # Events are best effort: no exception, whatever the API does.
    src.record_event(Pod(namespace, "p1", None), "Warning", "AttachmentFailed", "x")
    cluster.start_apiserver()
    assert src.get_pod(namespace, "p1") is not None, "the same source recovers"


def test_forbidden_names_the_missing_permission(cluster: KubeCluster, namespace: str, user_kubeconfig: str) -> None:
    create_pod(cluster, namespace, "p1")
    with KubeSource.from_kubeconfig(user_kubeconfig, timeout=10.0) as src:
        with pytest.raises(CNIError) as e:
            src.get_pod(namespace, "p1")
        assert e.value.code == INVALID_CONFIG
        assert f"lacks the permission to get pods in namespace {namespace}" in e.value.msg
        assert user_kubeconfig in e.value.msg and cluster.user_name in e.value.details
        with pytest.raises(CNIError) as e:
            src.get_nad(namespace, "blue")
        assert e.value.code == INVALID_CONFIG
        assert f"get network-attachment-definitions.k8s.cni.cncf.io in namespace {namespace}" in e.value.msg
        with pytest.raises(CNIError) as e:
            src.publish_status(namespace, "p1", [])
        assert e.value.code == INVALID_CONFIG and f"patch pods/status in namespace {namespace}" in e.value.msg
        # Events are best effort: a missing right is logged, not raised.
        src.record_event(Pod(namespace, "p1", None), "Warning", "AttachmentFailed", "x")
        assert pod_events(cluster, namespace, "p1") == []


def test_rejected_token(cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    bad = str(cluster.kubeconfig_for("not-a-token", tmp_path / "bad.kubeconfig"))
    with KubeSource.from_kubeconfig(bad, timeout=10.0) as src:
        with pytest.raises(CNIError) as e:
            src.get_pod(namespace, "p1")
        assert e.value.code == INVALID_CONFIG and "401 Unauthorized" in e.value.msg and bad in e.value.msg
        problem = src.problem()
        assert problem is not None and "401" in problem


# --- watch mode -----------------------------------------------------------------------------------------

@pytest.fixture
def node() -> str:
    return unique("mcks-node")


@pytest.fixture
def watching(cluster: KubeCluster, node: str) -> Iterator[KubeSource]:
    src = KubeSource.watching(str(cluster.kubeconfig), node, timeout=5.0)
    yield src
    src.close()


def in_cache(src: KubeSource, kind: str, namespace: str, name: str) -> bool:
    return src.caches[kind].store.get(namespace, name) is not None


def test_watch_caches_follow_the_api(cluster: KubeCluster, namespace: str, node: str, watching: KubeSource) -> None:
    create_pod(cluster, namespace, "before", node=node)
    create_nad(cluster, namespace, "before", {"cniVersion": "1.0.0", "type": "bridge"})
    wait_for(watching.ready, what="initial lists")
    assert set(watching.cache_ages()) == {"pods", "nads"}
    assert watching.problem() is None
    wait_for(lambda: in_cache(watching, "pods", namespace, "before") and in_cache(watching, "nads", namespace, "before"),
             what="objects created before the watch")

    mine = create_pod(cluster, namespace, "mine", {NETWORKS: "blue"}, node=node)
    create_pod(cluster, namespace, "elsewhere", node=unique("mcks-node"))
    create_nad(cluster, namespace, "blue", {"cniVersion": "1.0.0", "type": "bridge"})
    wait_for(lambda: in_cache(watching, "pods", namespace, "mine"), what="new pod in the cache")
    wait_for(lambda: in_cache(watching, "nads", namespace, "blue"), what="new NAD in the cache")
    assert not in_cache(watching, "pods", namespace, "elsewhere"), "only the node's pods are watched"

    pod = watching.get_pod(namespace, "mine", mine["metadata"]["uid"])
    assert pod is not None and pod.annotations[NETWORKS] == "blue"
    blue = watching.get_nad(namespace, "blue")
    assert blue is not None and blue["metadata"]["name"] == "blue"
    # Not on this node, so not cached: a GET answers.
    assert watching.get_pod(namespace, "elsewhere") is not None

    delete_pod(cluster, namespace, "mine")
    wait_for(lambda: not in_cache(watching, "pods", namespace, "mine"), what="deleted pod leaving the cache")
    assert watching.get_pod(namespace, "mine") is None


def test_watch_uid_mismatch_asks_the_api(cluster: KubeCluster, namespace: str, node: str,
                                         watching: KubeSource) -> None:
    """A cached pod with another UID than the runtime's (the watch lagging behind a recreation)."""
    real = create_pod(cluster, namespace, "p1", node=node)["metadata"]["uid"]
    wait_for(lambda: in_cache(watching, "pods", namespace, "p1"), what="pod in the cache")
    store = watching.caches["pods"].store
    with store.lock:  # make the cache stale on purpose, deterministically
        store.objects[(namespace, "p1")] = Pod(namespace, "p1", "stale-uid")
    pod = watching.get_pod(namespace, "p1", real)
    assert pod is not None and pod.uid == real
    stale = watching.get_pod(namespace, "p1")
    assert stale is not None and stale.uid == "stale-uid", "without a UID to check, the cache answers"


def test_watch_events_are_posted_in_the_background(cluster: KubeCluster, namespace: str, node: str,
                                                   watching: KubeSource) -> None:
    uid = create_pod(cluster, namespace, "p1", node=node)["metadata"]["uid"]
    pod = Pod(namespace, "p1", uid)
    watching.record_event(pod, "Warning", "AttachmentFailed", "boom")
    (ev,) = wait_for(lambda: pod_events(cluster, namespace, "p1"), what="event")
    assert ev.count == 1 and ev.involved_object.uid == uid
    watching.record_event(pod, "Warning", "AttachmentFailed", "boom")
    wait_for(lambda: [e.count for e in pod_events(cluster, namespace, "p1")] == [2], what="aggregated event")


@pytest.fixture
def short_watches(cluster: KubeCluster, node: str) -> Iterator[KubeSource]:
    """A watching source whose watches the server ends every few seconds: kube-apiserver 1.20 waits for open
    watches before it exits on SIGTERM, which would hold stop_apiserver() up for the fixture's 20 s."""
    src = KubeSource(UrllibTransport.from_kubeconfig(str(cluster.kubeconfig)), 5.0, "test kubeconfig", thin=False,
                     host_name=node)
    src.start_watches(node, watch_timeout=(2, 3))
    yield src
    src.close()


def test_watch_relists_after_the_api_server_restarts(cluster: KubeCluster, namespace: str, node: str,
                                                     short_watches: KubeSource, api_restored: KubeCluster) -> None:
    watching = short_watches
    create_nad(cluster, namespace, "old", {"cniVersion": "1.0.0", "type": "bridge"})
    wait_for(lambda: in_cache(watching, "nads", namespace, "old"), what="NAD in the cache")
    lists = {kind: c.lists for kind, c in watching.caches.items()}
    # Writes the caches do not see move etcd past their resourceVersions, which the restarted API server's
    # own watch cache then no longer serves: resuming the watch gets 410 Gone.
    core_api(cluster).create_namespaced_config_map(namespace, cast(Any, {"metadata": {"name": "bump"}}))

    cluster.stop_apiserver()
    # Meanwhile lookups are answered from the caches.
    assert watching.get_nad(namespace, "old") is not None
    with pytest.raises(CNIError) as e:
        watching.get_nad(namespace, "absent")  # a miss needs the API
    assert e.value.code == TRY_AGAIN_LATER
    cluster.start_apiserver()

    create_nad(cluster, namespace, "new", {"cniVersion": "1.0.0", "type": "bridge"})
    create_pod(cluster, namespace, "new", node=node)
    wait_for(lambda: in_cache(watching, "nads", namespace, "new"), what="NAD created after the restart")
    wait_for(lambda: in_cache(watching, "pods", namespace, "new"), what="pod created after the restart")
    assert in_cache(watching, "nads", namespace, "old")
    assert all(watching.caches[k].lists > n for k, n in lists.items()), "re-listed after the restart"
    assert watching.ready() and watching.problem() is None


def test_watch_without_rights_is_not_ready(cluster: KubeCluster, namespace: str, user_kubeconfig: str) -> None:
    with KubeSource.watching(user_kubeconfig, None, timeout=5.0) as src:
        wait_for(lambda: all(c.last_error for c in src.caches.values()), what="list errors")
        assert not src.ready()
        problem = src.problem()
        assert problem is not None and "list pods in all namespaces" in problem
        assert f"list {'network-attachment-definitions.k8s.cni.cncf.io'} in all namespaces" in problem
