"""The built-in host-local IPAM against the reference host-local: same answers, same store on disk, and
the two sharing one store without handing out an address twice."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REFERENCE_PLUGINS, PluginRun, run_plugin

pytestmark = pytest.mark.integration

OURS = Path(sys.prefix) / "bin" / "meta-host-local"
GO = REFERENCE_PLUGINS / "host-local"

# (command, container ID, CNI_ARGS, extra config) steps; each scenario runs on a fresh store per implementation.
Step = tuple[str, str, str, dict[str, Any]]
DUAL = {"ranges": [[{"subnet": "10.9.0.0/29"}], [{"subnet": "fd00:9::/125"}]], "routes": [{"dst": "0.0.0.0/0"}]}
GATEWAY_OUTSIDE: Step = ("ADD", "c1", "", {"ipam": {"type": "host-local", "subnet": "10.9.5.0/24", "gateway": "10.9.6.1"}})
# Where ours answers differently on purpose (delegates/host_local.py docstring): 1.1.1 accepts a gateway
# outside the subnet, current upstream and ours refuse it.
DELIBERATE: list[tuple[Step, Any]] = [
    (GATEWAY_OUTSIDE, (1, {"code": 999, "msg": "invalid range set 0: gateway 10.9.6.1 not in network 10.9.5.0/24"})),
]


SCENARIOS: dict[str, tuple[dict[str, Any], list[Step]]] = {
    "v4 shorthand, exhaustion, round robin after release": (
        {"subnet": "10.9.1.0/29", "gateway": "10.9.1.6"},
        [("ADD", f"c{i}", "", {}) for i in range(7)] + [("DEL", "c2", "", {}), ("ADD", "c8", "", {}), ("ADD", "c9", "", {})],
    ),
    "dual stack, duplicate ADD, DEL, CHECK": (
        DUAL,
        [("ADD", "c1", "", {}), ("ADD", "c2", "", {}), ("ADD", "c1", "", {}), ("CHECK", "c1", "", {}),
         ("DEL", "c1", "", {}), ("CHECK", "c1", "", {}), ("DEL", "c1", "", {}), ("ADD", "c3", "", {})],
    ),
    "requested addresses": (
        DUAL,
        [("ADD", "c1", "IP=10.9.0.1", {}), ("ADD", "c1", "IP=10.9.0.4", {}), ("ADD", "c2", "IP=10.9.0.4", {}),
         ("ADD", "c3", "IP=10.9.0.77", {}), ("ADD", "c4", "K8S_POD_NAME=p;IP=10.9.0.5", {}),
         ("ADD", "c5", "IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.9.0.5", {}),
         ("ADD", "c6", "", {"args": {"cni": {"ips": ["fd00:9::6", "10.9.0.6"]}}}),
         ("ADD", "c7", "", {"runtimeConfig": {"ips": ["10.9.0.3/29"]}})],
    ),
    "ranges with start, end and several subnets in one set": (
        {"ranges": [[{"subnet": "10.9.2.0/24", "rangeStart": "10.9.2.250", "rangeEnd": "10.9.2.251"},
                     {"subnet": "10.9.3.0/30"}]], "resolvConf": "@RESOLV@"},
        [("ADD", f"c{i}", "", {}) for i in range(5)] + [("DEL", "c0", "", {}), ("ADD", "c5", "", {})],
    ),
    "invalid configs": (
        {"ranges": [[{"subnet": "10.9.4.0/24"}], [{"subnet": "10.9.4.128/25"}]]},
        [("ADD", "c1", "", {}), ("ADD", "c1", "", {"ipam": {"type": "host-local", "subnet": "10.9.5.0/31"}}),
         GATEWAY_OUTSIDE,
         ("ADD", "c1", "", {"ipam": {"type": "host-local", "subnet": "10.9.5.0/24", "rangeStart": "10.9.6.1"}}),
         ("ADD", "c1", "", {"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.9.5.0/24"}, {"subnet": "fd00::/64"}]]}}),
         ("ADD", "c1", "", {"ipam": {"type": "host-local"}}), ("DEL", "c1", "", {"ipam": {"type": "host-local"}})],
    ),
}


def normalised(run: PluginRun) -> Any:
    """The answer with what is different on purpose taken out: errors carry our cniVersion, and an empty
    `dns` is left out of our results (README, "Kept different on purpose")."""
    out = run.json
    if isinstance(out, dict):
        if "code" in out:
            out.pop("cniVersion", None)
        if out.get("dns") == {}:
            out.pop("dns")
    return (run.rc, out)


def store_state(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): (b"" if p.name == "lock" else p.read_bytes())
            for p in sorted(data_dir.rglob("*")) if p.is_file()}


def play(binary: Path, base: dict[str, Any], steps: list[Step], data_dir: Path, netns: str, resolv: Path) -> list[Any]:
    answers = []
    for command, cid, cni_args, extra in steps:
        ipam = json.loads(json.dumps(dict(base, type="host-local", dataDir=str(data_dir))).replace("@RESOLV@", str(resolv)))
        conf = {"cniVersion": "1.0.0", "name": "hl", "ipam": ipam} | extra
        if "ipam" in extra:
            conf["ipam"] = dict(extra["ipam"], dataDir=str(data_dir))
        answers.append(normalised(run_plugin(binary, command, conf, container_id=cid, netns=netns, ifname="eth0",
                                             cni_args=cni_args)))
    return answers


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_same_answers_and_store_as_reference(scenario: str, tmp_path: Path, netns_factory: Callable[[], str]) -> None:
    base, steps = SCENARIOS[scenario]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 10.0.0.53\nnameserver fd00::53\nsearch a.example b.example\n"
                      "domain example\noptions ndots:2 edns0\n")
    netns = netns_factory()
    go = play(GO, base, steps, tmp_path / "go", netns, resolv)
    ours = play(OURS, base, steps, tmp_path / "ours", netns, resolv)
    kept_apart = False
    for step, g, o in zip(steps, go, ours):
        deliberate = [answer for kept, answer in DELIBERATE if kept == step]
        if deliberate:
            assert g[0] == 0 and o == deliberate[0], f"step {step}"
            kept_apart = True  # the reference reserved an address that we refused
            continue
        assert o == g, f"step {step}"
    if not kept_apart:
        assert store_state(tmp_path / "ours") == store_state(tmp_path / "go")
    assert any(rc == 0 for rc, _ in go) and (scenario == "invalid configs" or any(rc != 0 for rc, _ in go))


def test_shared_store_interleaved_and_concurrent(tmp_path: Path, netns_factory: Callable[[], str]) -> None:
    """Ours and the Go plugin on one store, one after the other and then 24 at once: every address is
    handed out once, each is released by whichever plugin DELs it, and nothing is left."""
    netns = netns_factory()
    conf = {"cniVersion": "1.0.0", "name": "shared",
            "ipam": {"type": "host-local", "subnet": "10.9.8.0/26", "dataDir": str(tmp_path)}}
    binaries = [GO, OURS]

    def add(i: int) -> str:
        run = run_plugin(binaries[i % 2], "ADD", conf, container_id=f"c{i}", netns=netns, ifname="eth0")
        assert run.rc == 0, run.stdout
        return str(run.json["ips"][0]["address"])

    first = [add(i) for i in range(4)]
    assert first == [f"10.9.8.{n}/26" for n in range(2, 6)]  # one round robin, whoever reserved last
    with ThreadPoolExecutor(max_workers=8) as pool:
        rest = list(pool.map(add, range(4, 28)))
    assert len(set(first + rest)) == 28
    for i in range(28):
        run = run_plugin(binaries[(i + 1) % 2], "DEL", conf, container_id=f"c{i}", netns=netns, ifname="eth0")
        assert run.rc == 0, run.stdout
    left = [p.name for p in (tmp_path / "shared").iterdir()]
    assert sorted(left) == ["last_reserved_ip.0", "lock"]


def test_meta_cni_runs_host_local_in_process(tmp_path: Path) -> None:
    """With builtinStandardTypes a built-in delegate's `host-local` IPAM runs in the same process: the
    invoker handed to the delegate resolves it to the built-in module, never to an exec."""
    from meta.invoke import Invocation
    from meta.invoke.builtin import BuiltinInvoker

    class NoExec:
        def run(self, plugin_type: str, stdin: bytes, inv: Invocation) -> bytes:
            raise AssertionError(f"{plugin_type} was exec'd")

    conf = {"cniVersion": "1.0.0", "name": "inproc",
            "ipam": {"type": "host-local", "subnet": "10.9.9.0/24", "dataDir": str(tmp_path)}}
    inv = Invocation(command="ADD", container_id="c1", netns=f"/proc/{os.getpid()}/ns/net", ifname="eth0",
                     cni_args="", path=(), where="test")
    out = json.loads(BuiltinInvoker(NoExec(), standard_types=True).run("host-local", json.dumps(conf).encode(), inv))
    assert out["ips"][0]["address"] == "10.9.9.2/24"
    assert (tmp_path / "inproc" / "10.9.9.2").read_bytes() == b"c1\r\neth0"
    with pytest.raises(AssertionError, match="host-local was exec'd"):
        BuiltinInvoker(NoExec(), standard_types=False).run("host-local", json.dumps(conf).encode(), inv)
