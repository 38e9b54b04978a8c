#!/usr/bin/env python3
"""What a pod's CNI ADD/DEL costs through the meta-cni shim and the node daemon, against thin mode and the
reference plugins exec'd directly; and what a burst of pods costs the daemon.

    python tests/bench/bench_daemon.py [--rounds N] [--warmup N] [--pods N] [--bursts N] [--max-concurrent N]
                                                                      (root: it makes netns and links)

The pod: primary bridge eth0 (a CNI config in confDir, the config's clusterNetwork) + NADs bridge net1 and
macvlan net2, IPAM host-local on each (the same three attachments as bench_pod.py / bench_delegates.py).

1. One pod ADD and DEL, each way (fresh netns per round):
     (a)  shim -> daemon, built-in delegates (builtinStandardTypes true: bridge, macvlan and host-local all
          run in the daemon's process), manifests source; the shim is what `metactl install` writes (a
          script run by /usr/bin/python3 -IS and its zip of modules), exec'd by its path as a node runs it,
     (a') the same with the venv's `meta-cni` console script as the shim,
     (b)  shim (installed) -> daemon, built-ins, Kubernetes source: pod and NADs in a real kube-apiserver
          started by the bench, the daemon with --kubeconfig and its watch caches; the production path,
     (b') the same with the venv's `meta-cni` as the shim,
     (c)  thin mode (`meta-cni` does everything in its own process), built-ins, manifests source,
     (c') thin mode, built-ins, Kubernetes source (direct API calls, no watch),
     (d)  shim (installed) -> daemon, the reference plugins exec'd (builtinStandardTypes false), manifests,
     (e)  the three reference plugins exec'd directly in sequence, DEL in reverse with prevResult: the
          yardstick every ratio is against.
   For (a)-(b') the daemon's own log gives the time spent inside it per request ("request served"
   duration_ms): the rest is the shim (interpreter start, imports, socket, HTTP, JSON).
2. Start-up of the shims alone (VERSION, answered without the daemon) and of a bare /usr/bin/python3 -I
   (and -I -S: without site, which on Debian runs the dist-packages .pth files even under -I).
3. A burst: N pods (default 50) ADDed at once, one thread per pod exec'ing the installed shim (distinct netns
   and container IDs, pods in the API) through the daemon with the Kubernetes source; total wall time,
   per-pod median/p99, the daemon's peak RSS (VmHWM, reset through /proc/<pid>/clear_refs just before the
   burst); the same pods with the three reference plugins exec'd directly per pod, concurrently, as the
   yardstick; then DEL of them all, concurrently too, and a check that nothing is left.

Every measurement runs once per round; the order rotates from round to round so that all share the same
background noise. After every ADD and DEL the interfaces in the netns, the bridges' ports, the host-local
stores, meta-cni's cache, the DEL spool and (Kubernetes source) the pod's network-status annotation are
checked; an error stops the run. Host links are named `mcbn<tag>..`, subnets are inside 10.234.0.0/16, files
live in a tmp dir; the daemon, the API server, links and netns are removed at the end, also on failure or
SIGTERM. Timings are printed, never asserted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    # The Kubernetes client (the API server's fixtures) and the daemon need the project's venv.
    from in_venv import ensure  # this directory is sys.path[0] when run as a script

    ensure(__file__, ("attrs", "kubernetes", "pyroute2"))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from tests.bench.bench_delegates import (  # noqa: E402
    CNI_VERSION,
    REFERENCE_PLUGINS,
    HostResources,
    check_ipam_released,
    check_links,
    check_no_ports,
    exec_plugin,
    p90,
    sh,
    time_exec,
    venv_bin,
)

SYSTEM_PYTHON = "/usr/bin/python3"  # what runs the installed shim on a node (tests/unit/test_daemon_install.py)
POD = "pod-bench"
NETWORK = "metanet"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
IFNAMES = {"lo", "eth0", "net1", "net2"}
START_BUDGET = 120.0  # how long the daemon may take to become ready (not a timing assertion)

Sample = tuple[float, float]  # (ADD seconds, DEL seconds)


def q(values: list[float], pct: int) -> float:
    """The pct-th percentile (inclusive interpolation; with 50 samples p99 lies between the two largest)."""
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] if len(values) > 1 else values[0]


def run_cni(argv: list[str], command: str, stdin: bytes, cid: str, netns: str, cni_args: str, cni_path: str) -> bytes:
    """One CNI call of meta-cni (shim or thin) as a runtime makes it; its stdout (an error stops the run)."""
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0",
               CNI_ARGS=cni_args, CNI_PATH=cni_path)
    p = subprocess.run(argv, input=stdin, capture_output=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} {command} {cid}: rc {p.returncode}: {p.stdout.decode()} {p.stderr.decode()}")
    return p.stdout


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process in KiB, and its thread count."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") or key == "Threads":
            out[key] = int(value.split()[0])
    return out


def helpers_rss(pid: int) -> int:
    """VmRSS in KiB summed over the daemon's descendant processes (attachment workers, their fork server and
    multiprocessing's resource tracker; exec'd delegates too while any runs): shared pages count in each."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                        for c in (t / "children").read_text().split()]
        except OSError:
            continue
        for c in children:
            try:
                total += proc_status(c).get("VmRSS", 0)
            except OSError:  # it exited meanwhile
                continue
            todo.append(c)
    return total


