"""The node daemon as a real subprocess (`metactl daemon`), driven through the exec'd `meta-cni` shim.

`DaemonScenario` is the integration tests' standalone setup with names of its own: bridges `mcdm…`,
macvlan masters `mcdmm…`, subnets inside 10.243.0.0/16; all deleted at teardown. `daemon` starts daemons on
a socket under tmp_path and kills whatever is still running at teardown.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta.daemon import protocol, spool
from tests.conftest import PluginRun, delete_host_link, host_third_octets, run_plugin
from tests.integration.conftest import Scenario

METACTL = Path(sys.prefix) / "bin" / "metactl"
SUPERNET = ipaddress.ip_network("10.243.0.0/16")
# Generous: a daemon on a loaded 2-core machine may take a while to import and bind. Not a timing assertion,
# only how long to wait before calling a start-up failed.
START_BUDGET = 120.0


class DaemonScenario(Scenario):
    def __init__(self, root: Path, meta_cni: Path, plugins: Path) -> None:
        super().__init__(root, meta_cni, plugins)
        self.socket = root / "run" / "daemon.sock"
        self.masters: list[str] = []

    def bridge_name(self) -> str:
        name = f"mcdm{uuid.uuid4().hex[:8]}"
        self.bridges.append(name)
        return name

    def subnet(self) -> ipaddress.IPv4Network:
        taken = self._octets | host_third_octets(SUPERNET)
        octet = random.choice([o for o in range(1, 255) if o not in taken])
        self._octets.add(octet)
        return ipaddress.IPv4Network(f"10.243.{octet}.0/24")

    def master(self) -> str:
        """An up veth pair on the host; its first end is a macvlan master."""
        name = f"mcdmm{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
        for n in (name, name + "p"):
            subprocess.run(["ip", "link", "set", n, "up"], check=True)
        self.masters.append(name)
        return name

    def three_networks(self, pods: tuple[str, ...] = ("p1",)) -> tuple[ipaddress.IPv4Network, ...]:
        """Primary: the reference bridge (exec'd). Secondaries: a built-in meta-bridge NAD `sec` and a
        built-in meta-macvlan NAD `mv` (in-process in the daemon); each pod selects both."""
        primary = self.write_primary()
        sec, mv = self.subnet(), self.subnet()
        self.add_nad("sec", {"type": "meta-bridge", "bridge": self.bridge_name(), "ipam": self.ipam(sec)})
        self.add_nad("mv", {"type": "meta-macvlan", "master": self.master(), "mode": "bridge", "ipam": self.ipam(mv)})
        for p in pods:
            self.add_pod("sec,mv", name=p)
        return primary, sec, mv

    def thick(self, **overrides: Any) -> dict[str, Any]:
        return self.config(daemonSocket=str(self.socket), **overrides)

    def spooled(self) -> list[Path]:
        return spool.pending(str(self.cni_dir))

    def cleanup(self) -> None:
        super().cleanup()
        for m in self.masters:
            delete_host_link(m)


@pytest.fixture
def dsc(tmp_path: Path, meta_cni: Path, reference_plugins: Path) -> Iterator[DaemonScenario]:
    assert os.geteuid() == 0, "daemon tests create network namespaces: run as root"
    sc = DaemonScenario(tmp_path, meta_cni, reference_plugins)
    yield sc
    sc.cleanup()


def unix_get(sock: Path, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    return protocol.exchange(str(sock), method, path, body)


def tcp_get(address: str, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    import http.client

    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series == name and not labels:
            return float(value)
        if not series.startswith(name + "{"):
            continue
        found = dict(kv.split("=", 1) for kv in series[len(name) + 1:-1].split(",") if kv)
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return 0.0


class Daemon:
    """One `metactl daemon` subprocess; restartable on the same socket."""

    def __init__(self, sock: Path, log: Path, args: list[str]) -> None:
        self.socket = sock
        self.log = log
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> "Daemon":
        cmd = [str(METACTL), "daemon", "--socket", str(self.socket), "--metrics-address", "127.0.0.1:0", *self.args]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self._wait(lambda: self._get_ok("/healthz"), "answer /healthz")
        if wait_ready:
            self.wait_ready()
        return self

    def _get_ok(self, path: str) -> bool:
        try:
            status, _ = unix_get(self.socket, path)
        except protocol.ExchangeError:
            return False
        return status == 200

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + START_BUDGET
        while not cond():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before it would {what}:\n{self.log_text()}")
            if time.monotonic() > end:
                raise AssertionError(f"daemon did not {what}:\n{self.log_text()}")
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self._wait(lambda: self._get_ok("/readyz"), "become ready")

    def get(self, path: str) -> tuple[int, bytes]:
        return unix_get(self.socket, path)

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def tcp_address(self) -> str:
        serving = [e for e in self.log_lines() if e.get("msg") == "serving"]
        return str(serving[-1]["metrics_address"])

    def stop(self) -> int:
        """SIGTERM and wait: the graceful shutdown."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=START_BUDGET)
        self.proc = None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=START_BUDGET)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def daemon(dsc: DaemonScenario, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """`daemon(*extra_args)`: a started (and ready) daemon for `dsc`, told to replay its cniDir (or `cni_dir`)."""
    made: list[Daemon] = []

    def make(*args: str, start: bool = True, cni_dir: Path | None = None) -> Daemon:
        replay = ["--cni-dir", str(cni_dir or dsc.cni_dir)]
        d = Daemon(dsc.socket, tmp_path / f"daemon{len(made)}.log", [*replay, *args])
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        if d.running:
            d.kill()


def run_thick(sc: DaemonScenario, command: str, container_id: str = "", netns: str = "", *, binary: Path | None = None,
              config: dict[str, Any] | None = None, cni_args: str | None = None, ifname: str = "eth0",
              extra_env: dict[str, str] | None = None) -> PluginRun:
    """Exec the shim exactly as a runtime does, with the thick config."""
    return run_plugin(binary or sc.meta_cni, command, config or sc.thick(), container_id=container_id, netns=netns,
                      ifname=ifname, cni_args=sc.pod_args() if cni_args is None else cni_args, path=str(sc.plugins),
                      extra_env=extra_env)
