"""KubeStore without a cluster: label values, the requests it makes (paths, bodies, selectors), the
mapping of answers onto the Store protocol (409/404 -> Conflict, never retried; budget spent ->
Unavailable; 401/403 -> CNI error 7), paging, the check that the server stored what was sent, counting."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meta.cni.errors import INTERNAL, INVALID_CONFIG, CNIError
from meta.ipam import kubestore
from meta.ipam.kubestore import NODE_LABEL, POOL_LABEL, KubeStore, label_value, labels_for
from meta.ipam.store import BLOCK, POOL, Conflict, Unavailable, Versioned
from meta.sources.kube import Unreachable

HOST = "https://api.test:6443"
BLOCKS = "/apis/ipam.meta-cni.dev/v1alpha1/ipblocks"
POOLS = "/apis/ipam.meta-cni.dev/v1alpha1/ippools"
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


class Answer:
    """A canned HTTP answer."""

    def __init__(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers = dict(headers or {})
        self._data = json.dumps(body).encode() if body is not None else b""

    def read(self) -> bytes:
        return self._data

    def lines(self) -> Iterator[bytes]:
        raise AssertionError("the store never watches")

    def close(self) -> None:
        pass


Handler = Callable[[str, str, dict[str, str], Any], Answer]


class Fake:
    """A Transport answering with `handler`, recording every request."""

    host = HOST

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[tuple[str, str, dict[str, str], Any]] = []

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: bytes | None = None,
                content_type: str | None = None, timeout: tuple[float, float]) -> Answer:
        assert timeout[0] > 0 and timeout[1] > 0
        parsed = json.loads(body) if body else None
        self.seen.append((method, path, dict(query or {}), parsed))
        return self.handler(method, path, dict(query or {}), parsed)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make(handler: Handler, timeout: float = 10.0) -> tuple[KubeStore, Fake, Clock]:
    fake, clock = Fake(handler), Clock()
    store = KubeStore(fake, timeout, "test credentials")
    store.api.clock, store.api.sleep = clock, clock.sleep
    return store, fake, clock


def status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


def block_data(pool: str = "net1", node: str = "n1") -> dict[str, Any]:
    return {"pool": pool, "cidr": "10.1.0.0/26", "node": node, "used": 1,
            "allocations": {"10.1.0.1": {"containerID": "c1", "ifname": "net1", "podNamespace": "default",
                                         "podName": "p", "podUID": "u", "node": node, "static": False,
                                         "claim": None, "released": False}}}


def echo(rv: str = "7") -> Handler:
    """A server that stores whatever it is sent (with resourceVersion `rv`)."""
    def handler(method: str, path: str, query: dict[str, str], body: Any) -> Answer:
        assert body is not None
        stored = {**body, "metadata": {**body["metadata"], "resourceVersion": rv}}
        return Answer(201 if method == "POST" else 200, stored)
    return handler


def item(name: str, data: dict[str, Any], rv: str = "5") -> dict[str, Any]:
    return {"apiVersion": "ipam.meta-cni.dev/v1alpha1", "kind": "IPBlock",
            "metadata": {"name": name, "resourceVersion": rv, "managedFields": [{"manager": "x"}]}, "spec": data}


# --- label values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "net1", "a", "node-1.example.com", "A_b-c.d", "x" * 63])
def test_valid_label_values_are_kept(value: str) -> None:
    assert label_value(value) == value


@pytest.mark.parametrize("value", ["my net", "-lead", "trail-", "x" * 64, "n/s:1", "ünïcode", "." * 3,
                                   "node." + "a" * 250])
def test_other_values_become_a_valid_prefix_plus_hash(value: str) -> None:
    got = label_value(value)
    assert got != value and len(got) <= 63 and LABEL_VALUE.fullmatch(got), got
    assert label_value(value) == got  # deterministic: every node computes the same selector
    assert re.search(r"[0-9a-f]{16}$", got)


@given(st.text(max_size=300))
def test_label_values_are_always_valid(value: str) -> None:
    got = label_value(value)
    assert len(got) <= 63 and LABEL_VALUE.fullmatch(got)


def test_labels_name_pool_and_for_blocks_the_node() -> None:
    assert labels_for(POOL, {"pool": "net1", "ranges": []}) == {POOL_LABEL: "net1"}
    assert labels_for(BLOCK, block_data(node="")) == {POOL_LABEL: "net1", NODE_LABEL: ""}


# --- requests and their answers -------------------------------------------------------------------------

def test_create_posts_the_resource_with_labels_and_spec() -> None:
    store, fake, _ = make(echo("11"))
    got = store.create(BLOCK, "net1-0a010000", block_data())
    assert got == Versioned(BLOCK, "net1-0a010000", block_data(), "11") and got.data == block_data()
    ((method, path, _, body),) = fake.seen
    assert (method, path) == ("POST", BLOCKS)
    assert body == {"apiVersion": "ipam.meta-cni.dev/v1alpha1", "kind": "IPBlock",
                    "metadata": {"name": "net1-0a010000", "labels": {POOL_LABEL: "net1", NODE_LABEL: "n1"}},
                    "spec": block_data()}


def test_update_puts_with_the_read_version_and_fresh_labels() -> None:
    store, fake, _ = make(echo("12"))
    old = Versioned(BLOCK, "b1", block_data(node=""), "11")
    new = store.update(old, block_data(node="n2"))
    assert new.version == "12" and new.data["node"] == "n2"
    ((method, path, _, body),) = fake.seen
    assert (method, path) == ("PUT", f"{BLOCKS}/b1")
    assert body["metadata"] == {"name": "b1", "resourceVersion": "11", "labels": {POOL_LABEL: "net1", NODE_LABEL: "n2"}}


def test_delete_names_the_version_as_precondition() -> None:
    store, fake, _ = make(lambda *a: Answer(200, status(200, "ok")))
    store.delete(Versioned(POOL, "net1", {"pool": "net1"}, "9"))
    ((method, path, _, body),) = fake.seen
    assert (method, path) == ("DELETE", f"{POOLS}/net1")
    assert body == {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": "9"}}


@pytest.mark.parametrize("method, code", [("POST", 409), ("PUT", 409), ("PUT", 404), ("DELETE", 409)])
def test_lost_writes_are_conflicts_and_never_retried(method: str, code: int) -> None:
    store, fake, _ = make(lambda *a: Answer(code, status(code, "the object has been modified", "Conflict")))
    obj = Versioned(BLOCK, "b1", block_data(), "3")
    with pytest.raises(Conflict, match="b1"):
        if method == "POST":
            store.create(BLOCK, "b1", block_data())
        elif method == "PUT":
            store.update(obj, block_data())
        else:
            store.delete(obj)
    assert len(fake.seen) == 1 and store.conflicts == 1


def test_gone_objects() -> None:
    store, fake, _ = make(lambda *a: Answer(404, status(404, 'ipblocks "b1" not found', "NotFound")))
    assert store.get(BLOCK, "b1") is None
    store.delete(Versioned(BLOCK, "b1", {}, "3"))  # deleted already: nothing to do
    assert len(fake.seen) == 2 and store.conflicts == 0


@pytest.mark.parametrize("call", [lambda s: s.list(BLOCK, "net1"), lambda s: s.create(POOL, "p", {"pool": "p"})])
def test_missing_crd_is_a_config_error_naming_the_file(call: Callable[[KubeStore], Any]) -> None:
    store, _, _ = make(lambda *a: Answer(404, status(404, "the server could not find the requested resource")))
    with pytest.raises(CNIError) as e:
        call(store)
    assert e.value.code == INVALID_CONFIG and "crds/meta-ipam.yaml" in e.value.msg


def test_forbidden_is_a_config_error_naming_the_right() -> None:
    store, _, _ = make(lambda *a: Answer(403, status(403, "forbidden")))
    with pytest.raises(CNIError) as e:
        store.list(BLOCK, "net1", "n1")
    assert e.value.code == INVALID_CONFIG
    assert "list ipblocks.ipam.meta-cni.dev in all namespaces" in e.value.msg


def test_invalid_object_is_an_internal_error_with_the_servers_message() -> None:
    store, fake, _ = make(lambda *a: Answer(422, status(422, "spec.used: Invalid value: \"string\"")))
    with pytest.raises(CNIError) as e:
        store.create(BLOCK, "b1", block_data())
    assert e.value.code == INTERNAL and "spec.used" in e.value.msg and len(fake.seen) == 1


def test_server_trouble_is_retried_then_succeeds() -> None:
    answers = iter([Answer(503, status(503, "etcd leader changed")),
                    Answer(429, status(429, "slow down"), {"Retry-After": "1"}),
                    Answer(200, item("b1", block_data(), "8"))])
    store, fake, clock = make(lambda *a: next(answers))
    got = store.get(BLOCK, "b1")
    assert got is not None and got.version == "8" and len(fake.seen) == 3
    assert clock.now >= 101.0  # waited at least the Retry-After
    assert store.requests == {"GET": 3}


def test_unreachable_api_is_unavailable_after_the_budget() -> None:
    def refuse(*a: Any) -> Answer:
        raise Unreachable("connection refused")

    store, fake, clock = make(refuse, timeout=3.0)
    for call in (lambda: store.get(BLOCK, "b1"), lambda: store.list(POOL, "net1"),
                 lambda: store.create(BLOCK, "b1", block_data()),
                 lambda: store.update(Versioned(BLOCK, "b1", {}, "1"), block_data()),
                 lambda: store.delete(Versioned(BLOCK, "b1", {}, "1"))):
        start, before = clock.now, len(fake.seen)
        with pytest.raises(Unavailable, match="connection refused"):
            call()
        assert clock.now - start <= 3.0 and len(fake.seen) - before > 1


def test_list_selects_by_labels_pages_and_checks_the_data() -> None:
    other = label_value("my net")  # a pool literally named like another's hashed label value
    pages = {
        "": {"items": [item("a", block_data("my net")), item("b", block_data(other))], "metadata": {"continue": "t1"}},
        "t1": {"items": [item("c", block_data("my net", "n2"))], "metadata": {}},
    }
    store, fake, _ = make(lambda m, p, q, b: Answer(200, pages[q.get("continue", "")]))
    got = store.list(BLOCK, "my net")
    assert [v.name for v in got] == ["a", "c"] and all(v.version == "5" for v in got)
    assert [q for _, _, q, _ in fake.seen] == [
        {"labelSelector": f"{POOL_LABEL}={other}", "limit": str(kubestore.LIST_PAGE)},
        {"labelSelector": f"{POOL_LABEL}={other}", "limit": str(kubestore.LIST_PAGE), "continue": "t1"}]
    assert store.requests == {"LIST": 2}
    fake.seen.clear()
    assert [v.name for v in store.list(BLOCK, "my net", "n2")] == ["c"]
    assert fake.seen[0][2]["labelSelector"] == f"{POOL_LABEL}={other},{NODE_LABEL}=n2"


def test_list_starts_over_when_the_continue_token_expired() -> None:
    answers = iter([Answer(200, {"items": [item("a", block_data())], "metadata": {"continue": "t1"}}),
                    Answer(410, status(410, "continue token expired")),
                    Answer(200, {"items": [item("a", block_data()), item("b", block_data())], "metadata": {}})])
    store, _, _ = make(lambda *a: next(answers))
    assert [v.name for v in store.list(BLOCK, "net1")] == ["a", "b"]


def test_a_write_the_server_pruned_fails_loudly() -> None:
    def prune(method: str, path: str, query: dict[str, str], body: Any) -> Answer:
        spec = {k: v for k, v in body["spec"].items() if k != "future"}
        return Answer(201, {**body, "metadata": {**body["metadata"], "resourceVersion": "2"}, "spec": spec})

    store, _, _ = make(prune)
    with pytest.raises(CNIError) as e:
        store.create(BLOCK, "b1", {**block_data(), "future": {"x": 1}})
    assert e.value.code == INTERNAL and "spec.future" in e.value.msg and "crds/meta-ipam.yaml" in e.value.msg
    # What JSON cannot tell apart (a tuple sent, a list stored) is no difference.
    assert store.create(BLOCK, "b2", {**block_data(), "cidr": "10.1.0.0/26"}).version == "2"
    assert store.create(POOL, "p", {"pool": "p", "ranges": ("10.0.0.0/8",)}).data["ranges"] == ["10.0.0.0/8"]


def test_malformed_answer_is_an_internal_error() -> None:
    store, _, _ = make(lambda *a: Answer(200, {"metadata": {"name": "b1"}, "spec": {}}))
    with pytest.raises(CNIError) as e:
        store.get(BLOCK, "b1")
    assert e.value.code == INTERNAL and "resourceVersion" in e.value.msg


def test_unknown_kind_is_a_programming_error() -> None:
    store, fake, _ = make(echo())
    with pytest.raises(ValueError, match="unknown store kind"):
        store.get("claim", "x")
    assert not fake.seen


def test_importing_the_store_does_not_import_the_kubernetes_client() -> None:
    import subprocess
    import sys

    code = "import sys, meta.ipam.kubestore; print('kubernetes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_fail_fast_shortens_the_budget_after_a_failure_until_a_call_succeeds() -> None:
    up = {"yes": False}

    def handler(*a: Any) -> Answer:
        if not up["yes"]:
            raise Unreachable("connection refused")
        return Answer(200, item("b1", block_data()))

    fake, clock = Fake(handler), Clock()
    store = KubeStore(fake, 10.0, "test credentials", fail_fast=True)
    store.api.clock, store.api.sleep = clock, clock.sleep
    with pytest.raises(Unavailable):
        store.get(BLOCK, "b1")
    assert clock.now - 100.0 > 5.0  # the first failure takes (most of) the budget
    start = clock.now
    with pytest.raises(Unavailable):
        store.get(BLOCK, "b1")
    assert clock.now - start <= 1.0  # the next one gives up within a second
    up["yes"] = True
    assert store.get(BLOCK, "b1") is not None
    assert not store.api.down


def test_list_all_reads_every_object_without_a_selector() -> None:
    pages = {"": {"items": [item("a", block_data("p1"))], "metadata": {"continue": "t"}},
             "t": {"items": [item("b", block_data("p2"))], "metadata": {}}}
    store, fake, _ = make(lambda m, p, q, b: Answer(200, pages[q.get("continue", "")]))
    assert [(v.name, v.data["pool"]) for v in store.list_all(BLOCK)] == [("a", "p1"), ("b", "p2")]
    assert all("labelSelector" not in q for _, _, q, _ in fake.seen)


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("same", [True, False])
def test_a_write_whose_answer_was_lost_is_not_a_conflict(method: str, same: bool) -> None:
    """The first attempt reaches the server but its answer is lost (read timeout); the retry gets 409.
    When the object then holds exactly what was sent, that was our own write: success, not Conflict."""
    sent = block_data()
    seen: list[str] = []

    def handler(m: str, path: str, query: dict[str, str], body: Any) -> Answer:
        seen.append(m)
        if m == method and seen.count(m) == 1:
            raise Unreachable("read timed out")  # the server took it; the answer never came
        if m == method:
            return Answer(409, status(409, "the object has been modified", "Conflict"))
        assert m == "GET" and path == f"{BLOCKS}/b1"
        return Answer(200, item("b1", sent if same else block_data(node="n9"), "21"))

    store, _, _ = make(handler)

    def write() -> Versioned:
        if method == "POST":
            return store.create(BLOCK, "b1", sent)
        return store.update(Versioned(BLOCK, "b1", block_data(node=""), "20"), sent)

    if same:
        got = write()
        assert got.version == "21" and got.data == sent and store.conflicts == 0
    else:
        with pytest.raises(Conflict):
            write()
        assert store.conflicts == 1
    assert seen == [method, method, "GET"]
