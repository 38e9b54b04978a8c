"""`metactl webhook` registered with a real kube-apiserver v1.20.2: the sample ValidatingWebhookConfiguration's
webhook, pointed at the process on 127.0.0.1 with a CA made by samples/deploy/webhook-certs.sh (openssl), makes
the API server refuse invalid NADs with the webhook's message and store valid ones."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import kubernetes.client
import pytest
import yaml
from kubernetes.client import ApiException

from meta import lint
from tests.deploy.manifests import CRDS, DEPLOY, one
from tests.infra.kube_cluster import KubeCluster
from tests.kube.conftest import GROUP, PLURAL, VERSION, nad

METACTL = Path(sys.prefix) / "bin" / "metactl"
HOOK = "network-attachment-definitions.meta-cni.dev"
SAMPLE_NADS = sorted((DEPLOY.parent / "nads").glob("*.yaml"))


@attrs.define
class Webhook:
    url: str
    ca: Path
    proc: subprocess.Popen[str]
    log: list[str]


def _drain(proc: subprocess.Popen[str], log: list[str]) -> None:
    # The webhook logs every review: an unread pipe would fill up and block it mid-review.
    assert proc.stderr is not None
    log.extend(proc.stderr)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    certs = tmp_path_factory.mktemp("webhook-certs")
    subprocess.run(["sh", str(DEPLOY / "webhook-certs.sh"), str(certs), "IP:127.0.0.1"], check=True,
                   capture_output=True)
    # Port 0: the kernel picks a free port and the webhook names it, so there is no race for a port.
    proc = subprocess.Popen([str(METACTL), "webhook", "--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key"),
                             "--address", "127.0.0.1", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "on https://127.0.0.1:" in first, first
        log = [first]
        threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
        yield Webhook(url=first.split(" on ", 1)[1].strip(), ca=certs / "ca.crt", proc=proc, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def namespace(kube_cluster: KubeCluster) -> str:
    # Left behind at the end: without a controller-manager a deleted namespace would only stay Terminating.
    name = f"wh-{uuid.uuid4().hex[:8]}"
    kube_cluster.ensure_namespace(name)
    return name


def _denied_by_us(e: ApiException) -> bool:
    return e.status == 422 and f'admission webhook "{HOOK}" denied the request' in json.loads(e.body or "{}").get("message", "")


@pytest.fixture(scope="module")
def registered(kube_cluster: KubeCluster, webhook: Webhook, custom: kubernetes.client.CustomObjectsApi,
               namespace: str) -> Iterator[dict[str, Any]]:
    """The sample's ValidatingWebhookConfiguration, but calling our process by URL with our CA.

    It is cluster-wide and fails closed: it is deleted at the end (before the process stops), or it would
    refuse every NAD write of the tests that run after this module.
    """
    kube_cluster.apply(CRDS)
    vwc = one("ValidatingWebhookConfiguration")
    vwc["metadata"] = {"name": f"meta-cni-nad-validation-test-{uuid.uuid4().hex[:6]}"}
    (hook,) = vwc["webhooks"]
    assert hook["name"] == HOOK
    hook["clientConfig"] = {"url": f"{webhook.url}", "caBundle": base64.b64encode(webhook.ca.read_bytes()).decode()}
    api = kubernetes.client.AdmissionregistrationV1Api(kube_cluster.api_client())
    api.create_validating_webhook_configuration(vwc)
    try:
        # The API server picks the configuration up through its own watch: wait until a (dry-run) invalid NAD
        # is refused by us. Bounded, and only a wait: no test asserts how long it took.
        deadline = time.monotonic() + 60
        probe = nad("probe", namespace, "{")
        while True:
            try:
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, probe, dry_run="All")
            except ApiException as e:
                if _denied_by_us(e):
                    break
                raise
            assert time.monotonic() < deadline, "the webhook configuration never took effect"
            time.sleep(0.2)
        yield vwc
    finally:
        api.delete_validating_webhook_configuration(vwc["metadata"]["name"])


BAD = {
    "not-json": ('{"cniVersion": "1.0.0", "type": ', ["spec.config is not valid JSON"]),
    "path-type": ('{"cniVersion": "1.0.0", "type": "../../bin/sh"}', ["type: '../../bin/sh' does not match"]),
    "bad-mode": (('{"cniVersion": "1.0.0", "type": "macvlan", "mode": "sideways", "mtu": "big", '
                  '"ipam": {"type": "host-local", "subnet": "10.9.0.0/24", "gateway": "10.8.0.1"}}'),
                 ["mode: 'sideways' is not one of", "mtu: 'big' is not of type 'integer'",
                  "ipam.gateway: 10.8.0.1 is outside subnet 10.9.0.0/24"]),
    "untyped-plugin": ('{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}, {"mtu": 1500}]}',
                       ["plugins[1]: 'type' is a required property"]),
    "runtime-key": ('{"cniVersion": "1.0.0", "type": "bridge", "runtimeConfig": {"mac": "x"}}', ["runtimeConfig"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_invalid_nad_is_refused_with_every_problem(registered: dict[str, Any], custom: kubernetes.client.CustomObjectsApi,
                                                   namespace: str, name: str) -> None:
    config, texts = BAD[name]
    obj = nad(name, namespace, config)
    with pytest.raises(ApiException) as e:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    assert _denied_by_us(e.value)
    message = json.loads(e.value.body or "{}")["message"]
    prefix = f'admission webhook "{HOOK}" denied the request: NetworkAttachmentDefinition {namespace}/{name}: '
    assert message.startswith(prefix), message
    for text in texts:
        assert text in message
    # Word for word what `metactl validate` says about the same object.
    assert message[len(prefix):] == "; ".join(lint.nad_problems(obj)[1])
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert gone.value.status == 404


@pytest.mark.parametrize("path", SAMPLE_NADS, ids=lambda p: p.name)
def test_sample_nads_are_stored(registered: dict[str, Any], custom: kubernetes.client.CustomObjectsApi,
                                namespace: str, path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    obj["metadata"]["namespace"] = namespace
    stored = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    assert stored["spec"] == obj["spec"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj["metadata"]["name"])


def test_update_to_invalid_is_refused_and_delete_allowed(registered: dict[str, Any],
                                                         custom: kubernetes.client.CustomObjectsApi,
                                                         namespace: str, webhook: Webhook) -> None:
    good = nad("edited", namespace, '{"cniVersion": "1.0.0", "type": "bridge", "bridge": "br7"}')
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, good)
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edited",
                                              {"spec": {"config": '{"cniVersion": "1.0.0", "type": "bridge", "mtu": -1}'}})
    assert _denied_by_us(e.value)
    assert "bridge: mtu:" in json.loads(e.value.body or "{}")["message"]
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edited")
    assert stored["spec"] == good["spec"]
    # A label change of a valid NAD passes the webhook as well.
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edited", {"metadata": {"labels": {"a": "b"}}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edited")
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "edited")
    assert gone.value.status == 404
    # The reviews really went through the process (its log names each decision).
    assert any(f"CREATE {namespace}/edited: allowed" in line for line in webhook.log)
    assert any(f"UPDATE {namespace}/edited: NetworkAttachmentDefinition" in line for line in webhook.log)
