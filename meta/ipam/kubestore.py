"""The IPAM store over Kubernetes custom resources (crds/meta-ipam.yaml): IPPool and IPBlock.

Each store object is one cluster-scoped custom resource named like the store object, whose `spec` is the
object's data and whose `metadata.resourceVersion` is its version:

- get     GET; 404 -> None
- list    GET of the collection with a label selector on pool (and node), a consistent read (see list());
          the values are also checked on the answer, because labels hold hashed values for names that
          are not valid label values
- create  POST; 409 AlreadyExists -> Conflict
- update  PUT naming metadata.resourceVersion; 409 (someone wrote in between) or 404 (deleted) -> Conflict
- delete  DELETE with preconditions.resourceVersion; 409 -> Conflict; 404 -> done already

A 409 is never retried here: whether to re-read and try again is the allocator's decision. Everything
else goes through meta.sources.kube.Api, which bounds each operation by `timeout` seconds (connect and
read timeouts on every attempt, retries with backoff on connection errors, 429 and 5xx) and raises CNI
error 11 when the budget is spent; the store turns that into `store.Unavailable`. 401/403 stay CNI error 7
naming the missing right (RBAC), other refusals CNI error 999 with the server's message.

A write whose answer never came (the connection broke, the read timed out, a 5xx after the commit) is
retried like any other; the retry then meets the write itself and gets 409. So a 409 after more than one
attempt is checked with a GET: when the object holds exactly what was sent, the earlier attempt took
effect and the write succeeded (else the allocator would re-read, find its own write, and reserve a
second address for the same owner).

The official client is imported only when a store is built from credentials (`from_kubeconfig`, ...), and
requests go as raw JSON through its connection pool (meta.sources.kube.UrllibTransport): no model objects.
"""
from __future__ import annotations

import builtins
import collections
import hashlib
import json
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import attrs

from ..cni.errors import INTERNAL, INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from ..sources.kube import Action, Api, Response, Transport, UrllibTransport, server_message
from .store import BLOCK, POOL, Conflict, Unavailable, Versioned

GROUP = "ipam.meta-cni.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_FILE = "crds/meta-ipam.yaml"

POOL_LABEL = f"{GROUP}/pool"
NODE_LABEL = f"{GROUP}/node"

# Seconds one store operation may take, retries included, before Unavailable (meta-cni's apiTimeout default).
DEFAULT_TIMEOUT = 10.0
# Page size of list calls: bounds one answer (a full /26 block is ~24 KB, so a page stays under ~6 MB).
LIST_PAGE = 250

_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_LABEL_MAX = 63
_HASH_LEN = 16


class NotInstalled(CNIError):
    """The API server has no meta-ipam CRDs (code 7 for a plugin; a cluster without meta-ipam to a collector)."""


@attrs.frozen
class Resource:
    """The custom resource that holds one store kind."""

    kind: str       # the CRD's kind
    plural: str

    @property
    def path(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/{self.plural}"

    @property
    def rbac(self) -> str:
        return f"{self.plural}.{GROUP}"


RESOURCES: dict[str, Resource] = {POOL: Resource("IPPool", "ippools"), BLOCK: Resource("IPBlock", "ipblocks")}


def label_value(value: str) -> str:
    """`value` itself when it is a valid label value, else a readable prefix and a hash of the whole.

    Network names (CNI config `name`) may hold characters labels may not, and node names may be longer
    than 63 characters. Two names can in principle map to one value (a name that looks like another's
    hashed form), so lists check data["pool"] and data["node"] on the answer: a label only narrows.
    """
    if len(value) <= _LABEL_MAX and _LABEL_VALUE.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:_HASH_LEN]
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:_LABEL_MAX - _HASH_LEN - 1]
    # A label value must start with an alphanumeric; the hash supplies the alphanumeric end.
    prefix = re.sub(r"^[^A-Za-z0-9]+", "", prefix)
    return f"{prefix}-{digest}" if prefix else digest