# --- the daemon -----------------------------------------------------------------------------------------

class Daemon:
    """`metactl daemon` as a subprocess of the bench, serving a socket under the bench's tmp dir."""

    def __init__(self, root: Path, args: list[str]) -> None:
        self.socket = root / "run" / "daemon.sock"
        self.log = root / "daemon.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from meta.daemon import protocol

        cmd = [str(venv_bin("metactl")), "daemon", "--socket", str(self.socket), "--metrics-address", "", *self.args]
        with open(self.log, "ab") as err:
            # A session of its own: a Ctrl-C in the terminal reaches the bench, whose finally stops the daemon.
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        end = time.monotonic() + START_BUDGET
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if protocol.exchange(str(self.socket), "GET", protocol.READYZ, connect_timeout=2, answer_timeout=5)[0] == 200:
                    return
            except protocol.ExchangeError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"daemon not ready after {START_BUDGET:.0f}s:\n{self.tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the daemon died:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def served(self) -> dict[tuple[str, str], float]:
        """(containerID, command) -> seconds the daemon spent on the request (its "request served" lines)."""
        out: dict[tuple[str, str], float] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "request served" and "duration_ms" in entry:
                out[(entry.get("containerID", ""), entry.get("command", ""))] = entry["duration_ms"] / 1000
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --- the host side of one set of networks ----------------------------------------------------------------

