#!/usr/bin/env python3
"""meta-ipam over the Kubernetes store: many nodes allocating from one pool at once, against a real
kube-apiserver v1.20.2 + etcd started by the bench (tests/infra/kube_cluster.py, crds/meta-ipam.yaml).

    python tests/bench/bench_ipam.py [--pods 1000] [--nodes 10] [--threads] [--profile] [--timeout S]
                                     [--block-prefix 26]

Each simulated node is a process of its own (`--threads`: a thread) with its own Allocator and KubeStore,
as a node's daemon would be; all wait at a start line, then allocate pods/nodes addresses each, one after
the other (a node's ADDs of one pool take turns anyway). The runs:

  /16 ADD    1000 pods from 10.200.0.0/16 (blocks /26, leased per node)
  /16 DEL    their release by their nodes, with the ADD's addresses as hints (the plugin's prevResult)
  exact ADD  1000 pods from a range holding exactly 1000 addresses (10.201.0.1-10.201.3.232): every address
             is handed out, the last ones by borrowing from other nodes' blocks; then one more pod, which
             must get a clean "no addresses available" and leave nothing behind
  exact DEL  the same release; after each DEL run the pool must hold nothing

Reported per run: wall time from the start line to the last answer, per-operation p50/p99/max, API
requests per operation (counted by each KubeStore, retries included: GET, LIST, POST, PUT, DELETE),
conflicts (writes that lost, 409), CPU seconds of kube-apiserver and etcd (from /proc), of the nodes, and
of everything else on the machine meanwhile (other work sharing the CPUs), and duplicates, verified by
reading every block back (must be 0; every address must be in the store with the owner that was answered,
and nothing else). The issue's target: the 1000-pod /16 run in under 10 s on a 2-core machine; printed as
met / not met, never asserted. `--profile` runs cProfile in every node and prints where the nodes' time
goes, summed over nodes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    from in_venv import ensure  # this directory is sys.path[0] when run as a script

    ensure(__file__, ("attrs", "kubernetes"))

import argparse  # noqa: E402
import collections  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import multiprocessing  # noqa: E402
import pstats  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

TARGET_SECONDS = 10.0
# (containerID, ifname, pod namespace, pod name, pod UID): config.Owner's fields, picklable for the nodes.
OwnerTuple = tuple[str, str, str, str, str]
CRD_FILE = REPO / "crds" / "meta-ipam.yaml"
POOL_16 = {"type": "meta-ipam", "range": "10.200.0.0/16"}
# 10.201.0.1 .. 10.201.3.232: exactly 1000 addresses (in 16 /26 blocks, the last one partly).
POOL_EXACT = {"type": "meta-ipam", "range": "10.201.0.0/22", "range_end": "10.201.3.232"}


# --- a simulated node (its own process, or thread with --threads) ----------------------------------------

def owner_for(node: str, k: int) -> OwnerTuple:
    """(containerID, ifname, namespace, pod name, pod UID) of pod k of a node, realistic in length."""
    return uuid.uuid4().hex + uuid.uuid4().hex, "net1", "bench", f"pod-{node}-{k:04d}", str(uuid.uuid4())


def _cpu(threads: bool) -> float:
    return time.thread_time() if threads else time.process_time()


def node_main(cluster: dict[str, Any], node: str, commands: Any, results: Any, barrier: Any, threads: bool,
              profile_dir: str | None) -> None:
    """Runs commands ("add"/"del", network, ipam config, owners) until ("stop",). Every command waits at the
    barrier after its set-up, so all nodes start together and set-up is not measured."""
    from meta.cni.errors import CNIError
    from meta.ipam import config
    from meta.ipam.allocator import Allocator
    from meta.ipam.kubestore import KubeStore
    from meta.ipam.store import POOL

    store = KubeStore.from_token(cluster["host"], cluster["token"], cluster["ca"], cluster["timeout"])
    allocator = Allocator(store, node)
    store.get(POOL, "warm-up")  # the TLS connection is made before the start line, as a daemon has it
    phase = 0
    while True:
        cmd = commands.get()
        if cmd[0] == "stop":
            break
        op, network, ipam, owners, hints = cmd
        pool = config.parse(ipam, network).pool
        owner_objs = [config.Owner(*o) for o in owners]
        # DEL gets the ADD's addresses as the plugin gets them from prevResult.
        near = {cid: [ipaddress.ip_address(ip) for ip in ips] for cid, ips in hints.items()}
        before, conflicts_before = store.requests, store.conflicts
        latencies: list[float] = []
        answered: list[tuple[str, list[str]]] = []
        errors: list[tuple[str, int, str]] = []
        prof = cProfile.Profile() if profile_dir else None
        barrier.wait()
        cpu0 = _cpu(threads)
        if prof:
            prof.enable()
        for o in owner_objs:
            t = time.perf_counter()
            try:
                if op == "add":
                    answered.append((o.container_id, [str(x.address) for x in allocator.allocate(pool, o)]))
                else:
                    freed = allocator.release(pool, o, hints=near.get(o.container_id, []))
                    answered.append((o.container_id, [str(a) for a in freed]))
            except CNIError as e:
                errors.append((o.container_id, e.code, e.msg))
            latencies.append(time.perf_counter() - t)
        if prof:
            prof.disable()
            prof.dump_stats(os.path.join(profile_dir or "", f"{node}-{phase}.prof"))
        cpu = _cpu(threads) - cpu0
        results.put({"node": node, "latencies": latencies, "answered": answered, "errors": errors, "cpu": cpu,
                     "requests": dict(store.requests - before), "conflicts": store.conflicts - conflicts_before,
                     "end": time.time()})
        phase += 1
    store.close()


# --- the driver ------------------------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all CPUs have spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Nodes:
    """The simulated nodes and the command/result plumbing."""

    def __init__(self, cluster: Any, count: int, threads: bool, profile_dir: str | None, timeout: float) -> None:
        self.cluster = cluster
        self.threads = threads
        self.names = [f"node-{i:02d}" for i in range(count)]
        info = {"host": cluster.host, "token": cluster.token, "ca": str(cluster.ca_file), "timeout": timeout}
        if threads:
            self.barrier: Any = threading.Barrier(count + 1)
            self.results: Any = queue.Queue()
            self.commands: list[Any] = [queue.Queue() for _ in self.names]
            self.workers: list[Any] = [
                threading.Thread(target=node_main, daemon=True,
                                 args=(info, n, q, self.results, self.barrier, True, profile_dir))
                for n, q in zip(self.names, self.commands, strict=True)]
        else:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited from the driver
            self.barrier = ctx.Barrier(count + 1)
            self.results = ctx.Queue()
            self.commands = [ctx.Queue() for _ in self.names]
            self.workers = [
                ctx.Process(target=node_main, daemon=True,
                            args=(info, n, q, self.results, self.barrier, False, profile_dir))
                for n, q in zip(self.names, self.commands, strict=True)]
        for w in self.workers:
            w.start()

    def run(self, op: str, network: str, ipam: dict[str, Any], owners: dict[str, list[OwnerTuple]],
            label: str, hints: dict[str, list[str]] | None = None) -> dict[str, Any]:
        for name, q in zip(self.names, self.commands, strict=True):
            mine = {o[0]: (hints or {}).get(o[0], []) for o in owners[name]}
            q.put((op, network, ipam, owners[name], mine))
        self.barrier.wait(timeout=300)  # every node is set up
        api0, etcd0 = proc_cpu(self.cluster._apiserver.pid), proc_cpu(self.cluster._etcd.pid)
        busy0 = machine_busy()
        t0 = time.time()
        per_node = [self.results.get(timeout=900) for _ in self.names]
        wall = max(r["end"] for r in per_node) - t0
        busy = machine_busy() - busy0
        requests: collections.Counter[str] = collections.Counter()
        for r in per_node:
            requests.update(r["requests"])
        return {"label": label, "op": op, "network": network, "wall": wall, "per_node": per_node,
                "latencies": [x for r in per_node for x in r["latencies"]],
                "answered": [a for r in per_node for a in r["answered"]],
                "errors": [e for r in per_node for e in r["errors"]],
                "requests": requests, "conflicts": sum(r["conflicts"] for r in per_node),
                "nodes_cpu": sum(r["cpu"] for r in per_node),
                "api_cpu": (api := proc_cpu(self.cluster._apiserver.pid) - api0),
                "etcd_cpu": (etcd := proc_cpu(self.cluster._etcd.pid) - etcd0),
                # What else kept the CPUs busy meanwhile (other work on the machine, the driver).
                "other_cpu": max(0.0, busy - api - etcd - sum(r["cpu"] for r in per_node))}

    def stop(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for w in self.workers:
            w.join(timeout=30)


def stored_allocations(cluster: Any, network: str) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Every allocation of the pool as the API server has it (address -> entries), and the block count."""
    from meta.ipam.kubestore import KubeStore
    from meta.ipam.store import BLOCK

    with KubeStore.from_token(cluster.host, cluster.token, str(cluster.ca_file), 30.0) as store:
        blocks = store.list(BLOCK, network)
    found: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for b in blocks:
        for ip, entry in b.data["allocations"].items():
            found[ip].append(entry)
    return found, len(blocks)


