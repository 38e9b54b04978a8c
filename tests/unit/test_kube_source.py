"""The Kubernetes source without a cluster: object parsing, the request budget and retries (fake clock),
error mapping, status patches, events, and the watch caches driven by a scripted transport."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from meta.cni.errors import INTERNAL, INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from meta.sources import Pod
from meta.sources import kube
from meta.sources.kube import (NETWORK_STATUS, Action, Api, Gone, KubeSource, Store, Unreachable, event_body,
                               iter_lines, nad_from_object, pod_from_object, status_patch)

HOST = "https://api.test:6443"
POD_ACTION = Action("get", "pods", "default", "pod default/p1")


# --- fakes ----------------------------------------------------------------------------------------------

class FakeResponse:
    def __init__(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None,
                 stream: queue.Queue[bytes | None] | None = None) -> None:
        self.status = status
        self.headers = dict(headers or {})
        self._data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        self._stream = stream
        self.closed = threading.Event()

    def read(self) -> bytes:
        return self._data

    def lines(self) -> Iterator[bytes]:
        assert self._stream is not None
        while not self.closed.is_set():
            try:
                line = self._stream.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:  # the server ended the watch
                return
            yield line
        raise Unreachable("connection closed")

    def close(self) -> None:
        self.closed.set()


Handler = Callable[[str, str, dict[str, str], Any, "tuple[float, float]"], FakeResponse]


class FakeTransport:
    """Answers requests with `handler`; records them. A handler may raise Unreachable."""

    host = HOST

    def __init__(self, handler: Handler, clock: FakeClock | None = None) -> None:
        self.handler = handler
        self.clock = clock
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: bytes | None = None,
                content_type: str | None = None, timeout: tuple[float, float]) -> FakeResponse:
        parsed = json.loads(body) if body else None
        with self.lock:
            self.requests.append({"method": method, "path": path, "query": dict(query or {}), "body": parsed,
                                  "content_type": content_type, "timeout": timeout,
                                  "at": self.clock.now if self.clock else None})
        return self.handler(method, path, dict(query or {}), parsed, timeout)

    def close(self) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def thin_source(handler: Handler, timeout: float = 10.0, clock: FakeClock | None = None) -> KubeSource:
    clock = clock or FakeClock()
    src = KubeSource(FakeTransport(handler, clock), timeout, "kubeconfig /k.yaml", thin=True, host_name="node1")
    src.api.clock = clock
    src.api.sleep = clock.sleep
    return src


def pod_obj(name: str = "p1", ns: str = "default", uid: str = "u1", annotations: dict[str, str] | None = None,
            rv: str = "10") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": "node1"}}


def nad_obj(name: str = "n1", ns: str = "default", config: str = '{"type": "bridge"}', rv: str = "10") -> dict[str, Any]:
    return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": ns, "uid": f"nad-{name}", "resourceVersion": rv,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"config": config}}


def status_body(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


# --- object parsing -------------------------------------------------------------------------------------

def test_pod_from_object() -> None:
    pod = pod_from_object(pod_obj(annotations={"a": "b"}))
    assert pod == Pod("default", "p1", "u1") and pod.annotations == {"a": "b"}
    assert pod_from_object(pod_obj(uid="")).uid is None


@pytest.mark.parametrize("mutate, field", [
    (lambda o: o["metadata"].update(annotations={"a": 1}), "metadata.annotations"),
    (lambda o: o["metadata"].update(annotations=["x"]), "metadata.annotations"),
    (lambda o: o["metadata"].update(uid=5), "metadata.uid"),
    (lambda o: o["metadata"].pop("name"), "metadata.name"),
    (lambda o: o.update(metadata="x"), "metadata must be an object"),
])
def test_malformed_pod_names_object_and_field(mutate: Callable[[dict[str, Any]], Any], field: str) -> None:
    obj = pod_obj()
    mutate(obj)
    with pytest.raises(CNIError) as e:
        pod_from_object(obj, "pod default/p1")
    assert e.value.code == INVALID_CONFIG
    assert "pod default/p1" in e.value.msg and field in e.value.msg


def test_nad_from_object_is_the_manifest_shape() -> None:
    obj = nad_obj()
    obj["metadata"]["annotations"] = {"k8s.v1.cni.cncf.io/resourceName": "r"}
    out = nad_from_object(obj)
    assert out == {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                   "metadata": {"name": "n1", "namespace": "default", "uid": "nad-n1", "resourceVersion": "10",
                                "annotations": {"k8s.v1.cni.cncf.io/resourceName": "r"}},
                   "spec": {"config": '{"type": "bridge"}'}}
    out["spec"]["config"] = "changed"
    assert obj["spec"]["config"] == '{"type": "bridge"}', "the result must not share state with the input"


def test_malformed_nad_names_object_and_field() -> None:
    obj = nad_obj()
    obj["spec"] = "nope"
    with pytest.raises(CNIError) as e:
        nad_from_object(obj)
    assert e.value.code == INVALID_CONFIG and "NetworkAttachmentDefinition default/n1" in e.value.msg
    assert "spec must be an object" in e.value.msg


def test_status_patch() -> None:
    status = [{"name": "default/n1", "interface": "net1", "ips": ["10.0.0.2"], "default": False}]
    patch = status_patch(status)
    assert set(patch) == {"metadata"} and set(patch["metadata"]) == {"annotations"}
    assert json.loads(patch["metadata"]["annotations"][NETWORK_STATUS]) == status
    assert status_patch(None) == {"metadata": {"annotations": {NETWORK_STATUS: None}}}
    assert status_patch(status, "u1")["metadata"]["uid"] == "u1"


def test_event_body() -> None:
    ev = event_body(Pod("ns1", "p1", "u1"), "Warning", "AttachmentFailed", "x" * 5000, "node1", 0.0)
    assert ev["metadata"]["namespace"] == "ns1" and ev["metadata"]["name"].startswith("p1.")
    assert ev["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "ns1", "name": "p1", "uid": "u1"}
    assert ev["type"] == "Warning" and ev["reason"] == "AttachmentFailed"
    assert ev["source"] == {"component": "meta-cni", "host": "node1"}
    assert ev["count"] == 1 and ev["firstTimestamp"] == ev["lastTimestamp"] == "1970-01-01T00:00:00Z"
    assert len(ev["message"]) == kube.EVENT_MESSAGE_MAX and ev["message"].endswith("...")
    assert "uid" not in event_body(Pod("ns1", "p1", None), "Normal", "R", "m", "h", 0.0)["involvedObject"]


def test_iter_lines_rejoins_split_chunks() -> None:
    chunks = [b'{"a":', b'1}\n{"b"', b':2}\n\n', b'{"c":3}']
    assert list(iter_lines(chunks)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_store_applies_watch_events() -> None:
    store: Store[Pod] = Store("pods", pod_from_object)
    store.replace([pod_obj("a", rv="5"), pod_obj("b", rv="6"), {"metadata": {}}], "7")
    assert store.resource_version == "7" and len(store) == 2
    store.apply({"type": "ADDED", "object": pod_obj("c", rv="8")})
    store.apply({"type": "MODIFIED", "object": pod_obj("a", uid="u2", rv="9")})
    store.apply({"type": "DELETED", "object": pod_obj("b", rv="10")})
    store.apply({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "12"}}})
    assert store.resource_version == "12"
    assert sorted(k[1] for k in store.objects) == ["a", "c"]
    assert store.get("default", "a").uid == "u2"  # type: ignore[union-attr]
    # A pod that turned malformed is dropped, so that a lookup asks the API (which reports it).
    bad = pod_obj("a", rv="13")
    bad["metadata"]["annotations"] = {"x": 1}
    store.apply({"type": "MODIFIED", "object": bad})
    assert store.get("default", "a") is None and store.resource_version == "13"
    with pytest.raises(Gone):
        store.apply({"type": "ERROR", "object": status_body(410, "too old resource version: 5 (20)")})
    with pytest.raises(ValueError):
        store.apply({"type": "ERROR", "object": status_body(500, "boom")})
    with pytest.raises(ValueError):
        store.apply({"type": "WHATEVER", "object": pod_obj()})


# --- the request budget ---------------------------------------------------------------------------------

def test_unreachable_gives_try_again_later_within_the_budget() -> None:
    clock = FakeClock()

    def refuse(method: str, path: str, query: dict[str, str], body: Any, timeout: tuple[float, float]) -> FakeResponse:
        clock.now += 0.01
        raise Unreachable("connection refused")

    src = thin_source(refuse, timeout=10.0, clock=clock)
    start = clock.now
    with pytest.raises(CNIError) as e:
        src.get_pod("default", "p1")
    assert e.value.code == TRY_AGAIN_LATER
    assert HOST in e.value.msg and "pod default/p1" in e.value.msg and "connection refused" in e.value.msg
    assert "try again later" in e.value.msg
    assert clock.now - start <= 10.0
    reqs = src.api.transport.requests  # type: ignore[attr-defined]
    assert 3 <= len(reqs) <= 20, "a few retries with backoff"
    for r in reqs:  # every attempt is bounded by what is left of the budget
        assert r["timeout"][0] > 0 and r["at"] + r["timeout"][1] <= start + 10.0 + 1e-6
    waited = float(e.value.msg.split("gave up after ")[1].split("s")[0])
    assert waited <= 10.0


def test_slow_api_times_out_within_the_budget() -> None:
    clock = FakeClock()

    def slow(method: str, path: str, query: dict[str, str], body: Any, timeout: tuple[float, float]) -> FakeResponse:
        clock.now += timeout[1]  # the read timeout fires
        raise Unreachable("read timed out")

    src = thin_source(slow, timeout=5.0, clock=clock)
    start = clock.now
    with pytest.raises(CNIError) as e:
        src.get_nad("kube-system", "n1")
    assert e.value.code == TRY_AGAIN_LATER and "NetworkAttachmentDefinition kube-system/n1" in e.value.msg
    assert clock.now - start <= 5.0 + 1e-6


def test_retries_on_5xx_429_and_409_then_succeeds() -> None:
    answers = [FakeResponse(503, status_body(503, "etcd down")), FakeResponse(429, status_body(429, "slow down"),
               {"Retry-After": "1"}), FakeResponse(500, status_body(500, "x")), FakeResponse(200, pod_obj())]
    clock = FakeClock()
    src = thin_source(lambda *a: answers.pop(0), clock=clock)
    start = clock.now
    assert src.get_pod("default", "p1") == Pod("default", "p1", "u1")
    assert clock.now - start >= 1.0, "Retry-After was honoured"

    patches = [FakeResponse(409, status_body(409, "the object has been modified")), FakeResponse(200, pod_obj())]
    src = thin_source(lambda *a: patches.pop(0))
    src.publish_status("default", "p1", [])
    assert not patches


def test_forbidden_names_the_missing_permission() -> None:
    msg = 'pods "p1" is forbidden: User "bob" cannot get resource "pods" in API group "" in the namespace "default"'
    src = thin_source(lambda *a: FakeResponse(403, status_body(403, msg)))
    with pytest.raises(CNIError) as e:
        src.get_pod("default", "p1")
    assert e.value.code == INVALID_CONFIG
    assert "kubeconfig /k.yaml lacks the permission to get pods in namespace default" in e.value.msg
    assert e.value.details == msg
    assert len(src.api.transport.requests) == 1  # type: ignore[attr-defined]

    src = thin_source(lambda *a: FakeResponse(403, status_body(403, "no")))
    with pytest.raises(CNIError) as e:
        src.publish_status("ns2", "p1", [])
    assert "patch pods/status in namespace ns2" in e.value.msg

    src = thin_source(lambda *a: FakeResponse(403, status_body(403, "no")))
    with pytest.raises(CNIError) as e:
        src.get_nad("other", "n1")
    assert "get network-attachment-definitions.k8s.cni.cncf.io in namespace other" in e.value.msg


def test_unauthorized_and_unexpected_statuses() -> None:
    src = thin_source(lambda *a: FakeResponse(401, status_body(401, "Unauthorized")))
    with pytest.raises(CNIError) as e:
        src.get_pod("default", "p1")
    assert e.value.code == INVALID_CONFIG and "rejected the credentials of kubeconfig /k.yaml" in e.value.msg
    src = thin_source(lambda *a: FakeResponse(400, status_body(400, "bad request")))
    with pytest.raises(CNIError) as e:
        src.get_pod("default", "p1")
    assert e.value.code == INTERNAL and "answered 400 to get pod default/p1: bad request" in e.value.msg
    src = thin_source(lambda *a: FakeResponse(200, b"{not json"))
    with pytest.raises(CNIError) as e:
        src.get_pod("default", "p1")
    assert "malformed answer to get pod default/p1" in e.value.msg


def test_untrusted_server_certificate_is_a_config_error() -> None:
    def tls(*a: Any) -> FakeResponse:
        raise Unreachable("TLS: certificate verify failed", permanent=True)

    src = thin_source(tls)
    with pytest.raises(CNIError) as e:
        src.get_pod("default", "p1")
    assert e.value.code == INVALID_CONFIG and "certificate verify failed" in e.value.msg
    assert len(src.api.transport.requests) == 1  # type: ignore[attr-defined]


def test_not_found_is_none() -> None:
    src = thin_source(lambda *a: FakeResponse(404, status_body(404, "not found")))
    assert src.get_pod("default", "p1") is None
    assert src.get_nad("default", "n1") is None


# --- thin-mode operations -------------------------------------------------------------------------------

def test_thin_lookups_go_to_the_api() -> None:
    def handler(method: str, path: str, query: dict[str, str], body: Any, timeout: tuple[float, float]) -> FakeResponse:
        if path == "/api/v1/namespaces/default/pods/p1":
            return FakeResponse(200, pod_obj(uid="other"))
        if path == "/apis/k8s.cni.cncf.io/v1/namespaces/kube-system/network-attachment-definitions/n1":
            return FakeResponse(200, nad_obj(ns="kube-system"))
        return FakeResponse(404, status_body(404, "no"))

    src = thin_source(handler)
    assert src.ready() and src.cache_ages() == {}
    # Thin mode reads afresh anyway: a UID that differs is the caller's to judge.
    assert src.get_pod("default", "p1", uid="u1").uid == "other"  # type: ignore[union-attr]
    assert src.get_nad("kube-system", "n1")["metadata"]["namespace"] == "kube-system"  # type: ignore[index]


def test_publish_status_patches_the_status_subresource() -> None:
    src = thin_source(lambda *a: FakeResponse(200, pod_obj(uid="u1")))
    src.get_pod("default", "p1")
    src.publish_status("default", "p1", [{"name": "x"}])
    src.publish_status("default", "p1", None)
    reqs = src.api.transport.requests  # type: ignore[attr-defined]
    put, clear = reqs[1], reqs[2]
    assert put["method"] == "PATCH" and put["path"] == "/api/v1/namespaces/default/pods/p1/status"
    assert put["content_type"] == "application/merge-patch+json"
    assert put["body"]["metadata"]["uid"] == "u1", "written only on the pod incarnation that was looked up"
    assert json.loads(put["body"]["metadata"]["annotations"][NETWORK_STATUS]) == [{"name": "x"}]
    assert clear["body"] == {"metadata": {"annotations": {NETWORK_STATUS: None}}}


def test_publish_status_tolerates_a_gone_or_replaced_pod() -> None:
    src = thin_source(lambda *a: FakeResponse(404, status_body(404, "pods \"p1\" not found")))
    src.publish_status("default", "p1", [])
    src.publish_status("default", "p1", None)
    answers = [FakeResponse(200, pod_obj(uid="u1")),
               FakeResponse(422, status_body(422, 'Pod "p1" is invalid: metadata.uid: Invalid value: "u1": field is immutable'))]
    src = thin_source(lambda *a: answers.pop(0))
    src.get_pod("default", "p1")
    src.publish_status("default", "p1", [])  # no error: the status is not the new pod's


def test_clearing_the_status_waits_less_than_the_full_budget() -> None:
    clock = FakeClock()

    def refuse(*a: Any) -> FakeResponse:
        raise Unreachable("connection refused")

    src = thin_source(refuse, timeout=10.0, clock=clock)
    start = clock.now
    with pytest.raises(CNIError) as e:
        src.publish_status("default", "p1", None)
    assert e.value.code == TRY_AGAIN_LATER and clock.now - start <= kube.CLEAR_STATUS_BUDGET


def test_thin_event_is_posted_synchronously_and_never_raises() -> None:
    src = thin_source(lambda *a: FakeResponse(201, {}))
    src.record_event(Pod("default", "p1", "u1"), "Warning", "AttachmentFailed", "boom")
    (req,) = src.api.transport.requests  # type: ignore[attr-defined]
    assert req["method"] == "POST" and req["path"] == "/api/v1/namespaces/default/events"
    assert req["body"]["involvedObject"]["uid"] == "u1" and req["body"]["message"] == "boom"
    assert req["timeout"][1] <= kube.EVENT_BUDGET

    def fail(*a: Any) -> FakeResponse:
        raise RuntimeError("bug")

    thin_source(fail).record_event(Pod("default", "p1", "u1"), "Warning", "R", "m")
    thin_source(lambda *a: FakeResponse(403, status_body(403, "no"))).record_event(Pod("d", "p", None), "Normal", "R", "m")


def test_after_the_api_failed_later_calls_fail_fast() -> None:
    clock = FakeClock()

    def refuse(*a: Any) -> FakeResponse:
        raise Unreachable("connection refused")

    src = thin_source(refuse, timeout=10.0, clock=clock)
    with pytest.raises(CNIError):
        src.get_pod("default", "p1")
    n = len(src.api.transport.requests)  # type: ignore[attr-defined]
    src.record_event(Pod("default", "p1", "u1"), "Warning", "R", "m")
    assert len(src.api.transport.requests) == n, "no event attempt while the API is known to be down"  # type: ignore[attr-defined]
    start = clock.now
    with pytest.raises(CNIError):
        src.get_nad("default", "n1")
    assert clock.now - start <= kube.FAST_FAIL_BUDGET


def test_problem() -> None:
    assert thin_source(lambda *a: FakeResponse(200, b"ok")).problem() is None
    assert "not ready (500)" in thin_source(lambda *a: FakeResponse(500, b"[-]etcd failed")).problem()  # type: ignore[operator]
    assert "refused kubeconfig /k.yaml (401)" in thin_source(lambda *a: FakeResponse(401, status_body(401, "x"))).problem()  # type: ignore[operator]

    def refuse(*a: Any) -> FakeResponse:
        raise Unreachable("connection refused")

    problem = thin_source(refuse).problem()
    assert problem and HOST in problem and "connection refused" in problem


def test_kubeconfig_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as e:
        KubeSource.from_kubeconfig(str(tmp_path / "missing.yaml"), 10.0)
    assert e.value.code == INVALID_CONFIG and "missing.yaml" in e.value.msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    with pytest.raises(CNIError) as e:
        KubeSource.from_kubeconfig(str(bad), 10.0)
    assert e.value.code == INVALID_CONFIG and "bad.yaml" in e.value.msg


def test_kube_module_imports_the_client_lazily() -> None:
    probe = "import sys, meta.core, meta.sources.kube; print(sorted(m for m in sys.modules if m.startswith('kubernetes')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- watch mode -----------------------------------------------------------------------------------------

class FakeApiServer:
    """A scripted list+watch server: lists from `objects`, watches stream from per-collection queues."""

    PATHS = {"/api/v1/pods": "pods", "/apis/k8s.cni.cncf.io/v1/network-attachment-definitions": "nads"}

    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = {"pods": [], "nads": []}
        self.rv = 100
        self.streams: dict[str, queue.Queue[bytes | None]] = {"pods": queue.Queue(), "nads": queue.Queue()}
        self.watch_status: dict[str, int] = {}
        self.lists: dict[str, int] = {"pods": 0, "nads": 0}
        self.watches: list[tuple[str, dict[str, str]]] = []
        self.gets: list[str] = []
        self.single: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def push(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self.streams[kind].put(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def __call__(self, method: str, path: str, query: dict[str, str], body: Any,
                 timeout: tuple[float, float]) -> FakeResponse:
        kind = self.PATHS.get(path)
        if kind and method == "GET" and query.get("watch") == "1":
            self.watches.append((kind, query))
            status = self.watch_status.pop(kind, 200)
            if status != 200:
                return FakeResponse(status, status_body(status, "scripted"))
            return FakeResponse(200, stream=self.streams[kind])
        if kind and method == "GET":
            with self.lock:
                self.lists[kind] += 1
            return FakeResponse(200, {"kind": "List", "metadata": {"resourceVersion": str(self.rv)},
                                      "items": self.objects[kind]})
        if method == "POST" and path.endswith("/events"):
            self.events.append({"method": "POST", **body})
            return FakeResponse(201, body)
        if method == "PATCH" and "/events/" in path:
            self.events.append({"method": "PATCH", "path": path, **body})
            return FakeResponse(200, body)
        self.gets.append(path)
        if path == "/readyz":
            return FakeResponse(200, b"ok")
        if path in self.single:
            return FakeResponse(200, self.single[path])
        return FakeResponse(404, status_body(404, "not found"))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def served() -> Iterator[tuple[FakeApiServer, KubeSource]]:
    server = FakeApiServer()
    server.objects["pods"] = [pod_obj("p1", uid="u1")]
    server.objects["nads"] = [nad_obj("n1", ns="kube-system")]
    src = KubeSource(FakeTransport(server), 2.0, "kubeconfig /k.yaml", thin=False, host_name="node1")
    src.start_watches("node1", watch_timeout=(1, 1))
    try:
        yield server, src
    finally:
        src.close()


def test_watch_caches_answer_from_memory(served: tuple[FakeApiServer, KubeSource]) -> None:
    server, src = served
    wait_for(src.ready)
    assert set(src.cache_ages()) == {"pods", "nads"} and all(a < 5 for a in src.cache_ages().values())
    assert server.watches and server.watches[0][1]["fieldSelector"] == "spec.nodeName=node1"
    assert server.watches[0][1]["resourceVersion"] == "100"
    assert src.get_pod("default", "p1", uid="u1") == Pod("default", "p1", "u1")
    assert src.get_nad("kube-system", "n1")["spec"]["config"] == '{"type": "bridge"}'  # type: ignore[index]
    assert server.gets == [], "cache hits need no GET"
    assert src.problem() is None
    server.gets.clear()

    server.push("nads", "ADDED", nad_obj("n2", rv="101"))
    server.push("pods", "ADDED", pod_obj("p2", uid="u2", rv="102"))
    wait_for(lambda: src.caches["pods"].store.get("default", "p2") is not None
             and src.caches["nads"].store.get("default", "n2") is not None)
    assert src.get_pod("default", "p2") == Pod("default", "p2", "u2") and server.gets == []


def test_watch_uid_mismatch_and_miss_ask_the_api(served: tuple[FakeApiServer, KubeSource]) -> None:
    server, src = served
    wait_for(src.ready)
    server.single["/api/v1/namespaces/default/pods/p1"] = pod_obj("p1", uid="u9")
    assert src.get_pod("default", "p1", uid="u9") == Pod("default", "p1", "u9")
    assert server.gets == ["/api/v1/namespaces/default/pods/p1"]
    assert src.get_pod("default", "nope") is None
    assert src.get_nad("default", "nope") is None
    assert server.gets[1:] == ["/api/v1/namespaces/default/pods/nope",
                               "/apis/k8s.cni.cncf.io/v1/namespaces/default/network-attachment-definitions/nope"]


def test_a_nad_found_missing_is_not_asked_for_again_while_the_watch_lasts(served: tuple[FakeApiServer, KubeSource]) -> None:
    # A clusterNetwork naming a confDir file is looked up as a NAD first on every ADD: one GET per watch.
    server, src = served
    wait_for(src.ready)
    nad_path = "/apis/k8s.cni.cncf.io/v1/namespaces/default/network-attachment-definitions/later"
    wait_for(lambda: any(k == "nads" for k, _ in server.watches))
    assert src.get_nad("default", "later") is None and src.get_nad("default", "later") is None
    assert server.gets == [nad_path], "the second miss is answered by the open watch"
    server.push("nads", "ADDED", nad_obj("later", rv="120"))
    wait_for(lambda: src.caches["nads"].store.get("default", "later") is not None)
    assert src.get_nad("default", "later") is not None, "created afterwards: the watch brings it"
    server.push("nads", "DELETED", nad_obj("later", rv="121"))
    wait_for(lambda: src.caches["nads"].store.get("default", "later") is None)
    assert src.get_nad("default", "later") is None and server.gets == [nad_path], "deleted: the watch says so"
    watches = len(server.watches)
    server.streams["nads"].put(None)  # the watch ends: what a GET said during it is forgotten
    wait_for(lambda: len(server.watches) > watches)
    server.gets.clear()
    assert src.get_nad("default", "later") is None and server.gets == [nad_path]


def test_watch_relists_on_gone_and_resumes_after_disconnects(served: tuple[FakeApiServer, KubeSource]) -> None:
    server, src = served
    wait_for(src.ready)
    assert server.lists["nads"] == 1
    server.push("nads", "BOOKMARK", {"kind": "NetworkAttachmentDefinition", "metadata": {"resourceVersion": "150"}})
    server.streams["nads"].put(None)  # the server ends the watch: resume from the bookmark, no re-list
    wait_for(lambda: any(k == "nads" and q["resourceVersion"] == "150" for k, q in server.watches))
    assert server.lists["nads"] == 1

    server.objects["nads"] = [nad_obj("n3", rv="200")]
    server.rv = 200
    server.push("nads", "ERROR", status_body(410, "too old resource version"))
    wait_for(lambda: server.lists["nads"] == 2)
    wait_for(lambda: src.caches["nads"].store.get("default", "n3") is not None)
    assert src.caches["nads"].store.get("kube-system", "n1") is None, "the re-list replaced the cache"
    assert src.caches["nads"].lists == 2

    server.watch_status["pods"] = 410  # a 410 answer to the watch request itself
    server.streams["pods"].put(None)
    wait_for(lambda: server.lists["pods"] == 2)


def test_watch_events_are_posted_in_the_background_and_aggregated(served: tuple[FakeApiServer, KubeSource]) -> None:
    server, src = served
    pod = Pod("default", "p1", "u1")
    src.record_event(pod, "Warning", "AttachmentFailed", "boom")
    src.record_event(pod, "Warning", "AttachmentFailed", "boom")
    src.record_event(pod, "Warning", "AttachmentFailed", "other")
    wait_for(lambda: len(server.events) == 3)
    first, bump, other = server.events
    assert first["method"] == "POST" and first["count"] == 1
    assert bump["method"] == "PATCH" and bump["count"] == 2 and bump["path"].endswith("/" + first["metadata"]["name"])
    assert other["method"] == "POST" and other["message"] == "other"


def test_watch_event_queue_is_bounded() -> None:
    server = FakeApiServer()
    src = KubeSource(FakeTransport(server), 2.0, "kubeconfig /k.yaml", thin=False)
    src.events = kube.EventWorker(src._post_event, threading.Event())  # not started: nothing drains it
    for i in range(kube.EVENT_QUEUE_MAX + 5):
        src.record_event(Pod("default", "p1", "u1"), "Warning", "R", f"m{i}")
    assert src.events.dropped == 5


def test_close_stops_the_threads(served: tuple[FakeApiServer, KubeSource]) -> None:
    server, src = served
    wait_for(src.ready)
    threads = [c.thread for c in src.caches.values()] + [src.events.thread]  # type: ignore[union-attr]
    src.close()
    assert not any(t.is_alive() for t in threads)
    assert all(t.daemon for t in threads)


def test_watch_not_ready_reports_why() -> None:
    def forbidden(method: str, path: str, query: dict[str, str], body: Any,
                  timeout: tuple[float, float]) -> FakeResponse:
        return FakeResponse(403, status_body(403, "forbidden"))

    src = KubeSource(FakeTransport(forbidden), 1.0, "kubeconfig /k.yaml", thin=False)
    src.start_watches(None, watch_timeout=(1, 1))
    try:
        wait_for(lambda: all(c.last_error for c in src.caches.values()))
        assert not src.ready()
        problem = src.problem()
        assert problem and "not synced" in problem and "list pods in all namespaces" in problem
        with pytest.raises(CNIError) as e:  # lookups fall back to GETs, which report the missing right
            src.get_pod("default", "p1")
        assert e.value.code == INVALID_CONFIG
    finally:
        src.close()


def test_transport_failures_are_described_plainly() -> None:
    import urllib3.exceptions as ux

    refused = ux.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")  # type: ignore[arg-type]
    assert kube._reason(refused).reason == "connection refused"
    assert kube._reason(ux.ConnectTimeoutError(None, "timed out")).reason == "connect timed out"
    assert kube._reason(ux.ReadTimeoutError(None, "/x", "Read timed out.")).reason == "read timed out"  # type: ignore[arg-type]
    untrusted = kube._reason(ux.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"))
    assert untrusted.permanent
    assert not kube._reason(ux.SSLError("EOF occurred in violation of protocol")).permanent