class Net:
    """Bridges, a macvlan master, IPAM and cache dirs, the primary's CNI config and the two NADs (as manifests
    and, with `namespace`, in the API): one pod case, or the burst's pods."""

    def __init__(self, bench: Bench, label: str, namespace: str | None = None) -> None:
        n = len(bench.nets)
        bench.nets.append(self)
        self.label = label
        d = bench.root / f"net-{n}"
        self.ipam_dir, self.conf_dir, self.manifests_dir, self.cni_dir = d / "ipam", d / "conf", d / "manifests", d / "cache"
        for x in (self.ipam_dir, self.conf_dir, self.manifests_dir, self.cni_dir, d / "devinfo"):
            x.mkdir(parents=True)
        self.devinfo = d / "devinfo"
        self.bridges = (bench.link_name(), bench.link_name())
        self.master = bench.master()
        self.delegates: list[tuple[str, str, dict[str, Any]]] = [
            ("primary", "eth0", {"type": "bridge", "bridge": self.bridges[0], "isGateway": True,
                                 "ipam": bench.ipam(self.ipam_dir)}),
            ("br-a", "net1", {"type": "bridge", "bridge": self.bridges[1], "ipam": bench.ipam(self.ipam_dir)}),
            ("mv-a", "net2", {"type": "macvlan", "master": self.master, "mode": "bridge", "ipam": bench.ipam(self.ipam_dir)}),
        ]
        (self.conf_dir / "primary.conf").write_text(
            json.dumps({"cniVersion": CNI_VERSION, "name": "primary", **self.delegates[0][2]}))
        self.namespace = namespace or "default"
        self.kube = namespace is not None
        self.nads = [{"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                      "metadata": {"name": name, "namespace": self.namespace},
                      "spec": {"config": json.dumps({"cniVersion": CNI_VERSION, **conf})}}
                     for name, _, conf in self.delegates[1:]]
        # pod name -> UID (None: a manifests pod)
        self.pods: dict[str, str | None] = {}
        if not self.kube:
            docs = [*self.nads, {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": POD, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": "br-a, mv-a"}}}]
            (self.manifests_dir / "pod.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
            self.pods[POD] = None

    def create_in_api(self, bench: Bench, names: list[str]) -> None:
        pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": self.namespace, "annotations": {"k8s.v1.cni.cncf.io/networks": "br-a, mv-a"}},
            "spec": {"nodeName": bench.node, "containers": [{"name": "c", "image": "busybox"}]}} for name in names]
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}, *self.nads, *pods]
        assert bench.cluster is not None
        for obj in bench.cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=1)):
            if obj["kind"] == "Pod":
                self.pods[obj["metadata"]["name"]] = obj["metadata"]["uid"]

    def meta_conf(self, bench: Bench, *, builtin: bool, daemon: bool) -> bytes:
        conf: dict[str, Any] = {
            "cniVersion": CNI_VERSION, "name": NETWORK, "type": "meta-cni", "clusterNetwork": "primary",
            "confDir": str(self.conf_dir), "manifestsDir": str(self.manifests_dir), "cniDir": str(self.cni_dir),
            "deviceInfoDir": str(self.devinfo), "builtinStandardTypes": builtin}
        if daemon:
            conf["daemonSocket"] = str(bench.daemon.socket)
        if self.kube:
            assert bench.cluster is not None
            conf["kubeconfig"] = str(bench.cluster.kubeconfig)
        return json.dumps(conf).encode()

    def pod_args(self, name: str = POD) -> str:
        uid = self.pods[name]
        return f"K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={name}" + (f";K8S_POD_UID={uid}" if uid else "")

    def delegate_args(self, name: str = POD) -> str:
        # meta-cni always gives delegates IgnoreUnknown plus the pod keys: the direct calls get the same.
        return f"IgnoreUnknown=true;{self.pod_args(name)}"

    # checks
    def verify_added(self, bench: Bench, netns: str, names: list[str] | None = None) -> None:
        check_links(netns, IFNAMES)
        if self.kube:
            for name, ann in bench.annotations(self.namespace, names or [POD]).items():
                entries = json.loads(ann.get(NETWORK_STATUS, "[]"))
                if [e.get("interface") for e in entries] != ["eth0", "net1", "net2"]:
                    raise RuntimeError(f"{self.label}: pod {self.namespace}/{name}: network-status {entries}")

    def verify_gone(self, bench: Bench, netns: str | None, names: list[str] | None = None, status: bool = True) -> None:
        if netns is not None:
            check_links(netns, {"lo"})
        check_no_ports(self.bridges)
        check_ipam_released(self.ipam_dir)
        if list((self.cni_dir / NETWORK).glob("*/*.json")):
            raise RuntimeError(f"{self.label}: meta-cni cache not empty after DEL")
        if list((self.cni_dir / "pending-del").glob("*.json")):
            raise RuntimeError(f"{self.label}: a DEL was spooled (the daemon was unreachable)")
        if self.kube and status:
            for name, ann in bench.annotations(self.namespace, names or [POD]).items():
                if NETWORK_STATUS in ann:
                    raise RuntimeError(f"{self.label}: pod {self.namespace}/{name}: network-status left after DEL")


# --- the benchmark ------------------------------------------------------------------------------------

