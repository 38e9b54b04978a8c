"""The daemon (thick mode) against thin mode, over real network namespaces: same answers, no leaks when the
daemon is down, killed or overloaded."""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meta.daemon import protocol, spool
from tests.conftest import PluginRun, links_in
from tests.daemon.conftest import Daemon, DaemonScenario, metric, run_thick, tcp_get, unix_get

pytestmark = pytest.mark.integration


def cid() -> str:
    return f"mcdm-{uuid.uuid4().hex[:12]}"


def ok(r: PluginRun) -> Any:
    assert r.rc == 0, f"rc={r.rc} stdout={r.stdout} stderr={r.stderr}"
    return r.json


def cni_error(r: PluginRun) -> dict[str, Any]:
    assert r.rc == 1, f"rc={r.rc} stdout={r.stdout} stderr={r.stderr}"
    data: dict[str, Any] = r.json
    assert isinstance(data, dict) and isinstance(data.get("code"), int), r.stdout
    return data


def normalized(result: Any) -> Any:
    """A result with what differs between two pods made alike replaced: MACs, addresses (by their subnet),
    the netns path, the random name of a host veth."""
    out = copy.deepcopy(result)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "sandbox" not in node and str(node.get("name", "")).startswith("veth"):
                node["name"] = "<veth>"
            for k, v in node.items():
                if k == "mac":
                    node[k] = "<mac>"
                elif k == "sandbox":
                    node[k] = "<netns>"
                elif k == "address":
                    node[k] = str(ipaddress.ip_interface(v).network)
                elif k == "ips" and all(isinstance(a, str) for a in v):  # network-status: bare addresses
                    node[k] = ["<ip>"] * len(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        return node

    return walk(out)


def assert_clean(sc: DaemonScenario, container_id: str, ns: str, name: str = "p1") -> None:
    sc.assert_nothing_left(container_id, ns, name=name)
    assert sc.spooled() == [], "a spooled DEL was left behind"


def test_add_check_del_same_as_thin(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                    netns_factory: Callable[[], str]) -> None:
    sc = dsc
    sc.three_networks()
    d = daemon()

    # Thin mode first: the reference answer.
    ns1, c1 = netns_factory(), cid()
    thin = ok(sc.add(c1, ns1))
    thin_status = sc.status()
    assert ok(sc.run("CHECK", c1, ns1)) is None
    assert ok(sc.delete(c1, ns1)) is None
    assert_clean(sc, c1, ns1)

    ns2, c2 = netns_factory(), cid()
    r = run_thick(sc, "ADD", c2, ns2)
    thick = ok(r)
    assert normalized(thick) == normalized(thin)
    assert sorted(links_in(ns2)) == ["eth0", "lo", "net1", "net2"]
    assert [i["name"] for i in thick["interfaces"] if i.get("sandbox")] == ["eth0", "net1", "net2"]
    assert all(i["sandbox"] == ns2 for i in thick["interfaces"] if i.get("sandbox"))
    assert normalized(sc.status()) == normalized(thin_status)
    assert ok(run_thick(sc, "CHECK", c2, ns2)) is None
    assert ok(run_thick(sc, "DEL", c2, ns2)) is None
    assert_clean(sc, c2, ns2)
    # DEL again: idempotent through the daemon as in thin mode.
    assert ok(run_thick(sc, "DEL", c2, ns2)) is None

    m = d.metrics()
    for command in ("ADD", "CHECK"):
        assert metric(m, "meta_cni_requests_total", command=command, result="ok") == 1
    assert metric(m, "meta_cni_requests_total", command="DEL", result="ok") == 2
    assert metric(m, "meta_cni_request_duration_seconds_count", command="ADD", result="ok") == 1
    for plugin in ("bridge", "meta-bridge", "meta-macvlan"):
        assert metric(m, "meta_cni_delegate_duration_seconds_count", plugin=plugin, command="ADD", result="ok") == 1
        assert metric(m, "meta_cni_delegate_duration_seconds_count", plugin=plugin, command="DEL", result="ok") == 1
    assert metric(m, "meta_cni_requests_in_flight") == 0

    # Structured logs: one JSON object per line, the served requests with their context.
    served = [e for e in d.log_lines() if e.get("msg") == "request served"]
    add = next(e for e in served if e["command"] == "ADD")
    assert add["containerID"] == c2 and add["pod"] == "default/p1" and add["result"] == "ok"
    assert add["level"] == "info" and isinstance(add["duration_ms"], float) and add["time"].endswith("Z")


def test_errors_come_back_unchanged(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                    netns_factory: Callable[[], str]) -> None:
    sc = dsc
    sc.write_primary()
    sc.add_pod("missing-nad", name="p2")
    daemon()
    ns = netns_factory()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("ADD", {}),                                   # the pod selects a NAD that does not exist
        ("ADD", {"noSuchKey": 1}),                     # invalid config
        ("CHECK", {}),                                 # nothing was added
        ("ADD", {"clusterNetwork": "nope"}),           # unresolvable cluster network
    ]
    for command, extra in cases:
        c = cid()
        thin = sc.run(command, c, ns, cni_args=sc.pod_args("p2"), config=sc.config(**extra))
        thick = run_thick(sc, command, c, ns, cni_args=sc.pod_args("p2"), config=sc.thick(**extra))
        assert cni_error(thick) == cni_error(thin)
        assert thick.stdout == thin.stdout, "the daemon's answer is printed unchanged"
        assert sorted(links_in(ns)) == ["lo"]
    # A version the daemon refuses: decided by the daemon from the exact stdin bytes, same answer.
    c = cid()
    thin = sc.run("ADD", c, ns, config=sc.config(cni_version="9.9.9"))
    thick = run_thick(sc, "ADD", c, ns, config=sc.thick(cni_version="9.9.9"))
    assert cni_error(thick)["code"] == 1 and thick.stdout == thin.stdout