def labels_for(kind: str, data: Mapping[str, Any]) -> dict[str, str]:
    """The index labels of an object: its pool, and for blocks the lease holder ('' when none), so that
    list(kind, pool, node) is one label-selector list."""
    labels = {POOL_LABEL: label_value(str(data.get("pool", "")))}
    if kind == BLOCK:
        labels[NODE_LABEL] = label_value(str(data.get("node") or ""))
    return labels


def _normalised(data: Any) -> Any:
    """`data` as it comes back from a JSON round trip (tuples become lists, ...)."""
    return json.loads(json.dumps(data))


def _lost_fields(sent: Any, stored: Any, path: str = "spec") -> list[str]:
    """Where the server's copy lacks or changed what was sent (at most a few, for a message)."""
    if isinstance(sent, dict) and isinstance(stored, dict):
        out: list[str] = []
        for key, value in sent.items():
            out += [f"{path}.{key}"] if key not in stored else _lost_fields(value, stored[key], f"{path}.{key}")
            if len(out) >= 5:
                break
        return out
    return [] if sent == stored else [path]


class CountingTransport:
    """A Transport that counts the HTTP requests made through it (retries included), per method.

    The benchmark reports API requests per allocation from these counts; a daemon could export them."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.host = inner.host
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._local = threading.local()  # attempts of the current call, per thread

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: bytes | None = None,
                content_type: str | None = None, timeout: tuple[float, float]) -> Response:
        # A collection GET is a list: count it apart, it is the expensive kind of read.
        key = "LIST" if method == "GET" and path.rstrip("/").endswith(("/ippools", "/ipblocks")) else method
        with self._lock:
            self.counts[key] += 1
        self._local.attempts = getattr(self._local, "attempts", 0) + 1
        return self.inner.request(method, path, query=query, body=body, content_type=content_type, timeout=timeout)

    def start_call(self) -> None:
        self._local.attempts = 0

    def attempts(self) -> int:
        """HTTP requests this thread made since start_call() (more than one: the call was retried)."""
        return int(getattr(self._local, "attempts", 0))

    def close(self) -> None:
        self.inner.close()


class KubeStore:
    """store.Store over the IPPool and IPBlock custom resources (see the module docstring).

    Thread-safe (one connection pool shared by all threads). `requests` counts API requests by method,
    `conflicts` the writes that lost (409/404 on update, 409 on create and delete).
    """

    def __init__(self, transport: Transport, timeout: float = DEFAULT_TIMEOUT,
                 credentials: str = "the store's credentials", *, fail_fast: bool = False) -> None:
        """`fail_fast`: once a call found the API unreachable, later calls try once, briefly (1 s) until
        one succeeds: right for a short-lived plugin process, wrong for a long-lived one on a slow API."""
        self.transport = CountingTransport(transport)
        self.api = Api(self.transport, timeout, credentials, fail_fast=fail_fast)
        self.timeout = timeout
        self.conflicts = 0
        self._lock = threading.Lock()

    # --- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_kubeconfig(cls, path: str, timeout: float = DEFAULT_TIMEOUT, *, fail_fast: bool = False) -> KubeStore:
        """A store with a kubeconfig's credentials; a bad kubeconfig is CNI error 7 naming it."""
        return cls(UrllibTransport.from_kubeconfig(path), timeout, f"kubeconfig {path}", fail_fast=fail_fast)

    @classmethod
    def in_cluster(cls, timeout: float = DEFAULT_TIMEOUT) -> KubeStore:
        """A store with the pod's service account (a node daemon)."""
        return cls(UrllibTransport.in_cluster(), timeout, "the pod's service account")

    @classmethod
    def from_token(cls, host: str, token: str, ca_file: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> KubeStore:
        """A store for `host` with a bearer token; TLS verified against `ca_file` (unverified without one:
        tests and benchmarks on loopback only)."""
        from kubernetes.client import Configuration

        cfg = Configuration()
        cfg.host = host
        cfg.api_key = {"authorization": f"Bearer {token}"}
        cfg.verify_ssl = ca_file is not None
        cfg.ssl_ca_cert = ca_file
        return cls(UrllibTransport(cfg), timeout, f"the token for {host}")

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> KubeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def requests(self) -> collections.Counter[str]:
        """API requests so far by method (GET, LIST, POST, PUT, DELETE), retries included."""
        with self.transport._lock:
            return collections.Counter(self.transport.counts)

    # --- Store protocol ---------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Versioned | None:
        res = _resource(kind)
        action = Action("get", res.rbac, None, f"{res.kind} {name}")
        status, obj, _ = self._call("GET", f"{res.path}/{quote(name, safe='')}", action, accept=(404,))
        if status == 404:
            return None
        return self._versioned(kind, obj, action)

    def list(self, kind: str, pool: str, node: str | None = None) -> list[Versioned]:
        selector = f"{POOL_LABEL}={label_value(pool)}"
        if node is not None:
            selector += f",{NODE_LABEL}={label_value(node)}"
        what = f"{_resource(kind).kind}s of pool {pool}" + (f" leased to {node!r}" if node is not None else "")
        return [v for v in self._list(kind, selector, what)
                if v.data.get("pool") == pool and (node is None or v.data.get("node") == node)]

    def list_all(self, kind: str) -> builtins.list[Versioned]:
        """Every object of `kind`, all pools (`metactl ipam pools`; not part of the Store protocol)."""
        return self._list(kind, None, f"all {_resource(kind).kind}s")

    def _list(self, kind: str, selector: str | None, what: str) -> builtins.list[Versioned]:
        res = _resource(kind)
        action = Action("list", res.rbac, None, what)
        out: builtins.list[Versioned] = []
        cont: str | None = None
        while True:
            # No resourceVersion: a consistent read from etcd. The allocator relies on it (a DEL must see an
            # ADD that just finished elsewhere). The price: etcd has no label index, so kube-apiserver reads
            # and decodes every IPBlock of the cluster for each list (~0.5 ms apiserver CPU per /26 block on
            # 2 cores, 1.20) and filters afterwards. The watch cache would answer from memory, but before
            # ConsistentListFromCache (1.31) a fresh read from it is not possible: resourceVersionMatch=
            # NotOlderThan with a current revision waits for an ipblocks event that may never come (measured:
            # every such list timed out once any other resource was written last). Hence: list sparingly.
            query = {"limit": str(LIST_PAGE)}
            if selector:
                query["labelSelector"] = selector
            if cont:
                query["continue"] = cont
            status, obj, _ = self._call("GET", res.path, action, query=query, accept=(404, 410))
            if status == 404:
                raise self._not_installed(res, action)
            if status == 410:
                # The continue token expired (a list that took minutes): start again from the top.
                out, cont = [], None
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("items"), builtins.list):
                raise CNIError(INTERNAL, f"Kubernetes API {self.api.host}: the list of {what} has no items")
            out += [self._versioned(kind, item, action) for item in obj["items"]]
            cont = (obj.get("metadata") or {}).get("continue") or None
            if not cont:
                return out

    def create(self, kind: str, name: str, data: dict[str, Any]) -> Versioned:
        res = _resource(kind)
        action = Action("create", res.rbac, None, f"{res.kind} {name}")
        body = {"apiVersion": API_VERSION, "kind": res.kind,
                "metadata": {"name": name, "labels": labels_for(kind, data)}, "spec": data}
        status, obj, raw = self._call("POST", res.path, action, body=body, accept=(404, 409))
        if status == 404:
            raise self._not_installed(res, action)
        if status == 409:
            landed = self._landed(kind, name, data)
            if landed is not None:
                return landed
            self._conflict()
            raise Conflict(f"{res.kind} {name} exists already: {server_message(raw)}")
        return self._checked(kind, obj, data, action)

    def update(self, obj: Versioned, data: dict[str, Any]) -> Versioned:
        res = _resource(obj.kind)
        action = Action("update", res.rbac, None, f"{res.kind} {obj.name}")
        body = {"apiVersion": API_VERSION, "kind": res.kind,
                "metadata": {"name": obj.name, "resourceVersion": obj.version, "labels": labels_for(obj.kind, data)},
                "spec": data}
        status, stored, raw = self._call("PUT", f"{res.path}/{quote(obj.name, safe='')}", action, body=body,
                                         accept=(404, 409))
        if status == 409:
            landed = self._landed(obj.kind, obj.name, data)
            if landed is not None:
                return landed
        if status in (404, 409):
            self._conflict()
            why = "was deleted" if status == 404 else "changed"
            raise Conflict(f"{res.kind} {obj.name} {why} since version {obj.version}: {server_message(raw)}")
        return self._checked(obj.kind, stored, data, action)

    def delete(self, obj: Versioned) -> None:
        res = _resource(obj.kind)
        action = Action("delete", res.rbac, None, f"{res.kind} {obj.name}")
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": obj.version}}
        status, _, raw = self._call("DELETE", f"{res.path}/{quote(obj.name, safe='')}", action, body=body,
                                    accept=(404, 409))
        if status == 409:
            self._conflict()
            raise Conflict(f"{res.kind} {obj.name} changed since version {obj.version}: {server_message(raw)}")

    # --- internals --------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, action: Action, *, query: Mapping[str, str] | None = None,
              body: Any = None, accept: tuple[int, ...]) -> tuple[int, Any, bytes]:
        self.transport.start_call()
        try:
            return self.api.call(method, path, action, query=query, body=body,
                                 content_type="application/json" if body is not None else None, accept=accept)
        except CNIError as e:
            if e.code == TRY_AGAIN_LATER:
                raise Unavailable(e.msg) from None
            raise

    def _landed(self, kind: str, name: str, data: dict[str, Any]) -> Versioned | None:
        """After a write that lost (409) but had been sent more than once: whether an earlier attempt took
        effect and only its answer was lost (a dropped connection, a read timeout, a 5xx after the commit).
        Then the object holds exactly `data`, and the write succeeded: reporting Conflict would make the
        allocator re-read, find its own write and reserve a second address for the same owner."""
        if self.transport.attempts() <= 1:
            return None
        current = self.get(kind, name)
        if current is not None and (current.data == data or current.data == _normalised(data)):
            return current
        return None

    def _conflict(self) -> None:
        with self._lock:
            self.conflicts += 1

    def _not_installed(self, res: Resource, action: Action) -> CNIError:
        return NotInstalled(INVALID_CONFIG, f"Kubernetes API {self.api.host} has no {res.rbac} "
                            f"(to {action.describe()}): install the meta-ipam CustomResourceDefinitions ({CRD_FILE})")

    def _versioned(self, kind: str, obj: Any, action: Action) -> Versioned:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        spec = obj.get("spec") if isinstance(obj, dict) else None
        if not (isinstance(meta, dict) and isinstance(meta.get("name"), str)
                and isinstance(meta.get("resourceVersion"), str) and isinstance(spec, dict)):
            raise CNIError(INTERNAL, f"Kubernetes API {self.api.host}: answer to {action.describe()} is not an object "
                           f"with metadata.name, metadata.resourceVersion and spec: {json.dumps(obj)[:200]}")
        return Versioned(kind, meta["name"], spec, meta["resourceVersion"])

    def _checked(self, kind: str, obj: Any, sent: dict[str, Any], action: Action) -> Versioned:
        """The written object, after making sure the server stored all of `sent`. A structural schema
        prunes fields it does not declare: a CRD older than this code would silently drop data (an owner
        field, say). The write has happened; failing it loudly still beats losing fields without a trace."""
        v = self._versioned(kind, obj, action)
        if v.data != sent and v.data != _normalised(sent):
            lost = _lost_fields(_normalised(sent), v.data)
            raise CNIError(INTERNAL, f"{action.describe()}: the API server did not store {', '.join(lost)} as sent; "
                           f"the installed {RESOURCES[kind].rbac} CRD is older than this meta-ipam: apply {CRD_FILE}")
        return v


def _resource(kind: str) -> Resource:
    try:
        return RESOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown store kind {kind!r} (expected {POOL!r} or {BLOCK!r})") from None
