"""Secondary attachments made side by side (parallelAttachments, the default) or one by one: same pod,
same order in the status, and a failure in the middle undoes everything either way."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import links_in
from tests.integration.conftest import Scenario


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_four_secondaries_keep_their_order(scenario: Scenario, netns_factory: Callable[[], str], parallel: bool) -> None:
    scenario.write_primary()
    names = [f"n{i}" for i in range(4)]
    for n in names:
        scenario.add_nad(n, scenario.bridge_plugin(scenario.subnet()))
    scenario.add_pod(", ".join(names))
    ns = netns_factory()
    r = scenario.add("c1", ns, parallelAttachments=parallel)
    assert r.rc == 0, r.stdout
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2", "net3", "net4"]
    assert [(e["name"], e["interface"]) for e in scenario.status()] == \
        [("primary", "eth0")] + [(f"default/{n}", f"net{i + 1}") for i, n in enumerate(names)]
    assert [i["name"] for i in r.json["interfaces"] if i.get("sandbox")] == ["eth0", "net1", "net2", "net3", "net4"]
    assert scenario.delete("c1", ns, parallelAttachments=parallel).rc == 0
    scenario.assert_nothing_left("c1", ns)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_failure_among_secondaries_undoes_all(scenario: Scenario, netns_factory: Callable[[], str], parallel: bool) -> None:
    scenario.write_primary()
    scenario.add_nad("ok1", scenario.bridge_plugin(scenario.subnet()))
    scenario.add_nad("broken", {"type": "macvlan", "master": "mcitm-nosuch", "ipam": scenario.ipam(scenario.subnet())})
    scenario.add_nad("ok2", scenario.bridge_plugin(scenario.subnet()))
    scenario.add_pod("ok1, broken, ok2")
    ns = netns_factory()
    r = scenario.add("c1", ns, parallelAttachments=parallel)
    assert r.rc == 1
    assert "default/broken (net2)" in r.json["msg"]
    scenario.assert_nothing_left("c1", ns)
    assert scenario.delete("c1", ns, parallelAttachments=parallel).rc == 0


def _in_process(plugin: dict[str, Any]) -> dict[str, Any]:
    """The same network made by the built-ins, IPAM included, so it runs in meta-cni's own thread."""
    return {**plugin, "type": f"meta-{plugin['type']}", "ipam": {**plugin["ipam"], "type": "meta-host-local"}}


@pytest.mark.parametrize("broken_in_process", [True, False], ids=["broken-in-process", "broken-execd"])
def test_mixed_in_process_and_execd_failure_undoes_all(scenario: Scenario, netns_factory: Callable[[], str],
                                                       broken_in_process: bool) -> None:
    """In-process attachments run in the calling thread while exec'd ones run side by side: a failure on
    either side still undoes every attachment, and the error names the first failing one by order."""
    scenario.write_primary()
    scenario.add_nad("inproc", _in_process(scenario.bridge_plugin(scenario.subnet())))
    broken = {"type": "macvlan", "master": "mcitm-nosuch", "ipam": scenario.ipam(scenario.subnet())}
    scenario.add_nad("broken", _in_process(broken) if broken_in_process else broken)
    scenario.add_nad("execd1", scenario.bridge_plugin(scenario.subnet()))
    scenario.add_nad("execd2", scenario.bridge_plugin(scenario.subnet()))
    scenario.add_pod("inproc, broken, execd1, execd2")
    ns = netns_factory()
    r = scenario.add("c1", ns)
    assert r.rc == 1
    assert "default/broken (net2)" in r.json["msg"]
    scenario.assert_nothing_left("c1", ns)
    assert scenario.delete("c1", ns).rc == 0


def test_mixed_in_process_and_execd_keep_their_order(scenario: Scenario, netns_factory: Callable[[], str]) -> None:
    scenario.write_primary()
    plugins = [_in_process(scenario.bridge_plugin(scenario.subnet())), scenario.bridge_plugin(scenario.subnet()),
               _in_process(scenario.bridge_plugin(scenario.subnet())), scenario.bridge_plugin(scenario.subnet())]
    names = [f"m{i}" for i in range(4)]
    for n, p in zip(names, plugins):
        scenario.add_nad(n, p)
    scenario.add_pod(", ".join(names))
    ns = netns_factory()
    r = scenario.add("c1", ns)
    assert r.rc == 0, r.stdout
    assert sorted(links_in(ns)) == ["eth0", "lo", "net1", "net2", "net3", "net4"]
    assert [(e["name"], e["interface"]) for e in scenario.status()] == \
        [("primary", "eth0")] + [(f"default/{n}", f"net{i + 1}") for i, n in enumerate(names)]
    assert scenario.delete("c1", ns).rc == 0
    scenario.assert_nothing_left("c1", ns)