def test_unreachable_daemon(dsc: DaemonScenario, netns_factory: Callable[[], str]) -> None:
    sc = dsc
    sc.three_networks()
    ns, c = netns_factory(), cid()
    sc.socket.parent.mkdir()

    def attempt() -> None:
        err = cni_error(run_thick(sc, "ADD", c, ns))
        assert err["code"] == 11 and str(sc.socket) in err["msg"] and "secondary networks" in err["msg"]
        assert_clean(sc, c, ns)
        assert cni_error(run_thick(sc, "CHECK", c, ns))["code"] == 11
        v11 = sc.thick(cni_version="1.1.0")
        assert cni_error(run_thick(sc, "STATUS", config=v11, cni_args=""))["code"] == 50
        assert cni_error(run_thick(sc, "GC", config=v11, cni_args=""))["code"] == 11

    attempt()  # no socket at all
    # A socket nobody listens on (a daemon that died without cleaning up): connection refused.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sc.socket))
    s.close()
    attempt()


def test_del_while_down_is_spooled_and_replayed(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                netns_factory: Callable[[], str]) -> None:
    sc = dsc
    sc.three_networks()
    d = daemon()
    ns, c = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c, ns))
    assert d.stop() == 0
    assert not sc.socket.exists(), "a graceful stop removes its socket"

    r = run_thick(sc, "DEL", c, ns)
    assert ok(r) is None and r.stdout == ""
    (pending,) = sc.spooled()
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600 and stat.S_IMODE(pending.parent.stat().st_mode) == 0o700
    env, stdin = protocol.decode_request(pending.read_bytes())
    assert env["CNI_COMMAND"] == "DEL" and env["CNI_CONTAINERID"] == c and json.loads(stdin) == sc.thick()
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"], "nothing is deleted until the daemon is back"
    assert len(sc.reserved_ips()) == 3

    d2 = daemon()  # ready means: the spooled DELs were replayed
    assert_clean(sc, c, ns)
    assert metric(d2.metrics(), "meta_cni_pending_del_replays_total", result="ok") == 1
    assert metric(d2.metrics(), "meta_cni_pending_dels") == 0


def test_spooled_del_under_a_cni_dir_only_the_config_names(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                          netns_factory: Callable[[], str], tmp_path: Path) -> None:
    """The daemon is not told about the config's cniDir: it remembers it from the ADD, across a restart."""
    sc = dsc
    sc.three_networks()
    elsewhere = tmp_path / "daemon-state"
    d = daemon(cni_dir=elsewhere)
    ns, c = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c, ns))
    d.stop()
    ok(run_thick(sc, "DEL", c, ns))
    assert len(sc.spooled()) == 1
    daemon(cni_dir=elsewhere)
    assert_clean(sc, c, ns)


def test_spooled_del_of_a_gone_netns_is_replayed(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                 netns_factory: Callable[[], str]) -> None:
    """The runtime removes the netns right after DEL: the replay works from the cache alone."""
    sc = dsc
    sc.three_networks()
    d = daemon()
    ns, c = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c, ns))
    d.stop()
    ok(run_thick(sc, "DEL", c, ns))
    subprocess.run(["ip", "netns", "del", Path(ns).name], check=True)
    daemon()
    assert sc.reserved_ips() == [] and not sc.cache_path(c).exists() and sc.spooled() == []