class Bench(HostResources):
    def __init__(self, root: Path, max_concurrent: int) -> None:
        super().__init__("mcbn", "10.234")
        self.root = root
        self.node = f"mcbn-node-{self.tag}"
        self.max_concurrent = max_concurrent
        self.nets: list[Net] = []
        self.cluster: Any = None
        self.meta_cni = venv_bin("meta-cni")
        self.bin_dir = root / "bin"
        self.installed = self.bin_dir / "meta-cni"
        self.cni_path = f"{self.bin_dir}:{REFERENCE_PLUGINS}"
        self.daemon = Daemon(root, [])
        self.shims = {"installed": [str(self.installed)], "venv": [str(self.meta_cni)]}
        # name -> fn(netns, container_id) -> (ADD s, DEL s); the order is the report's.
        self.cases: dict[str, Callable[[str, str], Sample]] = {}
        self.startup: dict[str, Callable[[], float]] = {}
        self.daemon_cases: set[str] = set()
        self.cids: dict[str, str] = {}  # container ID -> case (to find the daemon's own timings)

    def annotations(self, namespace: str, names: list[str]) -> dict[str, dict[str, str]]:
        import kubernetes.client

        api = kubernetes.client.CoreV1Api(self.cluster.api_client())
        if len(names) == 1:
            pods = [api.read_namespaced_pod(names[0], namespace)]
        else:
            pods = [p for p in api.list_namespaced_pod(namespace).items if p.metadata.name in names]
            if len(pods) != len(names):
                raise RuntimeError(f"{len(pods)} of {len(names)} pods found in {namespace}")
        return {p.metadata.name: p.metadata.annotations or {} for p in pods}

    def cleanup(self) -> None:
        self.daemon.stop()
        self.remove_host_resources()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    # set-up
    def start(self, with_kube: bool) -> None:
        self.bin_dir.mkdir()
        if with_kube:
            from tests.infra.kube_cluster import KubeCluster

            self.cluster = KubeCluster(workdir=self.root / "kube").start()
            self.cluster.apply(REPO / "crds")
        # The shim a node runs: what `metactl install` writes into the CNI bin dir (the config is only
        # checked and copied; it must name daemonSocket).
        cfg = self.root / "install" / "10-meta.conf"
        cfg.parent.mkdir()
        cfg.write_text(json.dumps({"cniVersion": CNI_VERSION, "name": NETWORK, "type": "meta-cni",
                                   "clusterNetwork": "primary", "daemonSocket": str(self.daemon.socket)}))
        sh(str(venv_bin("metactl")), "install", "--bin-dir", str(self.bin_dir), "--conf-dir", str(self.root / "netd"),
           "--config", str(cfg))
        args = ["--cni-dir", str(self.root / "daemon-cni"), "--max-concurrent", str(self.max_concurrent),
                "--node-name", self.node]
        if self.cluster is not None:
            args += ["--kubeconfig", str(self.cluster.kubeconfig)]
        self.daemon.args = args
        self.daemon.start()

    # part 1: one pod
    def add_meta(self, label: str, *, shim: str | None, builtin: bool, kube: bool) -> None:
        """meta-cni exec'd: through `shim` to the daemon, or thin (shim None)."""
        net = Net(self, label, f"mcbn-{self.tag}-{len(self.nets)}" if kube else None)
        if kube:
            net.create_in_api(self, [POD])
        conf = net.meta_conf(self, builtin=builtin, daemon=shim is not None)
        argv = self.shims[shim] if shim else [str(self.meta_cni)]
        args = net.pod_args()
        if shim:
            self.daemon_cases.add(label)

        def case(netns: str, cid: str) -> Sample:
            self.cids[cid] = label
            t0 = time.perf_counter()
            out = run_cni(argv, "ADD", conf, cid, netns, args, self.cni_path)
            t1 = time.perf_counter()
            if len([i for i in json.loads(out).get("interfaces", []) if i.get("sandbox")]) != 3:
                raise RuntimeError(f"{label}: ADD result lacks the three sandbox interfaces: {out.decode()}")
            net.verify_added(self, netns)
            t2 = time.perf_counter()
            run_cni(argv, "DEL", conf, cid, netns, args, self.cni_path)
            t3 = time.perf_counter()
            net.verify_gone(self, netns)
            return t1 - t0, t3 - t2

        self.cases[label] = case

    def direct_add(self, net: Net, netns: str, cid: str, name: str = POD) -> list[dict[str, Any]]:
        results = []
        for nname, ifname, conf in net.delegates:
            stdin = json.dumps({"cniVersion": CNI_VERSION, "name": nname, **conf}).encode()
            results.append(json.loads(exec_plugin(REFERENCE_PLUGINS / conf["type"], "ADD", stdin, cid, netns, ifname,
                                                  net.delegate_args(name), self.cni_path)))
        return results

    def direct_del(self, net: Net, netns: str, cid: str, results: list[dict[str, Any]], name: str = POD) -> None:
        for (nname, ifname, conf), res in reversed(list(zip(net.delegates, results))):
            stdin = json.dumps({"cniVersion": CNI_VERSION, "name": nname, **conf, "prevResult": res}).encode()
            exec_plugin(REFERENCE_PLUGINS / conf["type"], "DEL", stdin, cid, netns, ifname, net.delegate_args(name),
                        self.cni_path)

    def add_direct(self, label: str) -> None:
        net = Net(self, label)

        def case(netns: str, cid: str) -> Sample:
            t0 = time.perf_counter()
            results = self.direct_add(net, netns, cid)
            t1 = time.perf_counter()
            net.verify_added(self, netns)
            t2 = time.perf_counter()
            self.direct_del(net, netns, cid, results)
            t3 = time.perf_counter()
            net.verify_gone(self, netns)
            return t1 - t0, t3 - t2

        self.cases[label] = case

    # part 2: start-up
    def add_startup(self) -> None:
        version_env = dict(os.environ, CNI_COMMAND="VERSION", CNI_PATH=self.cni_path)
        v = b'{"cniVersion":"1.0.0"}'
        s = self.startup
        s[f"bare {SYSTEM_PYTHON} -I -c pass"] = lambda: time_exec([SYSTEM_PYTHON, "-I", "-c", "pass"])
        s[f"bare {SYSTEM_PYTHON} -IS -c pass (what the installed shim starts)"] = lambda: time_exec(
            [SYSTEM_PYTHON, "-IS", "-c", "pass"])
        s["installed shim VERSION (the json-parsing path)"] = lambda: time_exec(self.shims["installed"], v, version_env)
        s["venv meta-cni VERSION"] = lambda: time_exec(self.shims["venv"], v, version_env)
        s["bridge VERSION (Go plugin)"] = lambda: time_exec([str(REFERENCE_PLUGINS / "bridge")], v, version_env)


