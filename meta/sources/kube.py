"""The Kubernetes API source: pods and NetworkAttachmentDefinitions from the API server.

Two modes share one request path:
- thin (`KubeSource.from_kubeconfig`, one meta-cni process per CNI command): every lookup is a direct API
  call, there are no watches and no background threads.
- daemon (`KubeSource.watching`, the long-lived node daemon): list+watch caches of the node's pods and of all
  NADs answer lookups in memory; a cache miss, a cache that has not finished its first list, or a cached pod
  whose UID differs from the one asked for falls back to a direct GET, because a watch may lag behind a pod
  deleted and recreated under the same name. Events are posted by a background worker.

Every API call runs under a budget (`timeout` seconds): connect and read timeouts on each attempt, retries
with backoff on transport errors, 409, 429 and 5xx, and CNI error 11 (try again later) when the budget is
spent. 401/403 are configuration problems that retrying does not fix: CNI error 7 naming the missing right.

The official `kubernetes` client loads the credentials (kubeconfig, in-cluster service account, exec
plugins, client certificates) and builds the TLS connection pool; requests go through that pool as raw
JSON, so that watches, timeouts and retries are under our control and objects are not converted into the
client's models and back. It is imported only when a KubeSource is built: `meta-cni` stays cheap to start.
"""
from __future__ import annotations

import copy
import json
import logging
import queue
import random
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import quote, urlencode

import attrs

from ..cni.errors import INTERNAL, INVALID_CONFIG, TRY_AGAIN_LATER, CNIError
from . import Pod

log = logging.getLogger("meta-cni")

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
NAD_GROUP = "k8s.cni.cncf.io"
NAD_VERSION = "v1"
NAD_PLURAL = "network-attachment-definitions"
NAD_RESOURCE = f"{NAD_PLURAL}.{NAD_GROUP}"
NAD_KIND = "NetworkAttachmentDefinition"
COMPONENT = "meta-cni"
MERGE_PATCH = "application/merge-patch+json"

# Statuses worth another attempt: conflicts, throttling and the server's own trouble (etcd, restarts).
RETRYABLE = frozenset({409, 429, 500, 502, 503, 504})
# A connect attempt gets at least this long (or the whole budget when smaller) before the next retry.
CONNECT_MIN = 1.0
# Clearing the status on DEL is informational: it must not hold DEL up for the full budget.
CLEAR_STATUS_BUDGET = 3.0
# Thin-mode events are posted after the ADD has already failed; the runtime is waiting.
EVENT_BUDGET = 2.0
# Once a call found the API unreachable, later calls of the same (thin) command try once, briefly.
FAST_FAIL_BUDGET = 1.0
PROBE_BUDGET = 5.0
# Event message limit (the API server validates 1 KiB for events.k8s.io; stay under it for core/v1 too).
EVENT_MESSAGE_MAX = 1024
EVENT_QUEUE_MAX = 256
EVENT_AGGREGATE_MAX = 256
# Server-side watch timeout: a watch ends (and is re-opened) this often, so `cache_ages` stays fresh
# even when nothing changes and the server sends no bookmark.
WATCH_TIMEOUT = (30, 60)
# Read timeout beyond the server-side watch timeout: detects a connection that died without a FIN/RST.
WATCH_READ_MARGIN = 30.0
# A watch that ends sooner than this without an error counts as a failure for the backoff.
SHORT_WATCH = 1.0
LIST_PAGE = 500
# How long a GET's "not found" answers later misses of a watched collection (see WatchCache.note_absent;
# a watch session, WATCH_TIMEOUT, is shorter anyway), and how many such names are kept.
ABSENT_TTL = 60.0
ABSENT_MEMORY = 4096
UID_MEMORY = 1024

T = TypeVar("T")


# --- pure parts -----------------------------------------------------------------------------------------