def test_add_after_spooled_del_of_same_attachment(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                  netns_factory: Callable[[], str]) -> None:
    """A DEL spooled for an attachment (the shim found no daemon, after the start-up pass had run) is done
    before a later ADD of the same attachment, never after it: the ADD then starts from a clean slate."""
    sc = dsc
    sc.three_networks()
    daemon("--replay-interval", "3600")
    ns, c = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c, ns))
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": c, "CNI_NETNS": ns, "CNI_IFNAME": "eth0",
           "CNI_ARGS": sc.pod_args(), "CNI_PATH": str(sc.plugins)}
    spool.write(env, json.dumps(sc.thick()).encode(), sc.thick())
    assert len(sc.spooled()) == 1
    ok(run_thick(sc, "ADD", c, ns))
    assert sc.spooled() == []
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"]
    assert len(sc.reserved_ips()) == 3, "the first ADD's addresses were released by the replayed DEL"
    ok(run_thick(sc, "DEL", c, ns))
    assert_clean(sc, c, ns)


def test_sigkill_after_add_then_del(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                    netns_factory: Callable[[], str]) -> None:
    sc = dsc
    sc.three_networks()
    d = daemon()
    ns, c = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c, ns))
    d.kill()
    assert sc.socket.exists(), "SIGKILL leaves a stale socket"
    d2 = daemon()  # replaces the stale socket
    ok(run_thick(sc, "CHECK", c, ns))
    ok(run_thick(sc, "DEL", c, ns))
    assert_clean(sc, c, ns)
    assert stat.S_IMODE(sc.socket.stat().st_mode) == 0o600
    assert d2.running