def verify_add(cluster: Any, run: dict[str, Any], expect_ok: int) -> list[str]:
    """Duplicates (answered twice, or stored in two blocks) and owners: every answered address must be in
    the store with the container it was answered to, and the store must hold nothing else."""
    stored, blocks = stored_allocations(cluster, run["network"])
    answered = [(ip, cid) for cid, ips in run["answered"] for ip in ips]
    counts = collections.Counter(ip for ip, _ in answered)
    run["duplicates"] = sum(c - 1 for c in counts.values()) + sum(len(v) - 1 for v in stored.values())
    run["blocks"] = blocks
    run["stored"] = len(stored)
    problems = []
    if len(answered) != expect_ok or run["errors"]:
        problems.append(f"{len(answered)} of {expect_ok} allocations answered; errors: {run['errors'][:3]}")
    for ip, cid in answered:
        if [e["containerID"] for e in stored.get(ip, [])] != [cid]:
            problems.append(f"{ip} answered to {cid[:12]} but stored as {stored.get(ip)}")
    orphans = set(stored) - set(counts)
    if orphans:
        problems.append(f"{len(orphans)} stored allocations nobody was answered: {sorted(orphans)[:5]}")
    if run["duplicates"]:
        problems.append(f"{run['duplicates']} duplicate addresses")
    return problems


