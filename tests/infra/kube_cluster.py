"""A real, throw-away Kubernetes API server on loopback: Debian's etcd + kube-apiserver v1.20.2.

kube-apiserver is built offline by `tests/infra/provision.sh` (recipe: /work/shared/reference/
test-infrastructure.md sections 5.1-5.3) and cached in ``~/.cache/meta-cni/bin``. There is no
controller-manager, scheduler or kubelet: objects are stored and served, pods stay Pending.

Authentication is by static bearer token. Authorization is real RBAC: the admin token's user is in
``system:masters`` (may do anything), the plain user token's user is only in ``system:authenticated``, so
what it may do is exactly what the bootstrap policy plus a test's own Roles/Bindings grant.

Typical use::

    with KubeCluster(KUBE_APISERVER) as cluster:
        cluster.apply(Path("crds"))
        api = kubernetes.client.CoreV1Api(cluster.api_client())
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import kubernetes.client
import kubernetes.dynamic
import kubernetes.dynamic.exceptions
import yaml

__all__ = ["ADMIN_USER", "KUBE_APISERVER", "PLAIN_USER", "KubeCluster", "KubeClusterError"]

#: Where provision.sh caches the binary (same rule as the script's CACHE_DIR).
KUBE_APISERVER: Path = Path(os.environ.get("META_CNI_CACHE", Path.home() / ".cache" / "meta-cni")) / "bin" / "kube-apiserver"

ADMIN_USER = "meta-cni-admin"
PLAIN_USER = "meta-cni-node"

# Objects other objects depend on go first, so one apply() of a directory works in any file order.
_APPLY_FIRST = {"Namespace": 0, "CustomResourceDefinition": 1}


class KubeClusterError(RuntimeError):
    """etcd or kube-apiserver did not start, or an apply step did not complete."""


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for 127.0.0.1; all held open together so they are distinct.

    There is a window between closing them and the servers binding; start() retries on a bind failure.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise KubeClusterError(f"openssl {' '.join(args)} failed: {p.stderr.strip()}")


class KubeCluster:
    """etcd + kube-apiserver on 127.0.0.1 with free ports, all state under `workdir`.

    Attributes after start(): `host` (https://127.0.0.1:PORT), `token` (admin, system:masters),
    `user_token`/`user_name` (plain user, no RBAC grants), `kubeconfig` (admin, insecure-skip-tls-verify),
    `ca_file` (CA that signed the serving cert for 127.0.0.1/localhost), `workdir`, `etcd_url`.
    """

    def __init__(self, apiserver: Path = KUBE_APISERVER, *, workdir: Path | None = None, etcd: str = "etcd",
                 ready_timeout: float = 120.0, keep_workdir: bool = False) -> None:
        self.apiserver_binary = Path(apiserver)
        self.etcd_binary = etcd
        # Ready takes ~3 s on an idle machine and ~11 s while other suites load both cores (mostly building
        # the OpenAPI spec before it listens); the recipe once saw 70 s right after the build.
        self.ready_timeout = ready_timeout
        self._own_workdir = workdir is None
        self.keep_workdir = keep_workdir
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="meta-cni-kube-"))
        self.token = secrets.token_hex(16)
        self.user_token = secrets.token_hex(16)
        self.user_name = PLAIN_USER
        self.admin_name = ADMIN_USER
        self.port = 0
        self.host = ""
        self.etcd_url = ""
        self.cert_dir = self.workdir / "pki"
        self.ca_file = self.cert_dir / "ca.crt"
        self.cert_file = self.cert_dir / "apiserver.crt"
        self.key_file = self.cert_dir / "apiserver.key"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.etcd_log = self.workdir / "etcd.log"
        self.apiserver_log = self.workdir / "kube-apiserver.log"
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._api_client: kubernetes.client.ApiClient | None = None
        self._dynamic: kubernetes.dynamic.DynamicClient | None = None
        self._stopped = False

    # ----------------------------------------------------------------- life cycle

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> KubeCluster:
        """Start etcd and kube-apiserver; return when /readyz answers 200."""
        if not (self.apiserver_binary.is_file() and os.access(self.apiserver_binary, os.X_OK)):
            raise KubeClusterError(f"{self.apiserver_binary} missing: run `make provision` (builds it, ~200 s)")
        if shutil.which(self.etcd_binary) is None:
            raise KubeClusterError(f"{self.etcd_binary} not installed: run `make provision` (Debian etcd-server)")
        self._write_credentials()
        # A test session that ends without calling stop() must not leave two servers behind.
        atexit.register(self.stop)
        self._stopped = False
        try:
            for attempt in range(3):
                etcd_port, peer_port, api_port = _free_ports(3)
                try:
                    self._start_etcd(etcd_port, peer_port)
                    self.port = api_port
                    self.host = f"https://127.0.0.1:{api_port}"
                    self.start_apiserver()
                    break
                except _PortTaken:
                    # Someone bound our port between _free_ports() and the server's bind: pick new ones.
                    self.stop_apiserver()
                    self._stop_process(self._etcd)
                    self._etcd = None
                    if attempt == 2:
                        raise
            self.kubeconfig_for(self.token, self.kubeconfig)
        except BaseException:
            # __exit__ does not run when __enter__ raises. Keep the work dir: the error names its logs.
            self.keep_workdir = True
            self.stop()
            raise
        return self

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port against the same etcd; wait for /readyz."""
        if self._apiserver is not None and self._apiserver.poll() is None:
            return
        log = self.apiserver_log.open("ab")
        log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        self._apiserver = subprocess.Popen([
            str(self.apiserver_binary),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--advertise-address=127.0.0.1",
            f"--tls-cert-file={self.cert_file}", f"--tls-private-key-file={self.key_file}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.cert_dir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.cert_dir / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            # No controller-manager, so no `default` ServiceAccount: the ServiceAccount admission plugin
            # would reject every pod.
            "--disable-admission-plugins=ServiceAccount,StorageObjectInUseProtection",
            "--allow-privileged=true",
            # Endpoint reconciling for 127.0.0.1 only logs errors; leave it out.
            "--endpoint-reconciler-type=none",
            "--v=1",
        ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._wait_ready()

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (etcd and its data stay): the API is down until start_apiserver()."""
        self._stop_process(self._apiserver)
        self._apiserver = None

    def stop(self) -> None:
        """Stop both servers and remove the work dir (unless we were given it or asked to keep it)."""
        if self._stopped:
            return
        self._stopped = True
        self.stop_apiserver()
        self._stop_process(self._etcd)
        self._etcd = None
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = None
        self._dynamic = None
        atexit.unregister(self.stop)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def apiserver_running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    # ----------------------------------------------------------------- clients

    def configuration(self, token: str | None = None) -> kubernetes.client.Configuration:
        """Client configuration for `token` (default: admin), verifying TLS against our CA."""
        cfg = kubernetes.client.Configuration()
        cfg.host = self.host
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        cfg.api_key = {"authorization": f"Bearer {token or self.token}"}
        return cfg

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """An ApiClient for the admin (shared, closed by stop()), or a new one for another token."""
        if token is not None and token != self.token:
            return kubernetes.client.ApiClient(self.configuration(token))
        if self._api_client is None:
            self._api_client = kubernetes.client.ApiClient(self.configuration())
        return self._api_client

    def dynamic_client(self) -> kubernetes.dynamic.DynamicClient:
        if self._dynamic is None:
            # Keep the discovery cache in our work dir, not a shared file in /tmp keyed by host:port.
            self._dynamic = kubernetes.dynamic.DynamicClient(self.api_client(),
                                                             cache_file=str(self.workdir / "discovery.json"))
        return self._dynamic

    def kubeconfig_for(self, token: str, path: Path | str) -> Path:
        """Write a kubeconfig for `token` (insecure-skip-tls-verify) usable by kubectl and load_kube_config."""
        user = "admin" if token == self.token else "user"
        doc = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "meta-cni-test", "cluster": {"server": self.host, "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "meta-cni-test", "context": {"cluster": "meta-cni-test", "user": user}}],
            "current-context": "meta-cni-test",
            "preferences": {},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        return path

    # ----------------------------------------------------------------- objects

    def ensure_namespace(self, name: str) -> None:
        core = kubernetes.client.CoreV1Api(self.api_client())
        try:
            core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise

    def apply(self, source: Path | str | Iterable[Path | str], *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Create, or replace when it exists, every object in YAML files / dirs (*.yaml, *.yml, *.json,
        recursively) or YAML text (a str containing a newline); `kind: *List` documents are expanded.
        Namespaces and CRDs go first, and a CRD only counts once it is Established.
        A namespaced object without a namespace goes to "default"; its namespace must exist.

        Returns the objects as the server stored them.
        """
        docs = sorted(self._load(source), key=lambda d: _APPLY_FIRST.get(d.get("kind", ""), 2))
        return [self._apply_one(doc, timeout) for doc in docs]

    def _load(self, source: Path | str | Iterable[Path | str]) -> Iterator[dict[str, Any]]:
        if isinstance(source, str) and "\n" in source:
            texts = [source]
        else:
            items = [source] if isinstance(source, (str, Path)) else list(source)
            files: list[Path] = []
            for item in map(Path, items):
                if item.is_dir():
                    files += sorted(p for p in item.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
                elif item.is_file():
                    files.append(item)
                else:
                    raise FileNotFoundError(item)
            texts = [f.read_text() for f in files]
        for text in texts:
            for doc in yaml.safe_load_all(text):
                if not doc:
                    continue
                if doc.get("kind", "").endswith("List") and "items" in doc:
                    yield from doc["items"]
                else:
                    yield doc

    def _resource(self, api_version: str, kind: str, timeout: float) -> Any:
        """The dynamic Resource for apiVersion/kind; retried because a just-Established CRD can take a
        moment to appear in discovery (the dynamic client refreshes its cache on a miss)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.dynamic_client().resources.get(api_version=api_version, kind=kind)
            except kubernetes.dynamic.exceptions.ResourceNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _apply_one(self, doc: dict[str, Any], timeout: float) -> dict[str, Any]:
        resource = self._resource(doc["apiVersion"], doc["kind"], timeout)
        ns = (doc["metadata"].get("namespace") or "default") if resource.namespaced else None
        try:
            obj = resource.create(body=doc, namespace=ns)
        except kubernetes.dynamic.exceptions.ConflictError:
            current = resource.get(name=doc["metadata"]["name"], namespace=ns)
            body = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current.metadata.resourceVersion}}
            obj = resource.replace(body=body, namespace=ns)
        if doc["kind"] == "CustomResourceDefinition":
            obj = self._wait_established(resource, doc["metadata"]["name"], timeout)
        return obj.to_dict()

    def _wait_established(self, resource: Any, name: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            crd = resource.get(name=name)
            conditions = (crd.to_dict().get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return crd
            if time.monotonic() > deadline:
                raise KubeClusterError(f"CRD {name} not Established after {timeout} s: {conditions}")
            time.sleep(0.05)

    # ----------------------------------------------------------------- internals

    def _write_credentials(self) -> None:
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        # Columns: token,user,uid,"groups". The plain user gets no group: the apiserver adds
        # system:authenticated itself, and RBAC grants that group only discovery/self-review.
        (self.workdir / "tokens.csv").write_text(
            f'{self.token},{self.admin_name},uid-admin,"system:masters"\n'
            f"{self.user_token},{self.user_name},uid-node\n")
        if self.cert_file.exists():
            return
        # Our own CA rather than the apiserver's self-signed cert, so clients can verify TLS (no
        # InsecureRequestWarning floods) via `ca_file`. EC keys: much faster to generate than RSA.
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        d = self.cert_dir
        _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
                 "-subj", "/CN=meta-cni-test-ca", cwd=d)
        _openssl("req", "-new", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
                 "-subj", "/CN=kube-apiserver", cwd=d)
        (d / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n")
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "apiserver.crt", "-days", "3650", "-extfile", "apiserver.ext", cwd=d)
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "sa.key", cwd=d)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)

    def _start_etcd(self, client_port: int, peer_port: int) -> None:
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        log = self.etcd_log.open("ab")
        self._etcd = subprocess.Popen([
            self.etcd_binary, "--name", "meta-cni-test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"meta-cni-test={peer}",
        ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            if self._etcd.poll() is not None:
                self._raise_start_failure("etcd", self.etcd_log)
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                    if b'"true"' in r.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise KubeClusterError(f"etcd not healthy after 30 s:\n{_tail(self.etcd_log)}")
            time.sleep(0.1)

    def _wait_ready(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(f"{self.host}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + self.ready_timeout
        last = ""
        while True:
            assert self._apiserver is not None
            if self._apiserver.poll() is not None:
                self._raise_start_failure("kube-apiserver", self.apiserver_log)
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read(2000).decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise KubeClusterError(f"kube-apiserver not ready after {self.ready_timeout} s (last: {last}); "
                                       f"log {self.apiserver_log}:\n{_tail(self.apiserver_log)}")
            time.sleep(0.1)

    def _raise_start_failure(self, what: str, log: Path) -> None:
        tail = _tail(log)
        if "address already in use" in tail:
            raise _PortTaken(what)
        raise KubeClusterError(f"{what} exited during start-up; log {log}:\n{tail}")

    @staticmethod
    def _stop_process(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _PortTaken(KubeClusterError):
    """A server could not bind the port we picked (lost the race for it)."""