def test_concurrent_adds_beyond_the_bound(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                          netns_factory: Callable[[], str]) -> None:
    sc = dsc
    pods = tuple(f"p{i}" for i in range(4))
    sc.three_networks(pods)
    d = daemon("--max-concurrent", "1", "--max-wait", "0")
    attempts = [(p, netns_factory(), cid()) for p in pods]
    results: dict[str, PluginRun] = {}

    def add(pod: str, ns: str, c: str) -> None:
        results[pod] = run_thick(sc, "ADD", c, ns, cni_args=sc.pod_args(pod))

    threads = [threading.Thread(target=add, args=a) for a in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = 0
    for pod, ns, c in attempts:
        r = results[pod]
        if r.rc == 0:
            assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"]
        else:
            err = cni_error(r)
            assert err["code"] == 11 and "busy" in err["msg"], err
            assert sorted(links_in(ns)) == ["lo"] and not sc.cache_path(c).exists()
            refused += 1
    assert refused < len(pods), "the first request always gets the free slot"
    assert metric(d.metrics(), "meta_cni_requests_total", command="ADD", result="11") == refused
    for pod, ns, c in attempts:
        ok(run_thick(sc, "DEL", c, ns, cni_args=sc.pod_args(pod)))
        assert sorted(links_in(ns)) == ["lo"] and not sc.cache_path(c).exists()
    assert sc.reserved_ips() == []


def test_health_ready_metrics(dsc: DaemonScenario, daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    tcp = d.tcp_address()

    def over_tcp(path: str) -> tuple[int, bytes]:
        return tcp_get(tcp, path)

    getters: list[Callable[[str], tuple[int, bytes]]] = [d.get, over_tcp]
    for get in getters:
        status, body = get("/healthz")
        assert status == 200
        status, body = get("/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "reasons": []}
        status, body = get("/metrics")
        text = body.decode()
        assert status == 200
        for name in ("meta_cni_requests_in_flight", "meta_cni_requests_waiting", "meta_cni_pending_dels",
                     "meta_cni_ready", "process_resident_memory_bytes"):
            assert f"\n{name} " in text or text.startswith(f"{name} ") or f"# TYPE {name} " in text, name
        assert metric(text, "meta_cni_ready") == 1
        assert get("/nope")[0] == 404
    # CNI requests only over the root-only socket, never over TCP.
    body = protocol.encode_request({"CNI_COMMAND": "STATUS"}, b"{}")
    assert tcp_get(tcp, protocol.CNI, "POST", body)[0] == 404
    # A request the daemon cannot read is answered with a CNI error structure.
    status, raw = unix_get(dsc.socket, protocol.CNI, "POST", b"not json")
    rc, out = protocol.decode_answer(raw)
    assert status == 400 and rc == 1 and json.loads(out)["code"] == 6
    assert d.stop() == 0


def test_installed_zipapp_shim(dsc: DaemonScenario, daemon: Callable[..., Daemon], netns_factory: Callable[[], str],
                               tmp_path: Path) -> None:
    """`metactl install` output run by the system python3 (no venv): VERSION locally, ADD/DEL via the daemon."""
    sc = dsc
    sc.three_networks()
    conf = tmp_path / "00-meta.conflist"
    conf.write_text(json.dumps({"cniVersion": "1.0.0", "name": "meta", "plugins": [sc.thick()]}))
    bin_dir, conf_dir = tmp_path / "host-bin", tmp_path / "host-net.d"
    subprocess.run([str(Path(sc.meta_cni).parent / "metactl"), "install", "--bin-dir", str(bin_dir), "--conf-dir",
                    str(conf_dir), "--config", str(conf)], check=True, capture_output=True)
    shim = bin_dir / "meta-cni"
    assert (conf_dir / conf.name).read_bytes() == conf.read_bytes()
    clean_env = {"PATH": "/usr/bin:/bin"}  # `#!/usr/bin/env python3` finds the system interpreter only

    v = subprocess.run(["/usr/bin/python3", str(shim)], input=b'{"cniVersion":"1.0.0"}', capture_output=True,
                       env={**clean_env, "CNI_COMMAND": "VERSION"})
    assert v.returncode == 0 and json.loads(v.stdout)["cniVersion"] == "1.0.0"

    daemon()
    ns, c = netns_factory(), cid()
    r = run_thick(sc, "ADD", c, ns, binary=shim, extra_env=clean_env)
    res = ok(r)
    assert [i["name"] for i in res["interfaces"] if i.get("sandbox")] == ["eth0", "net1", "net2"]
    ok(run_thick(sc, "CHECK", c, ns, binary=shim, extra_env=clean_env))
    ok(run_thick(sc, "DEL", c, ns, binary=shim, extra_env=clean_env))
    assert_clean(sc, c, ns)


def _all_built_in(sc: DaemonScenario) -> None:
    """Two secondaries whose plugins and IPAM are all built in: the kind an attachment worker can make."""
    sc.write_primary()
    in_process = {"type": "meta-host-local", "dataDir": str(sc.data_dir)}
    sc.add_nad("bi-br", {"type": "meta-bridge", "bridge": sc.bridge_name(), "ipam": {**in_process, "subnet": str(sc.subnet())}})
    sc.add_nad("bi-mv", {"type": "meta-macvlan", "master": sc.master(), "mode": "bridge",
                         "ipam": {**in_process, "subnet": str(sc.subnet())}})
    sc.add_pod("bi-br,bi-mv")


def _worker_pids(d: Daemon) -> set[int]:
    out = subprocess.run(["pgrep", "-f", "multiprocessing.forkserver"], capture_output=True, text=True).stdout.split()
    servers = [int(p) for p in out if _parent(int(p)) == d.proc.pid]
    return {pid for server in servers for pid in _children(server)}


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_built_in_secondaries_are_made_side_by_side_in_workers(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                               netns_factory: Callable[[], str]) -> None:
    sc = dsc
    _all_built_in(sc)
    d = daemon()
    workers = _worker_pids(d)
    assert len(workers) == 2, "two attachment workers by default, forked from the daemon's fork server"
    ns, c = netns_factory(), cid()
    added = ok(run_thick(sc, "ADD", c, ns))
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"]
    assert [i["name"] for i in added["interfaces"] if i.get("sandbox")] == ["eth0", "net1", "net2"]
    assert [e["interface"] for e in sc.status()] == ["eth0", "net1", "net2"]
    m = d.metrics()
    assert metric(m, "meta_cni_worker_attachments_total", result="ok") == 1, "one secondary made by a worker"
    for plugin in ("meta-bridge", "meta-macvlan"):
        assert metric(m, "meta_cni_delegate_duration_seconds_count", plugin=plugin, command="ADD", result="ok") == 1, \
            "a worker's delegate calls reach the daemon's metrics"
    assert ok(run_thick(sc, "DEL", c, ns)) is None
    assert_clean(sc, c, ns)

    # Workers that died while idle: the request makes those attachments itself, and they are replaced.
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    ns2, c2 = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c2, ns2))
    assert sorted(links_in(ns2)) == ["eth0", "lo", "net1", "net2"]
    assert ok(run_thick(sc, "DEL", c2, ns2)) is None
    assert_clean(sc, c2, ns2)
    deadline = time.monotonic() + 30
    while len(_worker_pids(d) - workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_worker_pids(d) - workers) == 2, "fresh workers took the dead ones' places"


def test_without_workers_every_attachment_is_made_in_the_request(dsc: DaemonScenario, daemon: Callable[..., Daemon],
                                                                 netns_factory: Callable[[], str]) -> None:
    sc = dsc
    _all_built_in(sc)
    d = daemon("--attach-workers", "0")
    assert _worker_pids(d) == set()
    ns, c = netns_factory(), cid()
    ok(run_thick(sc, "ADD", c, ns))
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"]
    assert metric(d.metrics(), "meta_cni_worker_attachments_total", result="ok") == 0
    assert ok(run_thick(sc, "DEL", c, ns)) is None
    assert_clean(sc, c, ns)