@attrs.frozen
class Action:
    """One API request, described for error messages: what was asked, and the RBAC right it needs."""

    verb: str                # RBAC verb: get, list, watch, patch, create
    resource: str            # RBAC resource: pods, pods/status, events, network-attachment-definitions.k8s.cni.cncf.io
    namespace: str | None    # None: all namespaces
    what: str                # e.g. "pod default/p1"

    def describe(self) -> str:
        return f"{self.verb} {self.what}"

    def permission(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "in all namespaces"
        return f"{self.verb} {self.resource} {where}"


class Unreachable(Exception):
    """The API could not be talked to (connection refused, timed out, dropped, TLS trouble).
    `permanent`: retrying cannot help (a server certificate we do not trust)."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class Gone(Exception):
    """410 Gone: the resourceVersion a watch or list continued from is no longer available; re-list."""


@attrs.define
class Backoff:
    """Exponential backoff with jitter (jitter spreads the retries of many nodes after an API outage)."""

    base: float = 0.1
    cap: float = 2.0
    factor: float = 2.0
    jitter: float = 0.2
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * self.factor ** self.attempt)
        self.attempt += 1
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else delay

    def reset(self) -> None:
        self.attempt = 0


def server_message(data: bytes) -> str:
    """The `message` of a Kubernetes Status body, else the start of whatever the body is."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return data[:200].decode(errors="replace").strip()
    if isinstance(obj, dict) and isinstance(obj.get("message"), str):
        return str(obj["message"])
    return data[:200].decode(errors="replace").strip()


def api_error(status: int, data: bytes, action: Action, host: str, credentials: str) -> CNIError:
    """The CNI error for an answer that is neither success nor worth retrying."""
    msg = server_message(data)
    if status == 401:
        # Retrying cannot fix rejected credentials: invalid configuration, not "try again later".
        return CNIError(INVALID_CONFIG, f"Kubernetes API {host} rejected the credentials of {credentials} "
                        f"(401 Unauthorized) to {action.describe()}", msg)
    if status == 403:
        return CNIError(INVALID_CONFIG, f"{credentials} lacks the permission to {action.permission()} "
                        f"(Kubernetes API {host} answered 403 Forbidden to {action.describe()}); grant it with RBAC",
                        msg)
    return CNIError(INTERNAL, f"Kubernetes API {host} answered {status} to {action.describe()}: {msg}")


def unreachable_error(host: str, action: Action, waited: float, attempts: int, last: str) -> CNIError:
    return CNIError(TRY_AGAIN_LATER, f"Kubernetes API {host} did not answer {action.describe()}: gave up after "
                    f"{waited:.1f}s and {attempts} attempt{'s' if attempts != 1 else ''} (last: {last}); try again later")


def _retryable(status: int, data: bytes) -> bool:
    if status not in RETRYABLE:
        return False
    # A failed UID precondition stays failed: the object is another one now.
    return not (status == 409 and "precondition" in server_message(data).lower())


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _field(obj: Mapping[str, Any], key: str, kind: type, what: str, path: str, required: bool = True) -> Any:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind):
        names: dict[type, str] = {str: "a string", dict: "an object"}
        expected = names.get(kind, kind.__name__)
        raise CNIError(INVALID_CONFIG, f"{what} from the Kubernetes API: {path}{key} must be {expected}, "
                       f"got {type(value).__name__}")
    return value


def _metadata(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CNIError(INVALID_CONFIG, f"{what} from the Kubernetes API is not an object but {type(obj).__name__}")
    meta: dict[str, Any] = _field(obj, "metadata", dict, what, "")
    _field(meta, "name", str, what, "metadata.")
    _field(meta, "namespace", str, what, "metadata.")
    return meta


def _annotations(meta: Mapping[str, Any], what: str) -> dict[str, str]:
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise CNIError(INVALID_CONFIG, f"{what} from the Kubernetes API: metadata.annotations must map names to strings")
    return dict(ann)


def pod_from_object(obj: object, what: str = "pod") -> Pod:
    """A Pod from the API's JSON; an object that is not a pod's shape is an error naming the field."""
    meta = _metadata(obj, what)
    what = f"pod {meta['namespace']}/{meta['name']}"
    uid = _field(meta, "uid", str, what, "metadata.", required=False)
    return Pod(namespace=meta["namespace"], name=meta["name"], uid=uid or None, annotations=_annotations(meta, what))


def nad_from_object(obj: object, what: str = NAD_KIND) -> dict[str, Any]:
    """The NAD as the manifests source hands it over (apiVersion, kind, metadata, spec), without the
    server's bookkeeping (managedFields, ...): what meta.nad.from_nad reads, and less to keep in a cache."""
    meta = _metadata(obj, what)
    what = f"{NAD_KIND} {meta['namespace']}/{meta['name']}"
    assert isinstance(obj, dict)
    slim_meta: dict[str, Any] = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "generation")
                                 if k in meta}
    if meta.get("annotations") is not None:
        slim_meta["annotations"] = _annotations(meta, what)
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise CNIError(INVALID_CONFIG, f"{what} from the Kubernetes API: spec must be an object, got {type(spec).__name__}")
    out = {"apiVersion": obj.get("apiVersion") or f"{NAD_GROUP}/{NAD_VERSION}", "kind": obj.get("kind") or NAD_KIND,
           "metadata": slim_meta}
    if spec is not None:
        out["spec"] = copy.deepcopy(spec)
    return out


