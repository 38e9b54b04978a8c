#!/usr/bin/env python3
"""What meta-cni costs on top of the plugins it delegates to, for one pod with three attachments.

    python tests/bench/bench_pod.py [--rounds N] [--warmup N]      (root: it makes netns and links)

Per round, in a fresh network namespace, the same three attachments are made and removed two ways:
  meta    one `meta-cni` ADD / DEL (primary bridge eth0 + NADs bridge net1 and macvlan net2),
  direct  the reference plugins exec'd in sequence with the same configs (bridge eth0, bridge net1,
          macvlan net2; DEL in reverse with prevResult, as libcni and meta-cni do).
Rounds alternate meta, direct, meta, direct... so both see the same background noise. Start-up costs
(meta-cni VERSION, a bare start of meta-cni's Python, a Go plugin's VERSION) are printed for context.
Host links are named `mcbn*`, subnets are inside 10.242.0.0/16, everything else lives in a tmp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PLUGINS = Path("/usr/lib/cni")
POD = "pod-bench"
NETWORK = "metanet"


def find_meta_cni() -> Path:
    """The installed `meta-cni` executable: the running venv's, else the repo's venv, else PATH."""
    for cand in (Path(sys.prefix) / "bin" / "meta-cni", REPO / ".venv" / "bin" / "meta-cni"):
        if cand.is_file():
            return cand
    found = shutil.which("meta-cni")
    if not found:
        sys.exit("meta-cni is not installed (pip install -e . in the venv)")
    return Path(found)


def interpreter_of(script: Path) -> str:
    """The Python a console script runs under (its shebang), so the bare-start baseline is comparable."""
    first = script.read_bytes().split(b"\n", 1)[0].decode()
    return first[2:].strip().split()[0] if first.startswith("#!") else sys.executable


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Bench:
    """The host side of the benchmark (links, dirs, configs) and the two ways of attaching a pod."""

    def __init__(self, root: Path, meta_cni: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.root = root
        self.tag = tag
        self.meta_cni = meta_cni
        self.bridges = (f"mcbn{tag}p", f"mcbn{tag}s")
        self.master = f"mcbnm{tag}"
        self.bin_dir = root / "bin"
        self.conf_dir = root / "conf"
        self.manifests_dir = root / "manifests"
        self.cni_dir = root / "cache"
        self.ipam_dir = root / "ipam"
        for d in (self.bin_dir, self.conf_dir, self.manifests_dir, self.cni_dir, self.ipam_dir, root / "devinfo"):
            d.mkdir(parents=True)
        # The runtime finds meta-cni in a plugin dir searched before the reference plugins.
        (self.bin_dir / "meta-cni").symlink_to(meta_cni)
        self.cni_path = f"{self.bin_dir}:{REFERENCE_PLUGINS}"

        def ipam(n: int) -> dict[str, Any]:
            return {"type": "host-local", "subnet": f"10.242.{n}.0/24", "dataDir": str(self.ipam_dir)}

        # (network name, ifname, plugin config): what meta-cni resolves, and what `direct` execs.
        self.delegates: list[tuple[str, str, dict[str, Any]]] = [
            ("primary", "eth0", {"type": "bridge", "bridge": self.bridges[0], "isGateway": True, "ipam": ipam(0)}),
            ("br-a", "net1", {"type": "bridge", "bridge": self.bridges[1], "ipam": ipam(1)}),
            ("mv-a", "net2", {"type": "macvlan", "master": self.master, "mode": "bridge", "ipam": ipam(2)}),
        ]
        (self.conf_dir / "primary.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "primary",
                                                               **self.delegates[0][2]}))
        docs = [{"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                 "metadata": {"name": name, "namespace": "default"},
                 "spec": {"config": json.dumps({"cniVersion": "1.0.0", **conf})}}
                for name, _, conf in self.delegates[1:]]
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": POD, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": "br-a, mv-a"}}})
        # JSON is valid YAML; the manifests source reads *.json too, and no YAML library is needed here.
        (self.manifests_dir / "pod.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        self.meta_conf = json.dumps({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "meta-cni", "clusterNetwork": "primary",
            "confDir": str(self.conf_dir), "manifestsDir": str(self.manifests_dir), "cniDir": str(self.cni_dir),
            "deviceInfoDir": str(root / "devinfo")}).encode()
        # meta-cni always gives delegates IgnoreUnknown plus the pod keys: give `direct` the same.
        self.pod_args = f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={POD}"
        self.delegate_args = f"IgnoreUnknown=true;{self.pod_args}"

    def create_links(self) -> None:
        sh("ip", "link", "add", self.master, "type", "veth", "peer", "name", self.master + "p")
        for n in (self.master, self.master + "p"):
            sh("ip", "link", "set", n, "up")

    def remove_links(self) -> None:
        for name in (*self.bridges, self.master):
            subprocess.run(["ip", "link", "del", name], capture_output=True)

    def exec_plugin(self, binary: Path, command: str, stdin: bytes, container_id: str, netns: str, ifname: str,
                    cni_args: str) -> bytes:
        env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns,
                   CNI_IFNAME=ifname, CNI_ARGS=cni_args, CNI_PATH=self.cni_path)
        p = subprocess.run([str(binary)], input=stdin, capture_output=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{binary.name} {command} {ifname}: rc {p.returncode}: {p.stdout.decode()} {p.stderr.decode()}")
        return p.stdout

    # --- the two approaches: each returns (ADD seconds, DEL seconds) for one pod in `netns`

    def meta(self, netns: str, container_id: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.exec_plugin(self.meta_cni, "ADD", self.meta_conf, container_id, netns, "eth0", self.pod_args)
        t1 = time.perf_counter()
        check_links(netns, {"lo", "eth0", "net1", "net2"})
        t2 = time.perf_counter()
        self.exec_plugin(self.meta_cni, "DEL", self.meta_conf, container_id, netns, "eth0", self.pod_args)
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    def direct(self, netns: str, container_id: str) -> tuple[float, float]:
        results: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for name, ifname, conf in self.delegates:
            stdin = json.dumps({"cniVersion": "1.0.0", "name": name, **conf}).encode()
            out = self.exec_plugin(REFERENCE_PLUGINS / conf["type"], "ADD", stdin, container_id, netns, ifname,
                                   self.delegate_args)
            results.append(json.loads(out))
        t1 = time.perf_counter()
        check_links(netns, {"lo", "eth0", "net1", "net2"})
        t2 = time.perf_counter()
        for (name, ifname, conf), res in reversed(list(zip(self.delegates, results))):
            stdin = json.dumps({"cniVersion": "1.0.0", "name": name, **conf, "prevResult": res}).encode()
            self.exec_plugin(REFERENCE_PLUGINS / conf["type"], "DEL", stdin, container_id, netns, ifname,
                             self.delegate_args)
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2


def check_links(netns: str, expected: set[str]) -> None:
    """Fail loudly rather than time a pod that was not really attached (or detached)."""
    out = subprocess.run(["ip", "-n", Path(netns).name, "-j", "link"], capture_output=True, text=True, check=True)
    found = {link["ifname"] for link in json.loads(out.stdout)}
    if found != expected:
        raise RuntimeError(f"{netns}: interfaces {sorted(found)}, expected {sorted(expected)}")


@contextmanager
def fresh_netns(name: str) -> Iterator[str]:
    sh("ip", "netns", "add", name)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def time_exec(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv}: rc {p.returncode}: {p.stdout.decode()} {p.stderr.decode()}")
    return dt


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def run(rounds: int, warmup: int) -> list[tuple[str, list[float]]]:
    meta_cni = find_meta_cni()
    root = Path(tempfile.mkdtemp(prefix="mcbn-"))
    bench = Bench(root, meta_cni)
    samples: dict[str, list[float]] = {k: [] for k in ("meta ADD", "meta DEL", "direct ADD", "direct DEL")}
    try:
        bench.create_links()
        approaches: list[tuple[str, Callable[[str, str], tuple[float, float]]]] = [
            ("meta", bench.meta), ("direct", bench.direct)]
        # Warm-up rounds (not counted) create the bridges and fill the page cache for both approaches.
        for i in range(warmup + rounds):
            for label, approach in approaches:
                with fresh_netns(f"mcbn-{bench.tag}-{label}-{i}") as netns:
                    add, delete = approach(netns, f"bench-{bench.tag}-{label}-{i}")
                    check_links(netns, {"lo"})
                if i >= warmup:
                    samples[f"{label} ADD"].append(add)
                    samples[f"{label} DEL"].append(delete)
            # Only per-pod records count: meta-cni also keeps memo/index files in cniDir.
            if list((bench.cni_dir / NETWORK).glob("*/*.json")):
                raise RuntimeError(f"meta-cni cache not empty after round {i}")
        version_env = dict(os.environ, CNI_COMMAND="VERSION", CNI_PATH=bench.cni_path)
        startup = {
            "meta-cni VERSION": [time_exec([str(meta_cni)], b'{"cniVersion":"1.0.0"}', version_env) for _ in range(rounds)],
            f"bare python start ({Path(interpreter_of(meta_cni)).name} -c pass)":
                [time_exec([interpreter_of(meta_cni), "-c", "pass"]) for _ in range(rounds)],
            "bridge VERSION (Go plugin)":
                [time_exec([str(REFERENCE_PLUGINS / "bridge")], b'{"cniVersion":"1.0.0"}', version_env) for _ in range(rounds)],
        }
    finally:
        bench.remove_links()
        shutil.rmtree(root, ignore_errors=True)
    return [*samples.items(), *startup.items()]


def table(rows: list[tuple[str, list[float]]], rounds: int) -> str:
    by = dict(rows)
    lines = [f"meta-cni pod benchmark: {rounds} interleaved rounds, fresh netns each; "
             "3 attachments (bridge eth0, bridge net1, macvlan net2)",
             f"{'measurement':<44}{'median ms':>11}{'p90 ms':>10}", "-" * 65]

    def line(label: str, med: float, hi: float, unit: float = 1000.0, fmt: str = ".1f") -> None:
        lines.append(f"{label:<44}{med * unit:>11{fmt}}{hi * unit:>10{fmt}}")

    for op in ("ADD", "DEL"):
        meta, direct = by[f"meta {op}"], by[f"direct {op}"]
        line(f"{op} meta-cni (1 exec -> 3 delegates)", statistics.median(meta), p90(meta))
        line(f"{op} direct (3 plugin execs)", statistics.median(direct), p90(direct))
        line(f"{op} ratio meta/direct (x)", statistics.median(meta) / statistics.median(direct),
             p90(meta) / p90(direct), unit=1.0, fmt=".2f")
        line(f"{op} overhead meta-direct", statistics.median(meta) - statistics.median(direct),
             p90(meta) - p90(direct))
    lines.append("-" * 65)
    for label, values in rows[4:]:
        line(f"start-up: {label}", statistics.median(values), p90(values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="measured rounds per approach (default 30)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")
    if os.geteuid() != 0:
        sys.exit("bench_pod.py needs root (network namespaces, bridges)")
    if not (REFERENCE_PLUGINS / "bridge").is_file():
        sys.exit(f"reference CNI plugins missing in {REFERENCE_PLUGINS}: run tests/infra/provision.sh")
    print(table(run(args.rounds, args.warmup), args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