def release(nodes: Nodes, cluster: Any, network: str, ipam: dict[str, Any], owners: dict[str, list[OwnerTuple]],
            added: dict[str, Any], label: str, problems: list[str]) -> dict[str, Any]:
    """Every node releases its pods (with the ADD's addresses as hints); the pool must be empty after."""
    hints = {cid: ips for cid, ips in added["answered"]}
    r = nodes.run("del", network, ipam, owners, label, hints)
    freed = [ip for _, ips in r["answered"] for ip in ips]
    left, r["blocks"] = stored_allocations(cluster, network)
    r["duplicates"], r["left"] = len(freed) - len(set(freed)), len(left)
    if r["errors"] or sorted(freed) != sorted(ip for ips in hints.values() for ip in ips):
        problems.append(f"{label}: {len(freed)} of {len(added['answered'])} addresses freed; errors {r['errors'][:3]}")
    if left:
        problems.append(f"{label}: the pool still holds {len(left)} allocations: {sorted(left)[:5]}")
    return r


def table(runs: list[dict[str, Any]]) -> str:
    head = ["run", "pods", "ok", "err", "wall s", "p50 ms", "p99 ms", "max ms", "req/op", "GET", "LIST", "POST",
            "PUT", "DEL", "409", "apiserver s", "etcd s", "nodes s", "other s", "dups", "blocks"]
    rows = []
    for r in runs:
        n = len(r["latencies"])
        lat = [x * 1000 for x in r["latencies"]]
        req = r["requests"]
        rows.append([r["label"], n, len(r["answered"]), len(r["errors"]), f"{r['wall']:.2f}",
                     f"{statistics.median(lat):.1f}", f"{percentile(lat, 0.99):.1f}", f"{max(lat):.1f}",
                     f"{sum(req.values()) / n:.2f}",
                     *[f"{req.get(k, 0) / n:.2f}" for k in ("GET", "LIST", "POST", "PUT", "DELETE")],
                     r["conflicts"], f"{r['api_cpu']:.1f}", f"{r['etcd_cpu']:.1f}", f"{r['nodes_cpu']:.1f}",
                     f"{r['other_cpu']:.1f}", r.get("duplicates", "-"), r.get("blocks", "-")])
    cells = [head] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    return "\n".join(lines)