def status_patch(status: list[dict[str, Any]] | None, uid: str | None = None) -> dict[str, Any]:
    """The JSON merge patch that sets (or, for None, removes) the network-status annotation. A merge patch
    touches only this key, so it cannot lose a concurrent writer's changes and needs no resourceVersion.
    With `uid`, the patch only applies to that incarnation of the pod (the UID is immutable)."""
    # Multus (NAD client) writes the list indented with 4 spaces; readers parse JSON, but humans read it too.
    value = json.dumps(status, indent=4) if status is not None else None
    meta: dict[str, Any] = {"annotations": {NETWORK_STATUS: value}}
    if uid:
        meta["uid"] = uid
    return {"metadata": meta}


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def event_body(pod: Pod, type_: str, reason: str, message: str, host: str, now: float,
               count: int = 1, first: float | None = None) -> dict[str, Any]:
    """A core/v1 Event about the pod, named and shaped as client-go's recorder makes them."""
    if len(message) > EVENT_MESSAGE_MAX:
        message = message[:EVENT_MESSAGE_MAX - 3] + "..."
    involved: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace, "name": pod.name}
    if pod.uid:
        involved["uid"] = pod.uid
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{pod.name}.{time.time_ns():x}", "namespace": pod.namespace},
        "involvedObject": involved,
        "reason": reason[:128], "message": message, "type": type_,
        "source": {"component": COMPONENT, "host": host},
        "reportingComponent": COMPONENT, "reportingInstance": host,
        "count": count, "firstTimestamp": rfc3339(first if first is not None else now), "lastTimestamp": rfc3339(now),
    }


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Newline-delimited JSON of a watch, from chunks that split lines anywhere."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i])
            del buf[:i + 1]
            if line.strip():
                yield line
    if bytes(buf).strip():
        yield bytes(buf)


class Store(Generic[T]):
    """The objects of one watch cache by (namespace, name), with the resourceVersion to resume from.
    Objects that do not parse are dropped (a lookup then falls back to a GET, which reports them)."""

    def __init__(self, kind: str, convert: Callable[[dict[str, Any]], T]) -> None:
        self.kind = kind
        self.convert = convert
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], T] = {}
        self.resource_version: str | None = None

    @staticmethod
    def key(obj: Any) -> tuple[str, str] | None:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            return None
        return str(meta.get("namespace") or ""), meta["name"]

    def _converted(self, obj: dict[str, Any]) -> T | None:
        try:
            return self.convert(obj)
        except CNIError as e:
            log.warning("watch %s: ignoring %s", self.kind, e.msg)
            return None

    def replace(self, items: list[Any], resource_version: str) -> None:
        fresh: dict[tuple[str, str], T] = {}
        for obj in items:
            key = self.key(obj)
            if key is None:
                continue
            value = self._converted(obj)
            if value is not None:
                fresh[key] = value
        with self.lock:
            self.objects = fresh
            self.resource_version = resource_version

    def apply(self, event: Any) -> None:
        """One watch event. ERROR events carry a Status: 410 means re-list (Gone), others are raised."""
        if not isinstance(event, dict):
            raise ValueError(f"watch event is not an object: {event!r:.200}")
        type_, obj = event.get("type"), event.get("object")
        if type_ == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message", "") if isinstance(obj, dict) else str(obj)
            if code == 410:
                raise Gone(message)
            raise ValueError(f"watch error {code}: {message}")
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if type_ == "BOOKMARK":
            if isinstance(rv, str) and rv:
                with self.lock:
                    self.resource_version = rv
            return
        key = self.key(obj)
        if type_ not in ("ADDED", "MODIFIED", "DELETED") or key is None or not isinstance(obj, dict):
            raise ValueError(f"unexpected watch event {type_!r}: {json.dumps(event)[:200]}")
        value = self._converted(obj) if type_ != "DELETED" else None
        with self.lock:
            if value is None:
                self.objects.pop(key, None)
            else:
                self.objects[key] = value
            if isinstance(rv, str) and rv:
                self.resource_version = rv

    def get(self, namespace: str, name: str) -> T | None:
        with self.lock:
            return self.objects.get((namespace, name))

    def __len__(self) -> int:
        with self.lock:
            return len(self.objects)


# --- transport ------------------------------------------------------------------------------------------

