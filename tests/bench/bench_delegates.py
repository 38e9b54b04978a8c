#!/usr/bin/env python3
"""What meta-cni's built-in delegates cost, per attachment and per pod, against the reference plugins.

    python tests/bench/bench_delegates.py [--rounds N] [--warmup N]      (root: it makes netns and links)

1. One attachment (net1) ADD and DEL, per built-in delegate (macvlan; bridge once delegates/bridge.py exists):
     (a) in-process   delegates._plugin.dispatch(module, PluginArgs(...)) in this already-running process,
     (b) standalone   the delegate's own executable (.venv/bin/meta-macvlan ...), exec'd: Python start-up
                      and the pyroute2 import are paid on every call,
     (c) reference    the Go plugin (/usr/lib/cni/macvlan ...), exec'd.
   IPAM is the reference host-local, exec'd, in all three (as in production). Ratios are ours/reference.
2. One pod, primary bridge eth0 + bridge net1 + macvlan net2:
     (i)   meta-cni exec'd, built-in delegates (builtinStandardTypes true), parallelAttachments true,
     (ii)  meta-cni exec'd, reference plugins exec'd, parallelAttachments true,
     (iii) meta-cni exec'd, reference plugins exec'd, parallelAttachments false,
     (iv)  the three reference plugins exec'd directly in sequence (DEL in reverse, with prevResult),
     (v)   meta.core.run() with the built-in config, called in this already-running process (no exec of
           meta-cni; what a node daemon would pay per pod),
     (v')  the three built-in delegates alone, called in this process in sequence (no planning, no cache).
   Ratios are against (iv).
3. Start-up costs, each in a fresh interpreter: a bare Python start, importing pyroute2, meta.core and
   each delegate module; the VERSION exec of meta-cni, of a standalone delegate and of a Go plugin.

Every measurement runs once per round; the order rotates from round to round so that all share the
same background noise. Every ADD and DEL gets a fresh network namespace; the interfaces are checked after
ADD and after DEL, and so are the bridges' ports, the host-local stores and meta-cni's cache (an error
stops the run). Host links are named `mcbd<hex>`, subnets are inside 10.235.0.0/16, files live in a tmp
dir; everything is removed at the end, also on failure or SIGTERM.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"

if __name__ == "__main__":
    # The in-process measurements need the project's dependencies.
    from in_venv import ensure  # this directory is sys.path[0] when run as a script

    ensure(__file__, ("attrs", "pyroute2"))

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

REFERENCE_PLUGINS = Path("/usr/lib/cni")
POD = "pod-bench"
CNI_VERSION = "1.0.0"
POD_ARGS = f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={POD}"
# meta-cni always gives delegates IgnoreUnknown plus the pod keys: the direct calls get the same.
DELEGATE_ARGS = f"IgnoreUnknown=true;{POD_ARGS}"
DELEGATES = ("macvlan", "bridge")  # ipvlan: see ipvlan_note()

Sample = tuple[float, float]  # (ADD seconds, DEL seconds)


# --- small helpers ------------------------------------------------------------------------------------

def sh(*args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc {p.returncode}: {p.stderr.strip()}")
    return p


def venv_bin(name: str) -> Path:
    for cand in (Path(sys.prefix) / "bin" / name, VENV / "bin" / name):
        if cand.is_file():
            return cand
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} is not installed (pip install -e . in the venv)")
    return Path(found)


def exec_plugin(binary: Path, command: str, stdin: bytes, container_id: str, netns: str, ifname: str,
                cni_args: str, cni_path: str) -> bytes:
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns,
               CNI_IFNAME=ifname, CNI_ARGS=cni_args, CNI_PATH=cni_path)
    p = subprocess.run([str(binary)], input=stdin, capture_output=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{binary.name} {command} {ifname}: rc {p.returncode}: {p.stdout.decode()} {p.stderr.decode()}")
    return p.stdout


def time_exec(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=REPO)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv}: rc {p.returncode}: {p.stdout.decode()} {p.stderr.decode()}")
    return dt


def import_cost(python: str, statement: str) -> float:
    """Seconds `statement` takes in a fresh interpreter, measured inside it (start-up excluded)."""
    code = f"import time\nt0 = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t0)"
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{python} -c {statement!r}: {p.stderr.strip()}")
    return float(p.stdout.strip().splitlines()[-1])


def check_links(netns: str, expected: set[str]) -> None:
    """Fail loudly rather than time a pod that was not really attached (or detached)."""
    out = sh("ip", "-n", Path(netns).name, "-j", "link").stdout
    found = {link["ifname"] for link in json.loads(out)}
    if found != expected:
        raise RuntimeError(f"{netns}: interfaces {sorted(found)}, expected {sorted(expected)}")


def check_no_ports(bridges: tuple[str, ...]) -> None:
    """After DEL no veth may be left on the bridges (the host end goes with the container end)."""
    for br in bridges:
        p = subprocess.run(["ip", "-j", "link", "show", "master", br], capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip() and json.loads(p.stdout):
            raise RuntimeError(f"bridge {br} still has ports after DEL: {[x['ifname'] for x in json.loads(p.stdout)]}")


def check_ipam_released(ipam_dir: Path) -> None:
    """After DEL host-local must hold no address: only its lock and last_reserved_ip files remain."""
    left = [p for p in ipam_dir.glob("*/*") if p.name != "lock" and not p.name.startswith("last_reserved_ip")]
    if left:
        raise RuntimeError(f"host-local addresses not released after DEL: {[str(p) for p in left]}")


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


# --- the benchmark ------------------------------------------------------------------------------------

class HostResources:
    """What one bench run makes on the host, named so that it can all be found and removed: links
    `<prefix><tag>NN`, network namespaces `<prefix>-<tag>-N`, /24s of `<supernet>.0.0/16`."""

    def __init__(self, prefix: str, supernet: str) -> None:
        self.prefix = prefix
        self.supernet = supernet
        self.tag = uuid.uuid4().hex[:6]
        self._links = 0
        self._subnets = 0
        self._ns = 0

    def link_name(self) -> str:
        self._links += 1
        name = f"{self.prefix}{self.tag}{self._links:02x}"
        assert len(name) <= 15
        return name

    def subnet(self) -> str:
        self._subnets += 1
        assert self._subnets < 255
        return f"{self.supernet}.{self._subnets}.0/24"

    def master(self) -> str:
        """A veth pair on the host whose first end is a macvlan master (this kernel has no dummy links)."""
        a, b = self.link_name(), self.link_name()
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for n in (a, b):
            sh("ip", "link", "set", n, "up")
        return a

    def ipam(self, ipam_dir: Path) -> dict[str, Any]:
        return {"type": "host-local", "subnet": self.subnet(), "dataDir": str(ipam_dir)}

    def netns(self) -> str:
        self._ns += 1
        name = f"{self.prefix}-{self.tag}-{self._ns}"
        sh("ip", "netns", "add", name)
        return f"/var/run/netns/{name}"

    @staticmethod
    def del_netns(path: str) -> None:
        subprocess.run(["ip", "netns", "del", Path(path).name], capture_output=True)

    @contextmanager
    def fresh_netns(self) -> Iterator[str]:
        path = self.netns()
        try:
            yield path
        finally:
            self.del_netns(path)

    def remove_host_resources(self) -> None:
        for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.prefix}-{self.tag}-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout
        for link in json.loads(out or "[]"):
            if link["ifname"].startswith(f"{self.prefix}{self.tag}"):
                subprocess.run(["ip", "link", "del", link["ifname"]], capture_output=True)


class Bench(HostResources):
    def __init__(self, root: Path, delegates: tuple[str, ...]) -> None:
        super().__init__("mcbd", "10.235")
        self.root = root
        self.delegates = delegates
        self.modules: dict[str, ModuleType] = {}
        self.meta_cni = venv_bin("meta-cni")
        self.bin_dir = root / "bin"
        self.bin_dir.mkdir(parents=True)
        (self.bin_dir / "meta-cni").symlink_to(self.meta_cni)
        self.cni_path = f"{self.bin_dir}:{REFERENCE_PLUGINS}"
        # name -> (fn(netns, container_id) -> (ADD s, DEL s)); the order is the report's.
        self.cases: dict[str, Callable[[str, str], Sample]] = {}
        self.startup: dict[str, Callable[[], float]] = {}

    def cleanup(self) -> None:
        self.remove_host_resources()

    # part 1: one attachment
    def plugin_conf(self, delegate: str, plugin_type: str, ipam_dir: Path, host: str) -> dict[str, Any]:
        conf: dict[str, Any] = {"cniVersion": CNI_VERSION, "name": f"bd-{delegate}", "type": plugin_type}
        if delegate == "macvlan":
            conf |= {"master": host, "mode": "bridge"}
        else:
            conf |= {"bridge": host, "isGateway": True}
        return conf | {"ipam": self.ipam(ipam_dir)}

    def add_single(self, delegate: str, way: str) -> None:
        ipam_dir = self.root / f"ipam-{delegate}-{way}"
        ipam_dir.mkdir()
        host = self.master() if delegate == "macvlan" else self.link_name()
        bridges = (host,) if delegate == "bridge" else ()
        conf = self.plugin_conf(delegate, delegate if way == "reference" else f"meta-{delegate}", ipam_dir, host)
        if way == "in-process":
            module = self.modules[delegate]
            call = lambda cmd, stdin, cid, netns: self.in_process(module, cmd, stdin, cid, netns, "net1")  # noqa: E731
        else:
            binary = REFERENCE_PLUGINS / delegate if way == "reference" else venv_bin(f"meta-{delegate}")
            call = lambda cmd, stdin, cid, netns: exec_plugin(  # noqa: E731
                binary, cmd, stdin, cid, netns, "net1", DELEGATE_ARGS, str(REFERENCE_PLUGINS))

        def case(netns: str, cid: str) -> Sample:
            t0 = time.perf_counter()
            out = call("ADD", json.dumps(conf).encode(), cid, netns)
            t1 = time.perf_counter()
            check_links(netns, {"lo", "net1"})
            stdin = json.dumps(conf | {"prevResult": json.loads(out)}).encode()
            t2 = time.perf_counter()
            call("DEL", stdin, cid, netns)
            t3 = time.perf_counter()
            check_links(netns, {"lo"})
            check_no_ports(bridges)
            check_ipam_released(ipam_dir)
            return t1 - t0, t3 - t2

        self.cases[f"1 {delegate} {way}"] = case

    @staticmethod
    def in_process(module: ModuleType, command: str, stdin: bytes, cid: str, netns: str, ifname: str) -> bytes:
        """One delegate call as meta-cni's built-in invoker makes it: JSON in, rendered result out."""
        from delegates._plugin import PluginArgs, dispatch, render
        from meta.cni import args as cniargs

        config = json.loads(stdin)
        args = PluginArgs(command=command, container_id=cid, netns=netns, ifname=ifname,
                          cni_args=cniargs.parse(DELEGATE_ARGS), path=(str(REFERENCE_PLUGINS),),
                          config=config, stdin=stdin)
        return render(dispatch(module, args), args.cni_version)

    # part 2: one pod
    def add_pod(self, label: str, how: str, builtin: bool = False, parallel: bool = True) -> None:
        """how: 'meta' (meta-cni exec'd), 'direct' (reference plugins exec'd), 'daemon' (meta.core.run
        here), 'delegates' (the built-in invoker here, three calls)."""
        d = self.root / f"pod-{len(self.cases)}"
        ipam_dir, conf_dir, manifests_dir, cni_dir = d / "ipam", d / "conf", d / "manifests", d / "cache"
        for x in (ipam_dir, conf_dir, manifests_dir, cni_dir, d / "devinfo"):
            x.mkdir(parents=True)
        bridges = (self.link_name(), self.link_name())
        master = self.master()
        delegates: list[tuple[str, str, dict[str, Any]]] = [
            ("primary", "eth0", {"type": "bridge", "bridge": bridges[0], "isGateway": True, "ipam": self.ipam(ipam_dir)}),
            ("br-a", "net1", {"type": "bridge", "bridge": bridges[1], "ipam": self.ipam(ipam_dir)}),
            ("mv-a", "net2", {"type": "macvlan", "master": master, "mode": "bridge", "ipam": self.ipam(ipam_dir)}),
        ]
        ifnames = {"lo"} | {ifname for _, ifname, _ in delegates}
        (conf_dir / "primary.conf").write_text(json.dumps({"cniVersion": CNI_VERSION, "name": "primary", **delegates[0][2]}))
        docs: list[dict[str, Any]] = [
            {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
             "metadata": {"name": name, "namespace": "default"},
             "spec": {"config": json.dumps({"cniVersion": CNI_VERSION, **conf})}}
            for name, _, conf in delegates[1:]]
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": POD, "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": "br-a, mv-a"}}})
        (manifests_dir / "pod.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        network = "metanet"
        meta_conf = json.dumps({
            "cniVersion": CNI_VERSION, "name": network, "type": "meta-cni", "clusterNetwork": "primary",
            "confDir": str(conf_dir), "manifestsDir": str(manifests_dir), "cniDir": str(cni_dir),
            "deviceInfoDir": str(d / "devinfo"), "builtinStandardTypes": builtin,
            "parallelAttachments": parallel}).encode()

        def verify_gone(netns: str) -> None:
            check_links(netns, {"lo"})
            check_no_ports(bridges)
            check_ipam_released(ipam_dir)
            if list((cni_dir / network).glob("*/*.json")):
                raise RuntimeError(f"{label}: meta-cni cache not empty after DEL")

        def env(command: str, cid: str, netns: str) -> dict[str, str]:
            return dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns,
                        CNI_IFNAME="eth0", CNI_ARGS=POD_ARGS, CNI_PATH=self.cni_path)

        def meta(netns: str, cid: str) -> Sample:
            t0 = time.perf_counter()
            exec_plugin(self.meta_cni, "ADD", meta_conf, cid, netns, "eth0", POD_ARGS, self.cni_path)
            t1 = time.perf_counter()
            check_links(netns, ifnames)
            t2 = time.perf_counter()
            exec_plugin(self.meta_cni, "DEL", meta_conf, cid, netns, "eth0", POD_ARGS, self.cni_path)
            t3 = time.perf_counter()
            verify_gone(netns)
            return t1 - t0, t3 - t2

        def daemon(netns: str, cid: str) -> Sample:
            from meta import core

            t0 = time.perf_counter()
            core.run(env("ADD", cid, netns), meta_conf)
            t1 = time.perf_counter()
            check_links(netns, ifnames)
            t2 = time.perf_counter()
            core.run(env("DEL", cid, netns), meta_conf)
            t3 = time.perf_counter()
            verify_gone(netns)
            return t1 - t0, t3 - t2

        def sequence(call: Callable[[str, str, bytes, str, str], bytes]) -> Callable[[str, str], Sample]:
            def run(netns: str, cid: str) -> Sample:
                results = []
                t0 = time.perf_counter()
                for name, ifname, conf in delegates:
                    stdin = json.dumps({"cniVersion": CNI_VERSION, "name": name, **conf}).encode()
                    results.append(json.loads(call(conf["type"], "ADD", stdin, cid, netns, ifname)))
                t1 = time.perf_counter()
                check_links(netns, ifnames)
                t2 = time.perf_counter()
                for (name, ifname, conf), res in reversed(list(zip(delegates, results))):
                    stdin = json.dumps({"cniVersion": CNI_VERSION, "name": name, **conf, "prevResult": res}).encode()
                    call(conf["type"], "DEL", stdin, cid, netns, ifname)
                t3 = time.perf_counter()
                verify_gone(netns)
                return t1 - t0, t3 - t2
            return run

        def direct(plugin_type: str, command: str, stdin: bytes, cid: str, netns: str, ifname: str) -> bytes:
            return exec_plugin(REFERENCE_PLUGINS / plugin_type, command, stdin, cid, netns, ifname, DELEGATE_ARGS,
                               self.cni_path)

        invoker = None
        if how == "delegates":
            from meta.invoke import Invocation
            from meta.invoke.builtin import BuiltinInvoker
            from meta.invoke.exec import ExecInvoker

            invoker = BuiltinInvoker(ExecInvoker(60.0), standard_types=True)

        def builtin_call(plugin_type: str, command: str, stdin: bytes, cid: str, netns: str, ifname: str) -> bytes:
            inv = Invocation(command=command, container_id=cid, netns=netns, ifname=ifname, cni_args=DELEGATE_ARGS,
                             path=tuple(self.cni_path.split(":")), where=f"bench {ifname}")
            return invoker.run(plugin_type, stdin, inv)  # type: ignore[union-attr]

        self.cases[label] = {"meta": meta, "daemon": daemon, "direct": sequence(direct),
                             "delegates": sequence(builtin_call)}[how]

    # part 3: start-up
    def add_startup(self) -> None:
        py = str(venv_bin("python"))
        version_env = dict(os.environ, CNI_COMMAND="VERSION", CNI_PATH=self.cni_path)
        v = b'{"cniVersion":"1.0.0"}'
        s = self.startup
        s["bare Python start (python -c pass)"] = lambda: time_exec([py, "-c", "pass"])
        s["import pyroute2 (IPRoute, NetlinkError)"] = lambda: import_cost(
            py, "from pyroute2 import IPRoute\nfrom pyroute2.netlink.exceptions import NetlinkError")
        s["import meta.core"] = lambda: import_cost(py, "import meta.core")
        for dl in self.delegates:
            s[f"import delegates.{dl} (incl. pyroute2)"] = (lambda dl=dl: import_cost(py, f"import delegates.{dl}"))
        s["meta-cni VERSION (exec)"] = lambda: time_exec([str(self.meta_cni)], v, version_env)
        s[f"meta-{self.delegates[0]} VERSION (exec)"] = lambda: time_exec(
            [str(venv_bin(f"meta-{self.delegates[0]}"))], v, version_env)
        s[f"{self.delegates[0]} VERSION (exec, Go plugin)"] = lambda: time_exec(
            [str(REFERENCE_PLUGINS / self.delegates[0])], v, version_env)


