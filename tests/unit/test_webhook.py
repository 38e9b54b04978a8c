"""The admission webhook's review logic: AdmissionReview v1 in, AdmissionReview v1 out, lint's checks."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta import lint, webhook

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def nad(name: str, config: str | None, namespace: str | None = "ns1", **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, **meta}
    if namespace:
        metadata["namespace"] = namespace
    obj: dict[str, Any] = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition", "metadata": metadata}
    if config is not None:
        obj["spec"] = {"config": config}
    return obj


def request(operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None = None, *, uid: str = "uid-1",
            namespace: str = "ns1", resource: str = "network-attachment-definitions") -> dict[str, Any]:
    name = ((obj or old or {}).get("metadata") or {}).get("name", "")
    return {
        "uid": uid,
        "kind": {"group": "k8s.cni.cncf.io", "version": "v1", "kind": "NetworkAttachmentDefinition"},
        "resource": {"group": "k8s.cni.cncf.io", "version": "v1", "resource": resource},
        "requestKind": {"group": "k8s.cni.cncf.io", "version": "v1", "kind": "NetworkAttachmentDefinition"},
        "requestResource": {"group": "k8s.cni.cncf.io", "version": "v1", "resource": resource},
        "name": name,
        "namespace": namespace,
        "operation": operation,
        "userInfo": {"username": "tester", "groups": ["system:authenticated"]},
        "object": obj,
        "oldObject": old,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }


def answer(req: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}).encode()
    out = webhook.review(body)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == req["uid"]
    # The API server decodes the answer strictly enough that it must survive a JSON round trip.
    return json.loads(json.dumps(out))["response"]


GOOD = '{"cniVersion": "1.0.0", "type": "bridge", "bridge": "br9", "ipam": {"type": "host-local", "subnet": "10.9.0.0/24"}}'
META_IPAM_BAD = ('{"cniVersion": "1.0.0", "type": "macvlan", "master": "eth0", "ipam": {"type": "meta-ipam", '
                 '"range": "10.232.0.0/24", "gateway": "10.232.9.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.232.0.7"}]}}')
BAD_MODE = ('{"cniVersion": "1.0.0", "type": "macvlan", "mode": "sideways", "mtu": "big", '
            '"ipam": {"type": "host-local", "subnet": "10.9.0.0/24", "gateway": "10.8.0.1"}}')


def test_valid_nad_is_allowed_and_uid_echoed() -> None:
    resp = answer(request("CREATE", nad("plain", GOOD), uid="705ab4f5-6393-11e8-b7cc-42010a800002"))
    assert resp == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


@pytest.mark.parametrize("config, field", [
    ('{"cniVersion": "1.0.0", "type": ', "spec.config is not valid JSON"),
    ('{"cniVersion": "1.0.0", "type": "../../bin/sh"}', "type"),
    ('{"cniVersion": "1.0.0", "name": "x", "plugins": []}', "plugins"),
    ('{"cniVersion": "9.9.9", "type": "bridge"}', "cniVersion"),
    ('{"cniVersion": "1.0.0", "type": "bridge", "runtimeConfig": {}}', "runtimeConfig"),
])
def test_invalid_nad_is_denied_naming_object_and_field(config: str, field: str) -> None:
    resp = answer(request("CREATE", nad("broken", config)))
    assert resp["allowed"] is False
    status = resp["status"]
    assert status["code"] == 422 and status["reason"] == "Invalid" and status["status"] == "Failure"
    assert status["message"].startswith("NetworkAttachmentDefinition ns1/broken: ")
    assert field in status["message"]


def test_every_problem_is_listed() -> None:
    resp = answer(request("CREATE", nad("bad-mode", BAD_MODE)))
    message = resp["status"]["message"]
    for text in ("mode", "mtu", "gateway: 10.8.0.1 is outside subnet 10.9.0.0/24"):
        assert text in message, message
    assert message.count("; ") >= 2


def test_a_meta_ipam_config_error_is_denied_naming_the_field() -> None:
    resp = answer(request("CREATE", nad("bad-pool", META_IPAM_BAD)))
    assert resp["allowed"] is False
    assert resp["status"]["message"] == ("NetworkAttachmentDefinition ns1/bad-pool: macvlan: ipam.gateway: "
                                         "10.232.9.1 is in none of the ranges")


def _lint_problems(obj: dict[str, Any], tmp_path: Path) -> list[str]:
    f = tmp_path / f"{obj['metadata']['name']}.yaml"
    f.write_text(yaml.safe_dump(obj))
    problems, count = lint.validate([f])
    assert count == 1
    return [p.message for p in problems]


@pytest.mark.parametrize("obj", [
    nad("bad-mode", BAD_MODE),
    nad("evil", '{"cniVersion": "1.0.0", "type": "../../bin/sh"}'),
    nad("not-json", '{"cniVersion": "1.0.0", "type": '),
    nad("no-type", '{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}, {"mtu": 1}]}'),
    nad("plain", GOOD),
    nad("meta-ipam", META_IPAM_BAD),
    nad("meta-ipam-ok", META_IPAM_BAD.replace("10.232.9.1", "10.232.0.1").replace("10.232.0.7", "10.232.0.1")),
    nad("on-node", ""),
    nad("with-extra", GOOD, annotations={"k8s.v1.cni.cncf.io/resourceName": "example.com/vf"}),
], ids=lambda o: o["metadata"]["name"])
def test_same_checks_as_metactl_validate(obj: dict[str, Any], tmp_path: Path) -> None:
    expected = _lint_problems(obj, tmp_path)
    resp = answer(request("CREATE", obj))
    if not expected:
        assert resp["allowed"] is True
    else:
        assert resp["allowed"] is False
        ref = f"NetworkAttachmentDefinition {obj['metadata']['namespace']}/{obj['metadata']['name']}: "
        assert resp["status"]["message"] == ref + "; ".join(expected)


@pytest.mark.parametrize("path", sorted((SAMPLES / "nads").glob("*.yaml")), ids=lambda p: p.name)
def test_sample_nads_are_admitted(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert answer(request("CREATE", obj, namespace=obj["metadata"]["namespace"]))["allowed"] is True


def test_namespace_comes_from_the_request_when_the_object_has_none() -> None:
    resp = answer(request("CREATE", nad("broken", '{"type": 1}', namespace=None), namespace="team-a"))
    assert resp["status"]["message"].startswith("NetworkAttachmentDefinition team-a/broken: ")


def test_delete_is_always_allowed() -> None:
    old = nad("broken", '{"type": ')
    assert answer(request("DELETE", None, old)) == {"uid": "uid-1", "allowed": True}


def test_other_resources_are_not_judged() -> None:
    req = request("CREATE", {"kind": "ConfigMap"}, resource="configmaps")
    req["resource"]["group"] = req["kind"]["group"] = ""
    assert answer(req)["allowed"] is True


def test_update_to_an_invalid_nad_is_denied() -> None:
    resp = answer(request("UPDATE", nad("n", '{"cniVersion": "1.0.0", "type": "bridge", "mtu": -5}'), nad("n", GOOD)))
    assert resp["allowed"] is False
    assert "mtu" in resp["status"]["message"]


def test_update_that_adds_no_problem_to_a_legacy_invalid_nad_is_allowed_with_warnings() -> None:
    old = nad("legacy", BAD_MODE)
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"team": "a"}
    resp = answer(request("UPDATE", new, old))
    assert resp["allowed"] is True
    assert any("gateway: 10.8.0.1 is outside subnet" in w for w in resp["warnings"])
    assert all(w.startswith("NetworkAttachmentDefinition ns1/legacy: ") for w in resp["warnings"])


def test_update_that_adds_a_problem_to_a_legacy_invalid_nad_is_denied() -> None:
    old = nad("legacy", BAD_MODE)
    worse = nad("legacy", BAD_MODE.replace('"type": "macvlan"', '"type": "macvlan", "runtimeConfig": {}'))
    resp = answer(request("UPDATE", worse, old))
    assert resp["allowed"] is False
    assert "runtimeConfig" in resp["status"]["message"]


def test_update_of_a_nad_being_deleted_is_allowed() -> None:
    old = nad("going", BAD_MODE, finalizers=["example.com/hold"])
    new = copy.deepcopy(old)
    new["metadata"].update(finalizers=[], deletionTimestamp="2024-01-01T00:00:00Z")
    new["spec"]["config"] = "{"
    assert answer(request("UPDATE", new, old))["allowed"] is True


@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"[]",
    json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u", "operation": "CREATE"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "Status", "request": {"uid": "u", "operation": "CREATE"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": "x"}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"operation": "CREATE"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 5, "operation": "CREATE"}}).encode(),
    json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u"}}).encode(),
    b"[" * 100000,
])
def test_malformed_reviews_are_rejected(body: bytes) -> None:
    with pytest.raises(webhook.BadReview):
        webhook.review(body)


@pytest.mark.parametrize("obj", [None, "text", 5, [], {"metadata": "x"}, {"apiVersion": "v1", "kind": "Pod"}],
                         ids=repr)
def test_create_of_a_non_object_is_denied_not_crashed(obj: object) -> None:
    req = request("CREATE", None)
    req["object"] = obj
    resp = answer(req)
    assert resp["allowed"] is False
    assert resp["status"]["message"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
CONFIG_KEYS = st.sampled_from(["cniVersion", "name", "type", "plugins", "ipam", "mtu", "mode", "capabilities",
                               "runtimeConfig", "bridge", "master", "subnet", "ranges", "dns", "args"])
CONFIGS = st.recursive(JSON, lambda inner: st.dictionaries(CONFIG_KEYS, inner, max_size=5) | st.lists(inner, max_size=2),
                       max_leaves=16)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=CONFIGS, meta=st.dictionaries(st.sampled_from(["name", "namespace", "annotations", "labels"]), JSON),
       spec=st.one_of(st.none(), JSON), operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"]))
def test_any_object_gets_an_answer(config: object, meta: dict[str, Any], spec: object, operation: str) -> None:
    # Whatever a client stores, the webhook answers (a crash would fail the write as "failed calling webhook").
    obj: dict[str, Any] = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition", "metadata": meta,
                           "spec": {"config": json.dumps(config)} if spec is None else spec}
    resp = answer(request(operation, obj, obj))
    assert isinstance(resp["allowed"], bool)
    if not resp["allowed"]:
        assert resp["status"]["message"].startswith("NetworkAttachmentDefinition ")
