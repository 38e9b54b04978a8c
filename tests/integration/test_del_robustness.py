"""DEL that fails half-way is retried until everything is released; a crash mid-ADD leaks nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import links_in
from tests.integration.conftest import Scenario

# A chained plugin that passes prevResult through on ADD; DEL fails while `<dir>/fail-del` exists,
# ADD sleeps while `<dir>/slow-add` exists (so a test can kill meta-cni in the middle).
FAKE = """#!/usr/bin/env python3
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
if cmd == "ADD":
    while os.path.exists(os.path.join(here, "slow-add")):
        time.sleep(0.05)
    print(json.dumps(conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}))
elif cmd == "DEL" and os.path.exists(os.path.join(here, "fail-del")):
    print(json.dumps({"code": 11, "msg": "device busy, try again"}))
    sys.exit(1)
"""


def fake_plugin(root: Path) -> Path:
    bin_dir = root / "bin"
    bin_dir.mkdir()
    p = bin_dir / "flaky"
    p.write_text(FAKE)
    p.chmod(0o755)
    return bin_dir


def test_failed_del_keeps_cache_and_retry_releases_everything(scenario: Scenario,
                                                              netns_factory: Callable[[], str]) -> None:
    bin_dir = fake_plugin(scenario.root)
    scenario.write_primary()
    scenario.add_nad("chained", {"name": "chained", "plugins": [scenario.bridge_plugin(scenario.subnet()), {"type": "flaky"}]})
    scenario.add_pod("chained")
    ns = netns_factory()
    assert scenario.add("c1", ns, binDir=str(bin_dir)).rc == 0
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1"]

    (bin_dir / "fail-del").touch()
    failed = scenario.delete("c1", ns, binDir=str(bin_dir))
    assert failed.rc == 1
    err = failed.json
    assert err["code"] == 11 and "default/chained (net1)" in err["msg"] and "flaky DEL" in err["msg"]
    # DEL went on past the failing plugin: the bridge and the primary released their part...
    assert sorted(links_in(ns)) == ["lo"]
    assert scenario.reserved_ips() == []
    # ...but the record stays so that the runtime's retry reaches the plugin that failed.
    assert scenario.cache_path("c1").exists()

    (bin_dir / "fail-del").unlink()
    assert scenario.delete("c1", ns, binDir=str(bin_dir)).rc == 0
    scenario.assert_nothing_left("c1", ns)


def test_crash_in_the_middle_of_add_then_del_leaks_nothing(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    bin_dir = fake_plugin(scenario.root)
    scenario.write_primary()
    scenario.add_nad("fast", scenario.bridge_plugin(scenario.subnet()))
    scenario.add_nad("slow", {"name": "slow", "plugins": [scenario.bridge_plugin(scenario.subnet()), {"type": "flaky"}]})
    scenario.add_pod("fast, slow")
    ns = netns_factory()
    (bin_dir / "slow-add").touch()
    env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID="c1", CNI_NETNS=ns, CNI_IFNAME="eth0",
               CNI_ARGS=scenario.pod_args(), CNI_PATH=str(scenario.plugins))
    proc = subprocess.Popen([str(scenario.meta_cni)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(scenario.config(binDir=str(bin_dir))).encode())
    proc.stdin.close()
    # Wait until eth0 and net1 are attached and the third network's chain is stuck in `flaky`.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if scenario.cache_path("c1").exists() and "net2" in links_in(ns):
            results = [a["result"] for a in scenario.cache_record("c1")["attachments"]]
            if results[0] and results[1] and results[2] is None:
                break
        time.sleep(0.05)
    else:
        raise AssertionError("meta-cni never reached the third attachment")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-KILL", "-f", str(bin_dir / "flaky")])
    (bin_dir / "slow-add").unlink()
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2"]

    assert scenario.delete("c1", ns, binDir=str(bin_dir)).rc == 0
    scenario.assert_nothing_left("c1", ns)