def builtin_set(delegates: tuple[str, ...]) -> str:
    """Which attachments of the pod really run built-in (bridge falls back to exec without bridge.py)."""
    kinds = {"eth0": "bridge", "net1": "bridge", "net2": "macvlan"}
    return ", ".join(f"{i}:{k}{'' if k in delegates else '(exec)'}" for i, k in kinds.items())


def ipvlan_note(bench: Bench) -> str:
    """ipvlan is never measured here; say why (this kernel cannot create ipvlan links)."""
    master = bench.master()
    probe = bench.link_name()
    p = subprocess.run(["ip", "link", "add", probe, "link", master, "type", "ipvlan", "mode", "l2"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return f"ipvlan: not measured - this kernel cannot create ipvlan links ({p.stderr.strip()})"
    subprocess.run(["ip", "link", "del", probe], capture_output=True)
    return "ipvlan: not measured (out of this benchmark's scope)"


def run(rounds: int, warmup: int, delegates: tuple[str, ...]) -> str:
    root = Path(tempfile.mkdtemp(prefix="mcbd-"))
    bench = Bench(root, delegates)
    try:
        # Imported once, as a daemon would have them (warm-up rounds then settle caches and memos).
        for dl in delegates:
            bench.modules[dl] = importlib.import_module(f"delegates.{dl}")
        importlib.import_module("meta.core")
        importlib.import_module("meta.invoke.builtin")
        notes = [ipvlan_note(bench)]
        for dl in delegates:
            for way in ("in-process", "standalone", "reference"):
                bench.add_single(dl, way)
        pods = [("(i)", "meta", True, True), ("(ii)", "meta", False, True), ("(iii)", "meta", False, False),
                ("(iv)", "direct", False, False), ("(v)", "daemon", True, True), ("(v')", "delegates", True, False)]
        for label, how, builtin, parallel in pods:
            bench.add_pod(label, how, builtin, parallel)
        bench.add_startup()
        samples: dict[str, list[Sample]] = {k: [] for k in bench.cases}
        start: dict[str, list[float]] = {k: [] for k in bench.startup}
        jobs: list[tuple[str, Callable[[], None]]] = []
        for name, case in bench.cases.items():
            def job(name: str = name, case: Callable[[str, str], Sample] = case) -> None:
                with bench.fresh_netns() as netns:
                    sample = case(netns, f"bench-{bench.tag}-{bench._ns}")
                if counting:
                    samples[name].append(sample)
            jobs.append((name, job))
        for name, fn in bench.startup.items():
            def sjob(name: str = name, fn: Callable[[], float] = fn) -> None:
                dt = fn()
                if counting:
                    start[name].append(dt)
            jobs.append((name, sjob))
        t_start = time.monotonic()
        for i in range(warmup + rounds):
            counting = i >= warmup
            k = i % len(jobs)  # rotate the order: no measurement always runs first or after the same one
            for _, job in jobs[k:] + jobs[:k]:
                job()
        elapsed = time.monotonic() - t_start
        return report(samples, start, rounds, warmup, delegates, notes, elapsed)
    finally:
        bench.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# --- the report ---------------------------------------------------------------------------------------

def report(samples: dict[str, list[Sample]], start: dict[str, list[float]], rounds: int, warmup: int,
           delegates: tuple[str, ...], notes: list[str], elapsed: float) -> str:
    W = 62
    out = [f"meta-cni delegate benchmark: {rounds} interleaved rounds (+{warmup} warm-up), fresh netns per ADD/DEL; "
           f"built-in delegates: {', '.join(delegates)}; {elapsed:.0f}s"]

    def head(title: str, ratio: str) -> None:
        cols = f"{ratio:>14}{'(p90)':>7}" if ratio else ""
        out.extend(["", title, f"{'':<{W}}{'median ms':>10}{'p90 ms':>9}{cols}", "-" * (W + 40)])

    def row(label: str, values: list[float], ref: list[float] | None = None) -> None:
        med, hi = statistics.median(values), p90(values)
        r = f"{med / statistics.median(ref):>13.2f}x{hi / p90(ref):>6.2f}x" if ref else ""
        out.append(f"{label:<{W}}{med * 1000:>10.1f}{hi * 1000:>9.1f}{r}")

    def op(name: str, j: int) -> list[float]:
        return [s[j] for s in samples[name]]

    head("1. one attachment (net1), per delegate; IPAM host-local exec'd in all", "ours/ref")
    for dl in delegates:
        for j, o in enumerate(("ADD", "DEL")):
            ref = op(f"1 {dl} reference", j)
            row(f"{dl} {o} (a) in-process dispatch()", op(f"1 {dl} in-process", j), ref)
            row(f"{dl} {o} (b) standalone meta-{dl} (exec)", op(f"1 {dl} standalone", j), ref)
            row(f"{dl} {o} (c) reference {REFERENCE_PLUGINS / dl} (exec)", ref)

    head("2. one pod: bridge eth0 (primary) + bridge net1 + macvlan net2", "vs (iv)")
    labels = {
        "(i)": "meta-cni exec, built-ins (see below), parallel",
        "(ii)": "meta-cni exec, reference execs, parallel",
        "(iii)": "meta-cni exec, reference execs, sequential",
        "(iv)": "3 reference plugins exec'd directly, sequential",
        "(v)": "DAEMON: meta.core.run in-process, built-ins, par.",
        "(v')": "built-in delegates alone, in-process, sequential",
    }
    for j, o in enumerate(("ADD", "DEL")):
        ref = op("(iv)", j)
        for k, text in labels.items():
            row(f"{o} {k:<5} {text}", op(k, j), None if k == "(iv)" else ref)
    full = [d for d in ("bridge", "macvlan") if d in delegates]
    out.append(f"(i)/(v) built-in attachments: {builtin_set(delegates)}"
               + ("" if len(full) == 2 else " - (exec) = reference plugin exec'd, no built-in yet"))
    v_add, iv_add = statistics.median(op("(v)", 0)), statistics.median(op("(iv)", 0))
    verdict = "MET" if v_add < iv_add and len(full) == 2 else ("not met" if len(full) == 2 else "not assessable")
    out.append(f"target (daemon, ADD): built-in in-process {v_add * 1000:.1f} ms vs 3 direct reference execs "
               f"{iv_add * 1000:.1f} ms -> {verdict}" + ("" if len(full) == 2 else " (bridge not built-in yet)"))

    head("3. start-up and import costs (each in a fresh interpreter / process)", "")
    for name, values in start.items():
        row(name, values)
    i_add = statistics.median(op("(i)", 0))
    out.append(f"thin-mode gap, ADD: (i) exec'd {i_add * 1000:.1f} ms - (v) in-process {v_add * 1000:.1f} ms = "
               f"{(i_add - v_add) * 1000:.1f} ms (Python start + imports of meta.core, pyroute2, delegates)")
    out.extend(["", "notes:", *(f"  {n}" for n in notes)])
    if "bridge" not in delegates:
        out.append("  bridge: not measured as a built-in - delegates/bridge.py does not exist (yet)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="measured rounds (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")
    if os.geteuid() != 0:
        sys.exit("bench_delegates.py needs root (network namespaces, links)")
    if not (REFERENCE_PLUGINS / "bridge").is_file():
        sys.exit(f"reference CNI plugins missing in {REFERENCE_PLUGINS}: run tests/infra/provision.sh")
    delegates = tuple(d for d in DELEGATES if (REPO / "delegates" / f"{d}.py").is_file())
    if "macvlan" not in delegates:
        sys.exit("delegates/macvlan.py is missing")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove links, netns and files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(run(args.rounds, args.warmup, delegates), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