# --- part 3: the burst -----------------------------------------------------------------------------------

def run_threads(fns: list[Callable[[], None]]) -> tuple[float, list[float]]:
    """Run every fn on a thread of its own, all released at once: (wall seconds, per-fn seconds)."""
    n = len(fns)
    gate = threading.Barrier(n + 1)
    took: list[float] = [0.0] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        gate.wait()
        t0 = time.perf_counter()
        try:
            fns[i]()
        except BaseException as e:  # reported once all are done
            errors.append(e)
        took[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.join()
    except BaseException:
        # SIGTERM or Ctrl-C: let the calls in flight end before the caller's cleanup removes links and netns.
        for t in threads:
            t.join(timeout=60)
        raise
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} concurrent calls failed; the first: {errors[0]}")
    return wall, took


class Burst:
    """N pods of one namespace, sharing the bridges, master and IPAM of one Net."""

    def __init__(self, bench: Bench, pods: int) -> None:
        self.bench = bench
        self.net = Net(bench, "burst", f"mcbn-{bench.tag}-burst")
        self.names = [f"burst-{i:03d}" for i in range(pods)]
        self.net.create_in_api(bench, self.names)
        self.conf = self.net.meta_conf(bench, builtin=True, daemon=True)
        self.runs = 0

    def _netns(self) -> list[str]:
        return [self.bench.netns() for _ in self.names]

    def _check_added(self, netns: list[str]) -> None:
        """Every pod has its three interfaces, and host-local under concurrency handed no address out twice."""
        ips: list[str] = []
        for ns in netns:
            check_links(ns, IFNAMES)
            for link in json.loads(sh("ip", "-n", Path(ns).name, "-4", "-j", "addr").stdout):
                ips += [a["local"] for a in link.get("addr_info", []) if link["ifname"] != "lo"]
        if len(ips) != 3 * len(netns) or len(set(ips)) != len(ips):
            raise RuntimeError(f"burst: {len(ips)} addresses for {len(netns)} pods, {len(set(ips))} distinct")

    def through_daemon(self) -> dict[str, Any]:
        b, net = self.bench, self.net
        self.runs += 1
        netns = self._netns()
        cids = [f"bench-{b.tag}-burst{self.runs}-{i}" for i in range(len(self.names))]
        argv = b.shims["installed"]
        try:
            def add(i: int) -> Callable[[], None]:
                def fn() -> None:
                    run_cni(argv, "ADD", self.conf, cids[i], netns[i], net.pod_args(self.names[i]), b.cni_path)
                return fn

            def delete(i: int) -> Callable[[], None]:
                def fn() -> None:
                    run_cni(argv, "DEL", self.conf, cids[i], netns[i], net.pod_args(self.names[i]), b.cni_path)
                return fn

            before = proc_status(b.daemon.pid)
            Path(f"/proc/{b.daemon.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
            add_wall, add_each = run_threads([add(i) for i in range(len(self.names))])
            during = proc_status(b.daemon.pid)
            b.daemon.alive()
            self._check_added(netns)
            net.verify_added(b, netns[0], self.names)
            Path(f"/proc/{b.daemon.pid}/clear_refs").write_text("5")
            del_wall, del_each = run_threads([delete(i) for i in range(len(self.names))])
            after = proc_status(b.daemon.pid)
            for ns in netns:
                check_links(ns, {"lo"})
            net.verify_gone(b, None, self.names)
        finally:
            for ns in netns:
                b.del_netns(ns)
        return {"add_wall": add_wall, "add_each": add_each, "del_wall": del_wall, "del_each": del_each,
                "rss_before": before["VmRSS"], "hwm_add": during["VmHWM"], "hwm_del": after["VmHWM"],
                "rss_after": after["VmRSS"], "threads_after": after["Threads"]}

    def direct(self) -> dict[str, Any]:
        b, net = self.bench, self.net
        self.runs += 1
        netns = self._netns()
        cids = [f"bench-{b.tag}-direct{self.runs}-{i}" for i in range(len(self.names))]
        results: list[list[dict[str, Any]]] = [[] for _ in self.names]
        try:
            def add(i: int) -> Callable[[], None]:
                def fn() -> None:
                    results[i] = b.direct_add(net, netns[i], cids[i], self.names[i])
                return fn

            def delete(i: int) -> Callable[[], None]:
                return lambda: b.direct_del(net, netns[i], cids[i], results[i], self.names[i])

            add_wall, add_each = run_threads([add(i) for i in range(len(self.names))])
            self._check_added(netns)
            del_wall, del_each = run_threads([delete(i) for i in range(len(self.names))])
            for ns in netns:
                check_links(ns, {"lo"})
            net.verify_gone(b, None, self.names, status=False)
        finally:
            for ns in netns:
                b.del_netns(ns)
        return {"add_wall": add_wall, "add_each": add_each, "del_wall": del_wall, "del_each": del_each}


# --- the run --------------------------------------------------------------------------------------------

LABELS = {
    "(a)": "shim(installed) -> daemon, built-ins, manifests",
    "(a')": "shim(venv meta-cni) -> daemon, built-ins, manifests",
    "(b)": "shim(installed) -> daemon, built-ins, Kubernetes  [prod]",
    "(b')": "shim(venv meta-cni) -> daemon, built-ins, Kubernetes",
    "(c)": "thin meta-cni, built-ins, manifests",
    "(c')": "thin meta-cni, built-ins, Kubernetes",
    "(d)": "shim(installed) -> daemon, reference execs, manifests",
    "(e)": "3 reference plugins exec'd directly (yardstick)",
}


def run(rounds: int, warmup: int, pods: int, bursts: int, max_concurrent: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="mcbn-"))
    bench = Bench(root, max_concurrent)
    t_start = time.monotonic()
    try:
        bench.start(with_kube=True)
        t_setup = time.monotonic() - t_start
        idle = proc_status(bench.daemon.pid)
        bench.add_meta("(a)", shim="installed", builtin=True, kube=False)
        bench.add_meta("(a')", shim="venv", builtin=True, kube=False)
        bench.add_meta("(b)", shim="installed", builtin=True, kube=True)
        bench.add_meta("(b')", shim="venv", builtin=True, kube=True)
        bench.add_meta("(c)", shim=None, builtin=True, kube=False)
        bench.add_meta("(c')", shim=None, builtin=True, kube=True)
        bench.add_meta("(d)", shim="installed", builtin=False, kube=False)
        bench.add_direct("(e)")
        bench.add_startup()
        burst = Burst(bench, pods) if pods else None

        samples: dict[str, list[Sample]] = {k: [] for k in bench.cases}
        cids: dict[str, list[str]] = {k: [] for k in bench.cases}
        start: dict[str, list[float]] = {k: [] for k in bench.startup}
        counting = False
        jobs: list[Callable[[], None]] = []
        for name, case in bench.cases.items():
            def job(name: str = name, case: Callable[[str, str], Sample] = case) -> None:
                with bench.fresh_netns() as netns:
                    cid = f"bench-{bench.tag}-{bench._ns}"
                    sample = case(netns, cid)
                if counting:
                    samples[name].append(sample)
                    cids[name].append(cid)
            jobs.append(job)
        for name, fn in bench.startup.items():
            def sjob(name: str = name, fn: Callable[[], float] = fn) -> None:
                dt = fn()
                if counting:
                    start[name].append(dt)
            jobs.append(sjob)
        t_rounds = time.monotonic()
        for i in range(warmup + rounds):
            counting = i >= warmup
            k = i % len(jobs)  # rotate the order: no measurement always runs first or after the same one
            for job in jobs[k:] + jobs[:k]:
                job()
            bench.daemon.alive()
        t_rounds = time.monotonic() - t_rounds
        warm = proc_status(bench.daemon.pid)
        warm["helpers"] = helpers_rss(bench.daemon.pid)
        served = bench.daemon.served()

        burst_runs: list[tuple[str, dict[str, Any]]] = []
        t_burst = time.monotonic()
        if burst is not None:
            for i in range(bursts):
                # Alternate which goes first, as the rounds rotate.
                order = ("daemon", "direct") if i % 2 == 0 else ("direct", "daemon")
                for way in order:
                    burst_runs.append((way, burst.through_daemon() if way == "daemon" else burst.direct()))
        t_burst = time.monotonic() - t_burst
        lifetime = proc_status(bench.daemon.pid)
        elapsed = time.monotonic() - t_start
        return report(samples, cids, served, start, burst_runs, bench, rounds, warmup, pods, idle, warm, lifetime,
                      {"set-up": t_setup, "rounds": t_rounds, "bursts": t_burst, "total": elapsed})
    except Exception:
        if bench.daemon.proc is not None:
            print(f"daemon log (last lines):\n{bench.daemon.tail()}", file=sys.stderr)
        raise
    finally:
        bench.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# --- the report ---------------------------------------------------------------------------------------

