"""`metactl demo`: the main job end to end on the embedded default (no cluster).

Installs meta-cni as a runtime would (its conflist in a conf dir, the executable on a CNI path), makes
the pods of samples/demo as network namespaces, attaches each by exec'ing `meta-cni` with the CNI
environment a runtime sets, prints every pod's network-status, pings between the pods over every
secondary network, then deletes everything and checks that nothing is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path("/run/meta-cni-demo")
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "demo"
MASTER = "metademo-mv"


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


def _say(msg: str) -> None:
    print(msg, flush=True)


class Demo:
    def __init__(self, samples: Path = SAMPLES, root: Path = ROOT) -> None:
        self.samples = samples
        self.root = root
        self.netns: list[str] = []
        self.added: list[tuple[str, dict[str, str]]] = []
        self.installed = False  # tear down only what this run set up, never another run's demo

    # --- set-up -------------------------------------------------------------------------------------
    def install(self) -> None:
        """Lay out the node as a runtime sees it: conf dir, bin dir, manifests."""
        if self.root.exists():
            raise RuntimeError(f"{self.root} exists: another demo is running or was interrupted (remove it first)")
        shutil.copytree(self.samples, self.root)
        self.installed = True
        (self.root / "net.d").mkdir()
        shutil.move(self.root / "00-meta-cni.conflist", self.root / "net.d" / "00-meta-cni.conflist")
        (self.root / "bin").mkdir()
        meta_cni = shutil.which("meta-cni") or str(Path(sys.executable).parent / "meta-cni")
        os.symlink(meta_cni, self.root / "bin" / "meta-cni")
        # Nothing else is on the CNI path: bridge, macvlan and host-local can then only be meta-cni's
        # built-ins (the demo config maps the standard type names to them), all in meta-cni's process.
        _sh("ip", "link", "add", MASTER, "type", "veth", "peer", "name", MASTER + "p")
        for link in (MASTER, MASTER + "p"):
            _sh("ip", "link", "set", link, "up")

    def conflist(self) -> dict[str, Any]:
        return json.loads((self.root / "net.d" / "00-meta-cni.conflist").read_text())

    def pods(self) -> list[dict[str, Any]]:
        import yaml

        docs = yaml.safe_load_all((self.root / "manifests" / "pods.yaml").read_text())
        return [d for d in docs if isinstance(d, dict) and d.get("kind") == "Pod"]

    def bridges(self) -> list[str]:
        """Bridges the reference bridge plugin creates (and never deletes) for the demo networks."""
        names = []
        for path in [*(self.root / "primary.d").glob("*.conflist"), self.root / "manifests" / "networks.yaml"]:
            names += [w.strip('",') for w in path.read_text().replace(":", " ").split() if w.strip('",').startswith("metademo")]
        return sorted({n for n in names if n != MASTER})

    # --- the runtime's part -------------------------------------------------------------------------
    def exec_meta(self, command: str, env: dict[str, str]) -> dict[str, Any] | None:
        """Run meta-cni as libcni does: the plugin config with name and cniVersion injected on stdin."""
        lst = self.conflist()
        conf = dict(lst["plugins"][0], name=lst["name"], cniVersion=lst["cniVersion"])
        full = dict(os.environ, CNI_COMMAND=command, CNI_PATH=str(self.root / "bin"), **env)
        p = subprocess.run([str(self.root / "bin" / "meta-cni")], input=json.dumps(conf, sort_keys=True).encode(),
                           capture_output=True, env=full)
        if p.returncode != 0:
            raise RuntimeError(f"meta-cni {command} failed (rc {p.returncode}): {p.stdout.decode()} {p.stderr.decode()}")
        return json.loads(p.stdout) if p.stdout.strip() else None

    def add_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns_name = f"metademo-{meta['name']}"
        _sh("ip", "netns", "add", ns_name)
        self.netns.append(ns_name)
        env = {
            "CNI_CONTAINERID": ns_name, "CNI_NETNS": f"/var/run/netns/{ns_name}", "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={meta['namespace']};K8S_POD_NAME={meta['name']};"
                        f"K8S_POD_INFRA_CONTAINER_ID={ns_name};K8S_POD_UID={meta['uid']}",
        }
        result = self.exec_meta("ADD", env)
        self.added.append((ns_name, env))
        ifaces = [i["name"] for i in (result or {}).get("interfaces", []) if i.get("sandbox")]
        _say(f"ADD {meta['namespace']}/{meta['name']}: interfaces {', '.join(ifaces)}")

    def status(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        meta = pod["metadata"]
        path = self.root / "manifests" / "network-status" / f"{meta['namespace']}.{meta['name']}.json"
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    # --- proof --------------------------------------------------------------------------------------
    def ping_all(self, pods: list[dict[str, Any]]) -> int:
        """Ping from every pod to every other pod over each secondary network; the number that failed."""
        failures = 0
        statuses = {p["metadata"]["name"]: self.status(p) for p in pods}
        for src in pods:
            for dst in pods:
                if src is dst:
                    continue
                for entry in statuses[dst["metadata"]["name"]]:
                    if entry["default"] or not entry.get("ips"):
                        continue
                    own = next(e for e in statuses[src["metadata"]["name"]] if e["name"] == entry["name"])
                    ip = entry["ips"][0]
                    p = _sh("ip", "netns", "exec", f"metademo-{src['metadata']['name']}", "ping", "-c", "1", "-W", "2",
                            "-I", own["interface"], ip, check=False)
                    ok = p.returncode == 0
                    failures += not ok
                    _say(f"ping {src['metadata']['name']}:{own['interface']} -> {dst['metadata']['name']}:"
                         f"{entry['interface']} {ip} over {entry['name']}: {'ok' if ok else 'FAILED'}")
        return failures

    # --- tear-down ----------------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """DEL every pod, remove what the demo made; what is still left behind (should be nothing)."""
        if not self.installed:
            return []
        errors = []
        for ns_name, env in reversed(self.added):
            try:
                self.exec_meta("DEL", env)
                _say(f"DEL {ns_name}: ok")
            except RuntimeError as e:
                errors.append(str(e))
        self.added.clear()
        for ns_name in self.netns:
            _sh("ip", "netns", "del", ns_name, check=False)
        bridges = self.bridges() if self.root.exists() else []
        for link in [*bridges, MASTER]:
            _sh("ip", "link", "del", link, check=False)
        leftovers = self.leftovers(bridges)
        shutil.rmtree(self.root, ignore_errors=True)
        return errors + leftovers

    def leftovers(self, bridges: list[str]) -> list[str]:
        left = []
        netns = _sh("ip", "netns", "list").stdout
        left += [f"netns {n}" for n in self.netns if n in netns.split()]
        links = json.loads(_sh("ip", "-j", "link").stdout)
        left += [f"link {link['ifname']}" for link in links if link["ifname"].startswith("metademo")]
        ipam = self.root / "ipam"
        if ipam.exists():
            left += [f"address {p.parent.name}/{p.name}" for p in ipam.glob("*/*")
                     if not p.name.startswith(("last_reserved_ip", "lock"))]
        cache = self.root / "cache"
        if cache.exists():
            left += [f"cache {p}" for p in cache.glob("*/*/*.json")]  # per-attachment records
        status = self.root / "manifests" / "network-status"
        if status.exists():
            left += [f"status {p}" for p in status.iterdir()]
        return left


def run(samples: Path = SAMPLES) -> int:
    demo = Demo(samples=samples)
    failures = 0
    try:
        demo.install()
        _say(f"installed meta-cni: conf {demo.root / 'net.d'}, CNI path {demo.root / 'bin'} (meta-cni only: "
             f"bridge, macvlan and host-local run as meta-cni's built-ins, in-process)")
        pods = demo.pods()
        for pod in pods:
            demo.add_pod(pod)
        for pod in pods:
            meta = pod["metadata"]
            _say(f"\nnetwork-status of {meta['namespace']}/{meta['name']}:\n{json.dumps(demo.status(pod), indent=2)}")
        _say("")
        failures = demo.ping_all(pods)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        _say(f"demo failed: {e}")
        failures += 1
    finally:
        left = demo.teardown()
    for item in left:
        _say(f"left behind: {item}")
    ok = failures == 0 and not left
    _say("\ndemo " + ("passed: every secondary network carries traffic; nothing left behind" if ok else "FAILED"))
    return 0 if ok else 1