class Response(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...

    def read(self) -> bytes: ...
    def lines(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class Transport(Protocol):
    """HTTP to one API server; raises Unreachable for anything below HTTP."""

    @property
    def host(self) -> str: ...

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: bytes | None = None,
                content_type: str | None = None, timeout: tuple[float, float]) -> Response: ...

    def close(self) -> None: ...


def _reason(e: BaseException) -> Unreachable:
    """A short, stable description of a transport failure."""
    import urllib3.exceptions as ux

    text = str(e)
    if isinstance(e, ux.SSLError):
        permanent = bool(re.search(r"certificate verify failed|CERTIFICATE_VERIFY_FAILED|hostname .* doesn't match",
                                   text, re.I))
        return Unreachable(f"TLS: {text}", permanent)
    # Before the timeout classes: urllib3's NewConnectionError (refused, no route, DNS) subclasses
    # ConnectTimeoutError, but "connection refused" says much more than "timed out".
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return Unreachable(m.group(1).strip().lower())
    if isinstance(e, ux.ConnectTimeoutError):
        return Unreachable("connect timed out")
    if isinstance(e, (ux.ReadTimeoutError, socket.timeout, TimeoutError)):
        return Unreachable("read timed out")
    if isinstance(e, ux.ProtocolError):
        return Unreachable(f"connection dropped ({text.split(':')[0]})")
    return Unreachable(f"{type(e).__name__}: {text}" if text else type(e).__name__)


class _UrllibResponse:
    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status: int = resp.status
        self.headers: Mapping[str, str] = resp.headers

    def read(self) -> bytes:
        try:
            return bytes(self._resp.read())
        except Exception as e:  # urllib3 and socket errors alike
            raise _reason(e) from e

    def lines(self) -> Iterator[bytes]:
        try:
            yield from iter_lines(self._resp.stream(65536))
        except Unreachable:
            raise
        except Exception as e:
            raise _reason(e) from e

    def close(self) -> None:
        try:
            # shutdown() interrupts a read blocked in another thread (a watch being closed).
            shutdown = getattr(self._resp, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self._resp.release_conn()
        except Exception:  # closing an already broken connection
            pass


class UrllibTransport:
    """The official client's configuration and connection pool, used for raw JSON requests."""

    def __init__(self, configuration: Any) -> None:
        from kubernetes.client import rest

        self.configuration = configuration
        self.host: str = str(configuration.host).rstrip("/")
        self.pool = rest.RESTClientObject(configuration).pool_manager
        if not configuration.verify_ssl:
            import warnings

            import urllib3

            # The kubeconfig asked for it; a warning on every request would only flood the runtime's log.
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)

    @classmethod
    def from_kubeconfig(cls, path: str) -> UrllibTransport:
        from kubernetes.client import Configuration
        from kubernetes.config import ConfigException, load_kube_config

        cfg = Configuration()
        try:
            load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
        except FileNotFoundError as e:
            raise CNIError(INVALID_CONFIG, f"meta-cni config kubeconfig: {path}: {e.strerror}") from None
        except OSError as e:
            raise CNIError(INVALID_CONFIG, f"meta-cni config kubeconfig: {path}: {e.strerror or e}") from None
        except (ConfigException, ValueError, TypeError, KeyError, AttributeError) as e:
            # The loader raises plain Python errors for some malformed files (a list where a map belongs).
            raise CNIError(INVALID_CONFIG, f"meta-cni config kubeconfig: {path}: {type(e).__name__}: {e}") from None
        except Exception as e:  # YAML errors, exec-plugin failures
            raise CNIError(INVALID_CONFIG, f"meta-cni config kubeconfig: {path}: {type(e).__name__}: {e}") from None
        return cls(cfg)

    @classmethod
    def in_cluster(cls) -> UrllibTransport:
        from kubernetes.client import Configuration
        from kubernetes.config import ConfigException, load_incluster_config

        cfg = Configuration()
        try:
            load_incluster_config(client_configuration=cfg)
        except ConfigException as e:
            raise CNIError(INVALID_CONFIG, f"in-cluster Kubernetes config (service account): {e}") from None
        return cls(cfg)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"{COMPONENT}/0.1"}
        if content_type:
            headers["Content-Type"] = content_type
        # Asked per request: the refresh hook rotates service-account and exec-plugin tokens.
        for setting in self.configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers

    def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: bytes | None = None,
                content_type: str | None = None, timeout: tuple[float, float]) -> Response:
        import urllib3

        url = self.host + path + (f"?{urlencode(query)}" if query else "")
        try:
            resp = self.pool.request(method, url, body=body, headers=self._headers(content_type),
                                     timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
                                     retries=False, redirect=False, preload_content=False)
        except CNIError:
            raise
        except Exception as e:
            raise _reason(e) from e
        return _UrllibResponse(resp)

    def close(self) -> None:
        try:
            self.pool.clear()
        except Exception:
            pass


# --- requests with a budget ------------------------------------------------------------------------------

