"""Running one delegate conflist (meta/invoke/chain.py) over a fake Invoker."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from meta.cni import result as cniresult
from meta.cni.errors import DECODE_FAILURE, DELEGATE_FAILED, CNIError
from meta.invoke import Invocation, chain
from meta.nad import NetworkConfig
from meta.plan import Attachment

BASE = Invocation(command="", container_id="cid1", netns="/proc/self/ns/net", ifname="", cni_args="K8S_POD_NAME=p",
                  path=("/opt/cni/bin",), where="")

Responder = Callable[[str, dict[str, Any], Invocation], bytes]


@attrs.define
class Call:
    plugin_type: str
    stdin: bytes
    inv: Invocation

    @property
    def conf(self) -> dict[str, Any]:
        return json.loads(self.stdin)


class FakeInvoker:
    """Records every call; answers from `outputs[(command, type)]` or raises `errors[(command, type)]`."""

    def __init__(self, outputs: dict[tuple[str, str], bytes] | None = None,
                 errors: dict[tuple[str, str], CNIError] | None = None) -> None:
        self.outputs = outputs or {}
        self.errors = errors or {}
        self.calls: list[Call] = []

    def run(self, plugin_type: str, stdin: bytes, inv: Invocation) -> bytes:
        self.calls.append(Call(plugin_type, stdin, inv))
        key = (inv.command, plugin_type)
        if key in self.errors:
            raise self.errors[key]
        return self.outputs.get(key, b"")

    @property
    def types(self) -> list[str]:
        return [c.plugin_type for c in self.calls]


def network(*plugins: dict[str, Any], version: str = "1.0.0", **kw: Any) -> NetworkConfig:
    return NetworkConfig(name="mynet", cni_version=version, plugins=tuple(plugins), origin="NAD ns/mynet", **kw)


def attachment(net: NetworkConfig, **kw: Any) -> Attachment:
    return Attachment(name="ns/mynet", ifname=kw.pop("ifname", "net1"), network=net, **kw)


THREE = (
    {"type": "bridge", "bridge": "br0", "ipam": {"type": "host-local"}},
    {"type": "tuning", "capabilities": {"mac": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}},
)
BRIDGE_OUT = {"cniVersion": "1.0.0", "interfaces": [{"name": "net1", "sandbox": "/x"}],
              "ips": [{"interface": 0, "address": "10.0.0.5/24", "gateway": "10.0.0.1"}]}
CACHED = cniresult.to_current(BRIDGE_OUT)


# --- plugin_request -------------------------------------------------------------------------------

def test_plugin_request_injects_name_and_version() -> None:
    att = attachment(network({"type": "bridge", "name": "stale", "cniVersion": "0.3.1"}, version="1.1.0"))
    conf = json.loads(chain.plugin_request(att, att.network.plugins[0], None))
    assert conf == {"type": "bridge", "name": "mynet", "cniVersion": "1.1.0"}


def test_plugin_request_runtime_config_only_for_declared_capabilities() -> None:
    plugin = {"type": "tuning", "capabilities": {"mac": True, "ips": False}}
    att = attachment(network(plugin), capability_args={"mac": "02:00:00:00:00:01", "ips": ["10.0.0.1/24"],
                                                        "portMappings": [], "CNIDeviceInfoFile": "/f"})
    conf = json.loads(chain.plugin_request(att, plugin, None))
    assert conf["runtimeConfig"] == {"mac": "02:00:00:00:00:01"}
    assert conf["capabilities"] == {"mac": True, "ips": False}  # libcni keeps it


def test_plugin_request_no_runtime_config_when_nothing_matches() -> None:
    plugin = {"type": "bridge"}
    att = attachment(network(plugin), capability_args={"mac": "02:00:00:00:00:01"})
    assert "runtimeConfig" not in json.loads(chain.plugin_request(att, plugin, None))


def test_plugin_request_device_id() -> None:
    plugin = {"type": "host-device"}
    att = attachment(network(plugin), device_id="0000:01:00.1")
    assert json.loads(chain.plugin_request(att, plugin, None))["deviceID"] == "0000:01:00.1"


def test_plugin_request_merges_args_cni() -> None:
    plugin = {"type": "bridge", "args": {"cni": {"a": 1, "b": 2}, "other": {"k": "v"}}}
    att = attachment(network(plugin), args_cni={"b": 3, "ipam-claim-reference": "c"})
    conf = json.loads(chain.plugin_request(att, plugin, None))
    assert conf["args"] == {"cni": {"a": 1, "b": 3, "ipam-claim-reference": "c"}, "other": {"k": "v"}}
    assert plugin["args"]["cni"] == {"a": 1, "b": 2}, "the network config must not be mutated"


def test_plugin_request_args_cni_without_existing_args() -> None:
    plugin = {"type": "bridge"}
    att = attachment(network(plugin), args_cni={"x": "y"})
    assert json.loads(chain.plugin_request(att, plugin, None))["args"] == {"cni": {"x": "y"}}


def test_plugin_request_prev_result_and_extra() -> None:
    plugin = {"type": "bridge"}
    att = attachment(network(plugin))
    conf = json.loads(chain.plugin_request(att, plugin, {"cniVersion": "1.0.0"}, {"cni.dev/x": [1]}))
    assert conf["prevResult"] == {"cniVersion": "1.0.0"}
    assert conf["cni.dev/x"] == [1]


def test_plugin_request_is_compact_and_sorted() -> None:
    plugin = {"zeta": 1, "type": "bridge", "alpha": {"z": 1, "a": 2}}
    att = attachment(network(plugin), capability_args={}, args_cni=None)
    raw = chain.plugin_request(att, plugin, None)
    assert raw == b'{"alpha":{"a":2,"z":1},"cniVersion":"1.0.0","name":"mynet","type":"bridge","zeta":1}'


def test_plugin_request_does_not_mutate_plugin() -> None:
    plugin = {"type": "tuning", "capabilities": {"mac": True}}
    att = attachment(network(plugin), capability_args={"mac": "m"}, device_id="d")
    chain.plugin_request(att, plugin, {"x": 1})
    assert plugin == {"type": "tuning", "capabilities": {"mac": True}}


# --- ADD ------------------------------------------------------------------------------------------

def test_add_passes_prev_result_along() -> None:
    tuning_out = dict(BRIDGE_OUT, interfaces=[{"name": "net1", "sandbox": "/x", "mac": "02:00:00:00:00:01"}])
    inv = FakeInvoker({("ADD", "bridge"): json.dumps(BRIDGE_OUT).encode(),
                       ("ADD", "tuning"): json.dumps(tuning_out).encode(),
                       ("ADD", "portmap"): json.dumps(tuning_out).encode()})
    att = attachment(network(*THREE), capability_args={"mac": "02:00:00:00:00:01", "portMappings": [{"containerPort": 80}]},
                     cni_args=(("IgnoreUnknown", "true"), ("K8S_POD_NAME", "p")))
    res = chain.add(att, inv, BASE)
    assert inv.types == ["bridge", "tuning", "portmap"]
    confs = [c.conf for c in inv.calls]
    assert "prevResult" not in confs[0]
    assert confs[1]["prevResult"] == BRIDGE_OUT
    assert confs[2]["prevResult"] == tuning_out
    assert confs[1]["runtimeConfig"] == {"mac": "02:00:00:00:00:01"}
    assert confs[2]["runtimeConfig"] == {"portMappings": [{"containerPort": 80}]}
    assert "runtimeConfig" not in confs[0]
    assert res == cniresult.to_current(tuning_out)
    for i, c in enumerate(inv.calls):
        assert c.inv.command == "ADD"
        assert c.inv.ifname == "net1"
        assert c.inv.container_id == "cid1" and c.inv.netns == BASE.netns and c.inv.path == BASE.path
        assert c.inv.cni_args == "IgnoreUnknown=true;K8S_POD_NAME=p"
        assert c.inv.where == f"network ns/mynet (net1), plugin {i + 1}/3"


def test_add_fills_missing_result_version() -> None:
    # libcni fixupResultVersion: a result without cniVersion is in the config's version.
    out = {"ips": [{"address": "10.0.0.5/24"}]}
    inv = FakeInvoker({("ADD", "bridge"): json.dumps(out).encode(), ("ADD", "tuning"): json.dumps(out).encode()})
    att = attachment(network(THREE[0], THREE[1], version="0.4.0"))
    res = chain.add(att, inv, BASE)
    assert inv.calls[1].conf["prevResult"] == {"cniVersion": "0.4.0", "ips": [{"address": "10.0.0.5/24"}]}
    assert res["ips"] == [{"address": "10.0.0.5/24"}]


def test_add_single_plugin_where_has_no_step() -> None:
    inv = FakeInvoker({("ADD", "bridge"): json.dumps(BRIDGE_OUT).encode()})
    chain.add(attachment(network(THREE[0])), inv, BASE)
    assert inv.calls[0].inv.where == "network ns/mynet (net1)"


def test_add_without_att_cni_args_uses_base() -> None:
    inv = FakeInvoker({("ADD", "bridge"): json.dumps(BRIDGE_OUT).encode()})
    chain.add(attachment(network(THREE[0])), inv, BASE)
    assert inv.calls[0].inv.cni_args == BASE.cni_args


@pytest.mark.parametrize("out,what", [(b"", "no valid JSON"), (b"nope", "no valid JSON"), (b"[]", "not a JSON object"),
                                      (b"null", "not a JSON object")])
def test_add_bad_output_is_code_6_and_stops(out: bytes, what: str) -> None:
    inv = FakeInvoker({("ADD", "bridge"): out})
    with pytest.raises(CNIError) as ei:
        chain.add(attachment(network(*THREE)), inv, BASE)
    assert ei.value.code == DECODE_FAILURE
    assert what in ei.value.msg and "plugin 1/3" in ei.value.msg and "bridge" in ei.value.msg
    assert inv.types == ["bridge"]


def test_add_malformed_final_result_names_last_plugin() -> None:
    inv = FakeInvoker({("ADD", "bridge"): json.dumps({"cniVersion": "1.0.0", "ips": [{"nope": 1}]}).encode()})
    with pytest.raises(CNIError) as ei:
        chain.add(attachment(network(THREE[0])), inv, BASE)
    assert ei.value.code == DECODE_FAILURE and "network ns/mynet (net1)" in ei.value.msg


def test_add_stops_at_first_error() -> None:
    err = CNIError(DELEGATE_FAILED, "tuning broke")
    inv = FakeInvoker({("ADD", "bridge"): json.dumps(BRIDGE_OUT).encode()}, {("ADD", "tuning"): err})
    with pytest.raises(CNIError) as ei:
        chain.add(attachment(network(*THREE)), inv, BASE)
    assert ei.value is err
    assert inv.types == ["bridge", "tuning"]


# --- DEL ------------------------------------------------------------------------------------------

def test_delete_reverse_with_cached_result() -> None:
    inv = FakeInvoker()
    att = attachment(network(*THREE, version="0.4.0"))
    assert chain.delete(att, inv, BASE, CACHED) == []
    assert inv.types == ["portmap", "tuning", "bridge"]
    expected_prev = cniresult.from_current(CACHED, "0.4.0")
    assert expected_prev["ips"][0]["version"] == "4"
    for c in inv.calls:
        assert c.inv.command == "DEL"
        assert c.conf["prevResult"] == expected_prev
    assert [c.inv.where for c in inv.calls] == [f"network ns/mynet (net1), plugin {i}/3" for i in (3, 2, 1)]


def test_delete_continues_past_errors() -> None:
    e1, e2 = CNIError(DELEGATE_FAILED, "portmap"), CNIError(DELEGATE_FAILED, "bridge")
    inv = FakeInvoker(errors={("DEL", "portmap"): e1, ("DEL", "bridge"): e2})
    errors = chain.delete(attachment(network(*THREE)), inv, BASE, CACHED)
    assert errors == [e1, e2]
    assert inv.types == ["portmap", "tuning", "bridge"]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_delete_pre_040_has_no_prev_result(version: str) -> None:
    inv = FakeInvoker()
    chain.delete(attachment(network(*THREE, version=version)), inv, BASE, CACHED)
    assert all("prevResult" not in c.conf for c in inv.calls)


def test_delete_without_cached_result() -> None:
    inv = FakeInvoker()
    chain.delete(attachment(network(*THREE)), inv, BASE, None)
    assert len(inv.calls) == 3 and all("prevResult" not in c.conf for c in inv.calls)


# --- CHECK ----------------------------------------------------------------------------------------

def test_check_in_order_with_prev_result() -> None:
    inv = FakeInvoker()
    chain.check(attachment(network(*THREE, version="1.1.0")), inv, BASE, CACHED)
    assert inv.types == ["bridge", "tuning", "portmap"]
    assert all(c.inv.command == "CHECK" and c.conf["prevResult"] == cniresult.from_current(CACHED, "1.1.0")
               for c in inv.calls)


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.1"])
def test_check_skipped_before_040(version: str) -> None:
    inv = FakeInvoker()
    chain.check(attachment(network(*THREE, version=version)), inv, BASE, CACHED)
    assert inv.calls == []


def test_check_skipped_when_disabled() -> None:
    inv = FakeInvoker()
    chain.check(attachment(network(*THREE, disable_check=True)), inv, BASE, CACHED)
    assert inv.calls == []


def test_check_raises_first_failure() -> None:
    err = CNIError(DELEGATE_FAILED, "tuning check")
    inv = FakeInvoker(errors={("CHECK", "tuning"): err})
    with pytest.raises(CNIError) as ei:
        chain.check(attachment(network(*THREE)), inv, BASE, CACHED)
    assert ei.value is err
    assert inv.types == ["bridge", "tuning"]


# --- STATUS and GC --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_status_and_gc_skipped_before_110(version: str) -> None:
    inv = FakeInvoker()
    att = attachment(network(*THREE, version=version))
    chain.status(att, inv, BASE)
    assert chain.gc(att, inv, BASE, [{"containerID": "c", "ifname": "eth0"}]) == []
    assert inv.calls == []


def test_status_to_every_plugin() -> None:
    inv = FakeInvoker()
    chain.status(attachment(network(*THREE, version="1.1.0"), ifname=""), inv, BASE)
    assert inv.types == ["bridge", "tuning", "portmap"]
    assert all(c.inv.command == "STATUS" and "prevResult" not in c.conf for c in inv.calls)
    assert inv.calls[0].inv.where == "network ns/mynet, plugin 1/3"


def test_status_raises() -> None:
    err = CNIError(50, "not ready")
    inv = FakeInvoker(errors={("STATUS", "bridge"): err})
    with pytest.raises(CNIError) as ei:
        chain.status(attachment(network(*THREE, version="1.1.0")), inv, BASE)
    assert ei.value is err and inv.types == ["bridge"]


def test_gc_carries_valid_attachments_and_collects_errors() -> None:
    valid = [{"containerID": "c1", "ifname": "net1"}, {"containerID": "c2", "ifname": "net1"}]
    err = CNIError(DELEGATE_FAILED, "bridge gc")
    inv = FakeInvoker(errors={("GC", "bridge"): err})
    errors = chain.gc(attachment(network(*THREE, version="1.1.0")), inv, BASE, valid)
    assert errors == [err]
    assert inv.types == ["bridge", "tuning", "portmap"]
    for c in inv.calls:
        assert c.inv.command == "GC"
        assert c.conf[chain.VALID_ATTACHMENTS] == valid
        assert c.conf[chain.VALID_ATTACHMENTS_OLD] == valid
        assert "prevResult" not in c.conf


def test_gc_skipped_when_disabled() -> None:
    inv = FakeInvoker()
    assert chain.gc(attachment(network(*THREE, version="1.1.0", disable_gc=True)), inv, BASE, []) == []
    assert inv.calls == []


def test_gc_with_no_valid_attachments_sends_empty_list() -> None:
    inv = FakeInvoker()
    chain.gc(attachment(network(THREE[0], version="1.1.0")), inv, BASE, [])
    assert inv.calls[0].conf["cni.dev/valid-attachments"] == []