def print_profile(profile_dir: str, phase: int, nodes: list[str], limit: int = 25) -> None:
    files = [os.path.join(profile_dir, f"{n}-{phase}.prof") for n in nodes]
    stats = pstats.Stats(files[0], stream=(out := io.StringIO()))
    for f in files[1:]:
        stats.add(f)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=1000, help="allocations per run, spread evenly over the nodes")
    ap.add_argument("--nodes", type=int, default=10, help="simulated nodes (default 10)")
    ap.add_argument("--threads", action="store_true", help="nodes as threads of one process instead of processes")
    ap.add_argument("--profile", action="store_true", help="cProfile every node; print the summed profile")
    ap.add_argument("--timeout", type=float, default=30.0, help="KubeStore budget per API operation (default 30 s)")
    ap.add_argument("--block-prefix", type=int, default=26, help="IPv4 block size of the /16 run (default 26)")
    args = ap.parse_args(argv)
    if args.pods % args.nodes:
        ap.error("--pods must be a multiple of --nodes")

    import tempfile

    from meta.cni.errors import CNIError
    from meta.ipam import config
    from meta.ipam.allocator import Allocator
    from meta.ipam.kubestore import KubeStore
    from tests.infra.kube_cluster import KUBE_APISERVER, KubeCluster

    per_node = args.pods // args.nodes
    pool16 = dict(POOL_16, block_size={"4": args.block_prefix})
    exact_size = 1000 if args.pods == 1000 else args.pods
    exact = dict(POOL_EXACT, range_end=str(ipaddress.ip_address("10.201.0.0") + exact_size))
    profile_dir = tempfile.mkdtemp(prefix="bench-ipam-prof-") if args.profile else None
    print(f"meta-ipam bench: {args.pods} pods by {args.nodes} nodes ({'threads' if args.threads else 'processes'}), "
          f"/{args.block_prefix} blocks in the /16 run; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"at start; kube-apiserver {KUBE_APISERVER}")
    problems: list[str] = []
    with KubeCluster(KUBE_APISERVER) as cluster:
        cluster.apply(CRD_FILE)
        nodes = Nodes(cluster, args.nodes, args.threads, profile_dir, args.timeout)
        try:
            runs = []
            owners16 = {n: [owner_for(n, k) for k in range(per_node)] for n in nodes.names}
            r16 = nodes.run("add", "bench16", pool16, owners16, "/16 ADD")
            problems += [f"/16: {p}" for p in verify_add(cluster, r16, args.pods)]
            runs.append(r16)
            runs.append(release(nodes, cluster, "bench16", pool16, owners16, r16, "/16 DEL", problems))

            owners_x = {n: [owner_for(n, k) for k in range(per_node)] for n in nodes.names}
            rx = nodes.run("add", "benchexact", exact, owners_x, f"exact {exact_size} ADD")
            problems += [f"exact: {p}" for p in verify_add(cluster, rx, args.pods)]
            runs.append(rx)
            if rx["stored"] != exact_size:
                problems.append(f"exact: the pool holds {rx['stored']} allocations, not all {exact_size} addresses")
            # One more: a clean error, and nothing written for it.
            with KubeStore.from_token(cluster.host, cluster.token, str(cluster.ca_file), 30.0) as store:
                extra = Allocator(store, "node-extra")
                try:
                    got = extra.allocate(config.parse(exact, "benchexact").pool, config.Owner(*owner_for("x", 0)))
                    problems.append(f"exact: pod {exact_size + 1} got {got} from a full pool")
                    full_error = "none"
                except CNIError as e:
                    full_error = f"code {e.code}: {e.msg}"
            if len(stored_allocations(cluster, "benchexact")[0]) != exact_size:
                problems.append("exact: the refused allocation left something behind")
            runs.append(release(nodes, cluster, "benchexact", exact, owners_x, rx, f"exact {exact_size} DEL", problems))
        finally:
            nodes.stop()

    print()
    print(table(runs))
    print()
    print(f"full pool, pod {exact_size + 1}: {full_error}")
    for r in runs:
        if r["op"] == "del":
            print(f"{r['label']}: {r['left']} allocations left in the pool ({r['blocks']} block objects)")
    if (args.pods, args.nodes) == (1000, 10):
        met = r16["wall"] < TARGET_SECONDS and not problems
        print(f"target: 1000 pods from a /16 by 10 nodes in < {TARGET_SECONDS:.0f} s on this machine: "
              f"{r16['wall']:.2f} s -> {'met' if met else 'NOT met'}")
    else:
        print(f"target: n/a (it is for 1000 pods by 10 nodes; this run: {r16['wall']:.2f} s)")
    if profile_dir:
        for phase, label in enumerate(r["label"] for r in runs):
            print(f"\n===== profile of the nodes: {label} (summed over {args.nodes} nodes) =====")
            print_profile(profile_dir, phase, nodes.names)
        shutil.rmtree(profile_dir, ignore_errors=True)
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