def report(samples: dict[str, list[Sample]], cids: dict[str, list[str]], served: dict[tuple[str, str], float],
           start: dict[str, list[float]], bursts: list[tuple[str, dict[str, Any]]], bench: Bench, rounds: int,
           warmup: int, pods: int, idle: dict[str, int], warm: dict[str, int], lifetime: dict[str, int],
           times: dict[str, float]) -> str:
    W = 60
    out = [f"meta-cni daemon benchmark: {rounds} interleaved rounds (+{warmup} warm-up), fresh netns per pod "
           f"(p99 of {rounds} samples: {'between the two largest' if rounds < 100 else 'the 99th percentile'}); "
           f"daemon --max-concurrent {bench.max_concurrent}; "
           + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())]

    def head(title: str, ratio: bool = True) -> None:
        cols = f"{'x median':>10}{'x p99':>8}" if ratio else ""
        out.extend(["", title, f"{'':<{W}}{'median ms':>10}{'p90 ms':>9}{'p99 ms':>9}{cols}", "-" * (W + 46)])

    def row(label: str, values: list[float], ref: list[float] | None = None) -> None:
        med, hi, top = statistics.median(values), p90(values), q(values, 99)
        r = f"{med / statistics.median(ref):>9.2f}x{top / q(ref, 99):>7.2f}x" if ref else ""
        out.append(f"{label:<{W}}{med * 1000:>10.1f}{hi * 1000:>9.1f}{top * 1000:>9.1f}{r}")

    def op(name: str, j: int) -> list[float]:
        return [s[j] for s in samples[name]]

    head("1. one pod: bridge eth0 (primary) + bridge net1 + macvlan net2, IPAM host-local; ratios vs (e)")
    for j, o in enumerate(("ADD", "DEL")):
        ref = op("(e)", j)
        for k, text in LABELS.items():
            row(f"{o} {k:<5} {text}", op(k, j), None if k == "(e)" else ref)
        out.append("")
    out.append("where the shim -> daemon time goes (daemon side: its 'request served' duration_ms; the rest: shim")
    out.append("exec, interpreter start, imports, socket and HTTP, JSON):")
    for k in LABELS:
        if k not in bench.daemon_cases:
            continue
        for j, o in enumerate(("ADD", "DEL")):
            inside = [served.get((cid, o)) for cid in cids[k]]
            if any(v is None for v in inside):
                out.append(f"  {o} {k}: daemon log incomplete")
                continue
            total = op(k, j)
            rest = [t - s for t, s in zip(total, inside)]  # type: ignore[operator]
            out.append(f"  {o} {k:<5} total {statistics.median(total) * 1000:6.1f}  = in daemon "
                       f"{statistics.median(inside) * 1000:6.1f} (p99 {q(inside, 99) * 1000:5.1f})"  # type: ignore[arg-type]
                       f" + outside {statistics.median(rest) * 1000:5.1f} ms (medians)")

    out.append("")
    out.append("target: meta-cni with built-ins makes the three attachments in less time than the three reference")
    out.append("plugins exec'd directly (ADD median vs (e); DEL shown too):")
    e_add, e_del = statistics.median(op("(e)", 0)), statistics.median(op("(e)", 1))
    for k in ("(b)", "(a)", "(a')", "(c)", "(c')"):
        a, d = statistics.median(op(k, 0)), statistics.median(op(k, 1))
        out.append(f"  {k:<5} {LABELS[k]:<{W - 6}} ADD {a * 1000:6.1f} vs {e_add * 1000:6.1f} ms -> "
                   f"{'MET' if a < e_add else 'not met'} ({a / e_add:.2f}x); DEL {d * 1000:6.1f} vs {e_del * 1000:6.1f} ms -> "
                   f"{'MET' if d < e_del else 'not met'}")

    head("2. start-up alone (VERSION: no daemon involved)", ratio=False)
    for name, values in start.items():
        row(name, values)

    if bursts:
        out.extend(["", f"3. burst: {pods} pods ADDed at once (one thread per pod; shim = installed), then DEL at once; "
                        f"{len([b for b in bursts if b[0] == 'daemon'])} burst(s) per way, alternating"])
        out.append(f"{'':<{W}}{'wall s':>8}{'x (e)':>7}{'pod med ms':>11}{'pod p99 ms':>11}")
        out.append("-" * (W + 46))
        by = {w: [r for way, r in bursts if way == w] for w in ("daemon", "direct")}
        text = {"daemon": "shim -> daemon, built-ins, Kubernetes [prod]",
                "direct": "3 reference plugins exec'd per pod (yardstick)"}
        for o in ("add", "del"):
            ref_wall = statistics.median([r[f"{o}_wall"] for r in by["direct"]])
            for w in ("daemon", "direct"):
                walls = [r[f"{o}_wall"] for r in by[w]]
                each = [x for r in by[w] for x in r[f"{o}_each"]]
                wall = statistics.median(walls)
                ratio = f"{wall / ref_wall:>6.2f}x" if w == "daemon" else f"{'':>7}"
                out.append(f"{o.upper()} {text[w]:<{W - 4}}{wall:>8.2f}{ratio}{statistics.median(each) * 1000:>11.0f}"
                           f"{q(each, 99) * 1000:>11.0f}")
        if len(by["daemon"]) > 1:
            out.append("  wall per burst, daemon: "
                       + ", ".join(f"ADD {r['add_wall']:.2f}s/DEL {r['del_wall']:.2f}s" for r in by["daemon"])
                       + "; direct: " + ", ".join(f"ADD {r['add_wall']:.2f}s/DEL {r['del_wall']:.2f}s" for r in by["direct"]))
        mib = lambda kib: f"{kib / 1024:.1f} MiB"  # noqa: E731
        d = by["daemon"]
        out.append("  daemon RSS before each burst: " + ", ".join(mib(r["rss_before"]) for r in d)
                   + f"; after the last: {mib(d[-1]['rss_after'])}")
        out.append(f"daemon memory: RSS idle after start-up {mib(idle['VmRSS'])}, after the rounds {mib(warm['VmRSS'])}; "
                   f"before a burst {mib(max(r['rss_before'] for r in d))}, peak (VmHWM) during the ADD burst "
                   f"{mib(max(r['hwm_add'] for r in d))}, during the DEL burst {mib(max(r['hwm_del'] for r in d))}; "
                   f"lifetime VmHWM at the end {mib(lifetime['VmHWM'])} (reset by each burst); threads after "
                   f"{d[-1]['threads_after']}; its helper processes (attachment workers, fork server, resource "
                   f"tracker) {mib(warm['helpers'])} RSS after the rounds")
        out.append("after every burst: each netns back to lo only, bridges without ports, host-local stores and "
                   "meta-cni's cache empty, no spooled DEL, network-status cleared - checked")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50, help="measured rounds (default 50)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    ap.add_argument("--pods", type=int, default=50, help="pods in the concurrent burst (default 50; 0: no burst)")
    ap.add_argument("--bursts", type=int, default=3, help="bursts per way (default 3)")
    ap.add_argument("--max-concurrent", type=int, default=8, help="the daemon's --max-concurrent (default 8, its default)")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.warmup < 0 or not 0 <= args.pods <= 200 or args.bursts < 1 or args.max_concurrent < 1:
        ap.error("--rounds >= 2, --warmup >= 0, 0 <= --pods <= 200, --bursts >= 1, --max-concurrent >= 1")
    if os.geteuid() != 0:
        sys.exit("bench_daemon.py needs root (network namespaces, links)")
    if not (REFERENCE_PLUGINS / "bridge").is_file():
        sys.exit(f"reference CNI plugins missing in {REFERENCE_PLUGINS}: run tests/infra/provision.sh")
    from tests.infra.kube_cluster import KUBE_APISERVER

    if not KUBE_APISERVER.is_file() or shutil.which("etcd") is None:
        sys.exit(f"{KUBE_APISERVER} or etcd missing: run `make provision`")
    if not Path(SYSTEM_PYTHON).is_file():
        sys.exit(f"{SYSTEM_PYTHON} missing (it runs the installed shim)")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the daemon and the API server and remove links,
    # netns and files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(run(args.rounds, args.warmup, args.pods, args.bursts, args.max_concurrent), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