class Api:
    """Requests under a time budget, with retries, and errors turned into CNI errors."""

    def __init__(self, transport: Transport, timeout: float, credentials: str, fail_fast: bool,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.transport = transport
        self.host = transport.host
        self.timeout = timeout
        self.credentials = credentials
        self.fail_fast = fail_fast
        self.clock = clock
        self.sleep = sleep
        self.down = False  # the last call gave up because the API did not answer

    def call(self, method: str, path: str, action: Action, *, query: Mapping[str, str] | None = None,
             body: Any = None, content_type: str | None = None, budget: float | None = None,
             accept: Iterable[int] | Callable[[int, bytes], bool] = (404,), raw: bool = False) -> tuple[int, Any, bytes]:
        """(status, parsed JSON or None, raw body) for a 2xx answer or one `accept` takes (a set of statuses or
        a predicate of status and body, asked before retrying); raises CNIError otherwise (11 when the budget
        ran out, 7 for 401/403 and untrusted servers)."""
        if not callable(accept):
            statuses = frozenset(accept)
            accept = lambda status, _data: status in statuses  # noqa: E731
        budget = self.timeout if budget is None else min(budget, self.timeout)
        if self.fail_fast and self.down:
            budget = min(budget, FAST_FAIL_BUDGET)
        payload = json.dumps(body).encode() if body is not None else None
        start = self.clock()
        deadline = start + budget
        backoff = Backoff()
        attempts = 0
        while True:
            attempts += 1
            remaining = max(deadline - self.clock(), 0.001)
            wait_hint: float | None = None
            try:
                resp = self.transport.request(method, path, query=query, body=payload, content_type=content_type,
                                              timeout=(min(remaining, max(CONNECT_MIN, budget / 3)), remaining))
                try:
                    data = resp.read()
                finally:
                    resp.close()
            except Unreachable as e:
                if e.permanent:
                    raise CNIError(INVALID_CONFIG, f"Kubernetes API {self.host}: {e.reason} (to {action.describe()}); "
                                   f"check the server's CA in {self.credentials}") from None
                last = e.reason
            else:
                status = resp.status
                if 200 <= status < 300 or accept(status, data):
                    self.down = False
                    return status, self._json(data, action) if 200 <= status < 300 and not raw else None, data
                if not _retryable(status, data):
                    self.down = False
                    raise api_error(status, data, action, self.host, self.credentials)
                last = f"{status}: {server_message(data)}"
                wait_hint = _retry_after(resp.headers) if status in (429, 503) else None
            delay = backoff.next()
            if wait_hint is not None:
                delay = max(delay, wait_hint)
            if self.clock() + delay >= deadline:
                self.down = True
                raise unreachable_error(self.host, action, self.clock() - start, attempts, last)
            self.sleep(delay)

    def _json(self, data: bytes, action: Action) -> Any:
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise CNIError(INTERNAL, f"Kubernetes API {self.host} sent a malformed answer to {action.describe()}: "
                           f"{type(e).__name__}: {e}") from None

    def open_watch(self, path: str, query: Mapping[str, str], action: Action, read_timeout: float) -> Response:
        """One watch request, no retries (the watch loop has its own backoff)."""
        connect = min(self.timeout, max(CONNECT_MIN, self.timeout / 3))
        resp = self.transport.request("GET", path, query=query, timeout=(connect, read_timeout))
        if resp.status == 200:
            return resp
        try:
            data = resp.read()
        finally:
            resp.close()
        if resp.status == 410:
            raise Gone(server_message(data))
        if _retryable(resp.status, data):
            raise Unreachable(f"{resp.status}: {server_message(data)}")
        raise api_error(resp.status, data, action, self.host, self.credentials)


# --- watch caches ---------------------------------------------------------------------------------------

class WatchCache(Generic[T]):
    """list+watch of one collection into a Store, in a daemon thread: resumes watches from the last
    resourceVersion, re-lists on 410 Gone, reconnects with backoff."""

    def __init__(self, kind: str, api: Api, path: str, query: Mapping[str, str], action: Action,
                 convert: Callable[[dict[str, Any]], T], stop: threading.Event,
                 watch_timeout: tuple[int, int] = WATCH_TIMEOUT) -> None:
        self.kind = kind
        self.api = api
        self.path = path
        self.query = dict(query)
        self.action = action
        self.store: Store[T] = Store(kind, convert)
        self.stop = stop
        self.watch_timeout = watch_timeout
        self.synced = threading.Event()
        self.started = time.monotonic()
        self.last_heard: float | None = None
        self.last_error: str | None = None
        self.lists = 0  # completed lists (the first one and every re-list)
        self._resp: Response | None = None
        self._lock = threading.Lock()
        # Objects a GET found missing while the current watch was open: (watch session, when).
        self._absent: dict[tuple[str, str], tuple[int, float]] = {}
        self._session = 0
        self.thread = threading.Thread(target=self._run, name=f"meta-cni-watch-{kind}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def age(self) -> float:
        heard = self.last_heard if self.last_heard is not None else self.started
        return max(0.0, time.monotonic() - heard)

    def _heard(self) -> None:
        self.last_heard = time.monotonic()

    def _run(self) -> None:
        backoff = Backoff(base=0.2, cap=10.0)
        while not self.stop.is_set():
            try:
                if self.store.resource_version is None:
                    self._list()
                opened = time.monotonic()
                self._watch()
                if time.monotonic() - opened < SHORT_WATCH:
                    # Ended as soon as it began (a proxy or a server shutting down): do not spin.
                    self.stop.wait(backoff.next())
                else:
                    backoff.reset()
            except Gone as e:
                log.info("watch %s: resourceVersion %s expired (%s): re-listing", self.kind,
                         self.store.resource_version, e)
                self.store.resource_version = None
            except (CNIError, Unreachable, ValueError) as e:
                if self.stop.is_set():
                    break
                self.last_error = e.msg if isinstance(e, CNIError) else str(e)
                delay = backoff.next()
                log.warning("watch %s: %s; retrying in %.1fs", self.kind, self.last_error, delay)
                self.stop.wait(delay)
            except Exception as e:  # a bug must not silently end the cache
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("watch %s failed", self.kind)
                self.stop.wait(backoff.next())

    def _list(self) -> None:
        items: list[Any] = []
        cont: str | None = None
        list_action = attrs.evolve(self.action, verb="list")
        while True:
            query = dict(self.query, limit=str(LIST_PAGE))
            if cont:
                query["continue"] = cont
            status, obj, data = self.api.call("GET", self.path, list_action, query=query, accept=(404, 410))
            if status == 410:  # the continue token expired: start over
                raise Gone(server_message(data))
            if status == 404:
                raise ValueError(f"the API has no {self.action.resource} (is its CustomResourceDefinition installed?)")
            if not isinstance(obj, dict) or not isinstance(obj.get("items"), list):
                raise ValueError(f"list of {self.kind}: answer without items")
            items.extend(obj["items"])
            meta = obj.get("metadata") or {}
            cont = meta.get("continue") or None
            if not cont:
                break
        rv = meta.get("resourceVersion")
        if not isinstance(rv, str) or not rv:
            raise ValueError(f"list of {self.kind}: answer without metadata.resourceVersion")
        self.store.replace(items, rv)
        self.lists += 1
        self.last_error = None
        self._heard()
        self.synced.set()
        log.info("watch %s: listed %d at resourceVersion %s", self.kind, len(self.store), rv)

    def _watch(self) -> None:
        seconds = random.randint(*self.watch_timeout)
        query = dict(self.query, watch="1", allowWatchBookmarks="true", timeoutSeconds=str(seconds),
                     resourceVersion=str(self.store.resource_version))
        resp = self.api.open_watch(self.path, query, attrs.evolve(self.action, verb="watch"),
                                   read_timeout=seconds + WATCH_READ_MARGIN)
        with self._lock:
            self._resp = resp
            self._session += 1
            self._absent.clear()
        events = 0
        try:
            if self.stop.is_set():
                return
            self._heard()
            self.last_error = None
            log.debug("watch %s: open from resourceVersion %s for %ds", self.kind, query["resourceVersion"], seconds)
            for line in resp.lines():
                events += 1
                if self.stop.is_set():
                    return
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"undecodable watch event: {e}") from None
                self._heard()
                self.store.apply(event)
            self._heard()  # the server closed the watch at its timeout: it was there all along
            log.debug("watch %s: ended by the server after %d events", self.kind, events)
        finally:
            with self._lock:
                self._resp = None
            resp.close()

    def interrupt(self) -> None:
        with self._lock:
            resp = self._resp
        if resp is not None:
            resp.close()

    def note_absent(self, namespace: str, name: str) -> None:
        """A GET (a quorum read) found no such object while this watch was open. Until that watch ends, a
        miss in the store still means "absent": an object created later reaches the store through this
        watch, just as changes to the objects it holds do (the same staleness as any cached answer)."""
        with self._lock:
            if self._resp is not None:
                if len(self._absent) >= ABSENT_MEMORY:
                    self._absent.clear()
                self._absent[(namespace, name)] = (self._session, time.monotonic())

    def known_absent(self, namespace: str, name: str) -> bool:
        """Whether a miss for this object can be answered without asking the API (see note_absent)."""
        with self._lock:
            seen = self._absent.get((namespace, name))
            if seen is None:
                return False
            if self._resp is None or seen[0] != self._session or time.monotonic() - seen[1] > ABSENT_TTL:
                del self._absent[(namespace, name)]
                return False
            return True


# --- events ---------------------------------------------------------------------------------------------

class EventWorker:
    """Posts events from a bounded queue in a daemon thread, so that recording never blocks an ADD.
    Repeats of the same event for the same pod bump the count of the first (as client-go does)."""

    def __init__(self, post: Callable[[dict[str, Any], tuple[Any, ...] | None], None], stop: threading.Event) -> None:
        self.post = post
        self.stop = stop
        self.queue: queue.Queue[tuple[dict[str, Any], tuple[Any, ...]] | None] = queue.Queue(maxsize=EVENT_QUEUE_MAX)
        self.thread = threading.Thread(target=self._run, name="meta-cni-events", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        self.thread.start()

    def submit(self, body: dict[str, Any], key: tuple[Any, ...]) -> None:
        try:
            self.queue.put_nowait((body, key))
        except queue.Full:
            self.dropped += 1
            log.warning("event queue full, dropped event %s for pod %s/%s", body.get("reason"),
                        body["involvedObject"]["namespace"], body["involvedObject"]["name"])

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            try:
                self.post(*item)
            except Exception as e:  # best effort: an event must never take the worker down
                log.warning("could not record event: %s", e.msg if isinstance(e, CNIError) else e)

    def close(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass


# --- the source -----------------------------------------------------------------------------------------

class KubeSource:
    """The Source seam over the Kubernetes API (see the module docstring for the two modes)."""

    def __init__(self, transport: Transport, timeout: float, credentials: str, *, thin: bool = True,
                 host_name: str | None = None) -> None:
        self.api = Api(transport, timeout, credentials, fail_fast=thin)
        self.timeout = timeout
        self.thin = thin
        self.host_name = host_name or socket.gethostname()
        self.caches: dict[str, WatchCache[Any]] = {}
        self.events: EventWorker | None = None
        self._stop = threading.Event()
        # Pod UIDs this source verified (get_pod), so that a status is only written on that incarnation.
        self._uids: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._uids_lock = threading.Lock()
        # Watch mode: (pod uid, type, reason, message) -> (event name, count, first time).
        self._aggregate: OrderedDict[tuple[Any, ...], tuple[str, int, float]] = OrderedDict()

    # --- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_kubeconfig(cls, path: str, timeout: float) -> KubeSource:
        """Thin mode: direct API calls, no watches, no threads."""
        return cls(UrllibTransport.from_kubeconfig(path), timeout, f"kubeconfig {path}", thin=True)

    @classmethod
    def watching(cls, kubeconfig: str | None, node_name: str | None, timeout: float) -> KubeSource:
        """Daemon mode: watch caches of the pods on `node_name` (all pods when None) and of the NADs of all
        namespaces; `kubeconfig` None means the in-cluster service account."""
        if kubeconfig:
            transport, credentials = UrllibTransport.from_kubeconfig(kubeconfig), f"kubeconfig {kubeconfig}"
        else:
            transport, credentials = UrllibTransport.in_cluster(), "the pod's service account"
        src = cls(transport, timeout, credentials, thin=False, host_name=node_name)
        src.start_watches(node_name)
        return src

    def start_watches(self, node_name: str | None, watch_timeout: tuple[int, int] = WATCH_TIMEOUT) -> None:
        where = f"on node {node_name}" if node_name else "in all namespaces"
        pod_query = {"fieldSelector": f"spec.nodeName={node_name}"} if node_name else {}
        self.caches["pods"] = WatchCache(
            "pods", self.api, "/api/v1/pods", pod_query, Action("list", "pods", None, f"pods {where}"),
            pod_from_object, self._stop, watch_timeout)
        self.caches["nads"] = WatchCache(
            "nads", self.api, f"/apis/{NAD_GROUP}/{NAD_VERSION}/{NAD_PLURAL}", {},
            Action("list", NAD_RESOURCE, None, f"{NAD_KIND}s in all namespaces"),
            nad_from_object, self._stop, watch_timeout)
        self.events = EventWorker(self._post_event, self._stop)
        for cache in self.caches.values():
            cache.start()
        self.events.start()

    def close(self) -> None:
        """Stop the watches and the event worker (queued events are dropped), release connections."""
        self._stop.set()
        for cache in self.caches.values():
            cache.interrupt()
        if self.events is not None:
            self.events.close()
        threads = [c.thread for c in self.caches.values()] + ([self.events.thread] if self.events else [])
        for t in threads:
            if t.is_alive():
                t.join(timeout=5)
        self.api.transport.close()

    def __enter__(self) -> KubeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- daemon health ----------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Every watch cache finished its initial list (True when not watching)."""
        return all(c.synced.is_set() for c in self.caches.values())

    def cache_ages(self) -> dict[str, float]:
        """Seconds since each watch cache last heard from the API ({} when not watching)."""
        return {kind: c.age() for kind, c in self.caches.items()}

    # --- Source protocol --------------------------------------------------------------------------------

    def _cached(self, kind: str) -> WatchCache[Any] | None:
        cache = self.caches.get(kind)
        return cache if cache is not None and cache.synced.is_set() else None

    def _remember_uid(self, pod: Pod) -> None:
        if not pod.uid:
            return
        with self._uids_lock:
            self._uids[(pod.namespace, pod.name)] = pod.uid
            self._uids.move_to_end((pod.namespace, pod.name))
            while len(self._uids) > UID_MEMORY:
                self._uids.popitem(last=False)

    def get_pod(self, namespace: str, name: str, uid: str | None = None) -> Pod | None:
        cache = self._cached("pods")
        if cache is not None:
            pod: Pod | None = cache.store.get(namespace, name)
            if pod is not None and (uid is None or pod.uid == uid):
                self._remember_uid(pod)
                return attrs.evolve(pod, annotations=dict(pod.annotations))
            # A miss or another UID: the watch may lag behind a pod just created or recreated.
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        status, obj, _ = self.api.call("GET", path, Action("get", "pods", namespace, f"pod {namespace}/{name}"))
        if status == 404:
            return None
        found = pod_from_object(obj, f"pod {namespace}/{name}")
        self._remember_uid(found)
        return found

    def get_nad(self, namespace: str, name: str) -> dict[str, Any] | None:
        what = f"{NAD_KIND} {namespace}/{name}"
        cache = self._cached("nads")
        if cache is not None:
            cached: dict[str, Any] | None = cache.store.get(namespace, name)
            if cached is not None:
                return copy.deepcopy(cached)
            # A miss is the error path (unknown network), a NAD created a moment ago, or a name that is not a
            # NAD at all (a clusterNetwork that names a confDir file, on every ADD): ask the API once per watch.
            if cache.known_absent(namespace, name):
                return None
        path = (f"/apis/{NAD_GROUP}/{NAD_VERSION}/namespaces/{quote(namespace, safe='')}/{NAD_PLURAL}/"
                f"{quote(name, safe='')}")
        status, obj, _ = self.api.call("GET", path, Action("get", NAD_RESOURCE, namespace, what))
        if status == 404:
            if cache is not None:
                cache.note_absent(namespace, name)
            return None
        return nad_from_object(obj, what)

    def publish_status(self, namespace: str, name: str, status: list[dict[str, Any]] | None,
                       uid: str | None = None) -> None:
        """Set the network-status annotation through the pods/status subresource (as Multus does: RBAC
        then needs `patch pods/status`, not pod updates); None removes it. The patch names the pod's UID
        (the given one, else the one this source looked up) so it never lands on a namesake."""
        if uid is None and status is not None:
            with self._uids_lock:
                uid = self._uids.get((namespace, name))
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}/status"
        action = Action("patch", "pods/status", namespace, f"status of pod {namespace}/{name}")

        def replaced(code: int, data: bytes) -> bool:
            # The UID is immutable: a patch naming another UID fails (409 precondition or 422 immutable field).
            return bool(uid) and code in (409, 422) and "uid" in server_message(data).lower()

        # raw: the answer is the whole pod, which nothing here reads (parsing it costs a node ~0.2 ms per ADD)
        code, _, data = self.api.call("PATCH", path, action, body=status_patch(status, uid), content_type=MERGE_PATCH,
                                      budget=None if status is not None else CLEAR_STATUS_BUDGET,
                                      accept=lambda code, data: code == 404 or replaced(code, data), raw=True)
        if code == 404:
            log.info("pod %s/%s is gone: no network-status to %s", namespace, name, "write" if status else "clear")
        elif code != 200:
            # Deleted and recreated under the same name: this status belongs to the old pod, not the new one.
            log.warning("pod %s/%s is no longer UID %s: network-status not written (%s)", namespace, name, uid,
                        server_message(data))

    def problem(self) -> str | None:
        """None when the API answers (and, watching, every cache has listed), else why not."""
        unsynced = [k for k, c in self.caches.items() if not c.synced.is_set()]
        if unsynced:
            return "Kubernetes watch caches not synced yet: " + "; ".join(
                f"{k}: {self.caches[k].last_error or 'initial list in progress'}" for k in unsynced)
        action = Action("get", "/readyz", None, "readiness /readyz")
        try:
            code, _, data = self.api.call("GET", "/readyz", action, budget=PROBE_BUDGET, accept=range(400, 600),
                                          raw=True)
        except CNIError as e:
            return e.msg
        if code == 200:
            return None
        if code in (401, 403):
            return f"Kubernetes API {self.api.host} refused {self.api.credentials} ({code}): {server_message(data)}"
        return f"Kubernetes API {self.api.host} is not ready ({code}): {server_message(data)[:200]}"

    def record_event(self, pod: Pod, type_: str, reason: str, message: str) -> None:
        try:
            now = time.time()
            body = event_body(pod, type_, reason, message, self.host_name, now)
            if self.events is not None:
                self.events.submit(body, (pod.namespace, pod.name, pod.uid, type_, reason, message))
                return
            if self.api.down:
                # The API just failed this command: the event would fail too, and the runtime is waiting.
                log.warning("pod %s: %s: %s (API unreachable, event not recorded)", pod.ref, reason, message)
                return
            self._create_event(body, EVENT_BUDGET)
        except Exception as e:  # best effort by contract
            log.warning("could not record event %s for pod %s: %s", reason, pod.ref,
                        e.msg if isinstance(e, CNIError) else e)

    def _events_path(self, namespace: str) -> str:
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/events"

    def _create_event(self, body: dict[str, Any], budget: float | None) -> str:
        inv = body["involvedObject"]
        action = Action("create", "events", inv["namespace"], f"event for pod {inv['namespace']}/{inv['name']}")
        self.api.call("POST", self._events_path(inv["namespace"]), action, body=body, budget=budget, accept=(404, 409))
        return str(body["metadata"]["name"])

    def _post_event(self, body: dict[str, Any], key: tuple[Any, ...] | None) -> None:
        """In the worker: create the event, or bump the count of the same one posted before."""
        inv = body["involvedObject"]
        seen = self._aggregate.get(key) if key is not None else None
        now = time.time()
        if seen is not None:
            name, count, first = seen
            action = Action("patch", "events", inv["namespace"], f"event {inv['namespace']}/{name}")
            code, _, _ = self.api.call("PATCH", f"{self._events_path(inv['namespace'])}/{quote(name, safe='')}", action,
                                       body={"count": count + 1, "lastTimestamp": rfc3339(now)},
                                       content_type=MERGE_PATCH)
            if code != 404:
                self._aggregate[key] = (name, count + 1, first)  # type: ignore[index]
                self._aggregate.move_to_end(key)  # type: ignore[arg-type]
                return
            # The event expired (events have a TTL): start a new one.
        name = self._create_event(body, None)
        if key is not None:
            self._aggregate[key] = (name, 1, now)
            while len(self._aggregate) > EVENT_AGGREGATE_MAX:
                self._aggregate.popitem(last=False)
