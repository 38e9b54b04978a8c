"""Planning attachments (meta/plan.py): pure, so every decision is checked directly."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from meta import plan
from meta.cni.errors import INVALID_CONFIG, CNIError
from meta.nad import NetworkConfig
from meta.plan import Attachment, Target
from meta.selection import SelectionElement

DEVINFO = "/run/devinfo"
ALL_CAPS = {"ips": True, "mac": True, "portMappings": True, "bandwidth": True, "infinibandGUID": True}


def net(name: str, caps: Mapping[str, bool] | None = None, resource: str | None = None,
        version: str = "1.0.0") -> NetworkConfig:
    plugins: list[dict[str, Any]] = [{"type": "bridge"}]
    if caps:
        plugins.append({"type": "tuning", "capabilities": dict(caps)})
    return NetworkConfig(name=name, cni_version=version, plugins=tuple(plugins), origin=f"NAD {name}", resource_name=resource)


def target(name: str, where: str | None = None, element: SelectionElement | None = None, **kw: Any) -> Target:
    return Target(name=name, network=net(name.split("/")[-1], **kw), where=where or f"where {name}", element=element)


def sel(name: str, i: int, **fields: Any) -> Target:
    caps = fields.pop("caps", None)
    resource = fields.pop("resource", None)
    el = SelectionElement(name=name, namespace="ns1", **fields)
    return target(f"ns1/{name}", f"pod ns1/p: [{i}]", el, caps=caps, resource=resource)


PRIMARY = target("cluster", "meta-cni config clusterNetwork")


def build(*, primary: Target = PRIMARY, defaults: Sequence[Target] = (), selected: Sequence[Target] = (),
          runtime_args: tuple[tuple[str, str], ...] = (), runtime_config: Mapping[str, Any] | None = None,
          devices: Mapping[str, Sequence[str]] | None = None, ifname: str = "eth0") -> tuple[Attachment, ...]:
    return plan.build(ifname=ifname, container_id="cid1", runtime_args=runtime_args, runtime_config=runtime_config or {},
                      primary=primary, defaults=defaults, selected=selected, devices=devices or {}, device_info_dir=DEVINFO)


def build_error(**kw: Any) -> CNIError:
    with pytest.raises(CNIError) as ei:
        build(**kw)
    assert ei.value.code == INVALID_CONFIG
    return ei.value


# --- interface names ------------------------------------------------------------------------------

def test_primary_only() -> None:
    (att,) = build()
    assert att.ifname == "eth0" and att.is_default and att.name == "cluster"
    assert att.device_info_file is None


def test_positional_names() -> None:
    atts = build(defaults=[target("d1"), target("d2")], selected=[sel("a", 0), sel("b", 1)])
    assert [(a.name, a.ifname, a.is_default) for a in atts] == [
        ("cluster", "eth0", True), ("d1", "net1", False), ("d2", "net2", False),
        ("ns1/a", "net3", False), ("ns1/b", "net4", False),
    ]


def test_primary_uses_runtime_ifname() -> None:
    atts = build(ifname="net1", selected=[sel("a", 0)])
    assert [a.ifname for a in atts] == ["net1", "net2"]


def test_explicit_interfaces_and_auto_names_skip_them() -> None:
    atts = build(selected=[sel("a", 0), sel("b", 1, interface="net1"), sel("c", 2, interface="fast0"), sel("d", 3)])
    names = [a.ifname for a in atts]
    assert names[2] == "net1" and names[3] == "fast0"
    assert names[1] not in ("eth0", "net1", "fast0")
    assert names[4] == "net4"
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("explicit", [["net1"], ["net2", "net3"], ["net3", "net1"], ["net1", "net2", "net3", "net4"]])
def test_names_always_unique(explicit: list[str]) -> None:
    selected = [sel(f"x{i}", i, interface=e) for i, e in enumerate(explicit)]
    selected += [sel(f"y{i}", len(explicit) + i) for i in range(4)]
    atts = build(defaults=[target("d")], selected=selected)
    names = [a.ifname for a in atts]
    assert len(set(names)) == len(names)
    assert [a.ifname for a in atts[2:2 + len(explicit)]] == explicit
    assert all(n.startswith("net") or n == "eth0" for n in names)


def test_duplicate_explicit_interfaces() -> None:
    err = build_error(selected=[sel("a", 0, interface="x0"), sel("b", 1, interface="x0")])
    assert err.msg.startswith("pod ns1/p: [1].interface: 'x0'")
    assert "pod ns1/p: [0]" in err.msg


def test_explicit_interface_equal_to_primary() -> None:
    err = build_error(selected=[sel("a", 0, interface="eth0")])
    assert err.msg.startswith("pod ns1/p: [0].interface: 'eth0'")
    assert "meta-cni config clusterNetwork" in err.msg


# --- capabilities ---------------------------------------------------------------------------------

ELEMENT_REQUESTS: list[tuple[str, Any, str, str, Any]] = [
    # (SelectionElement attr, value, capability, annotation field, runtimeConfig value)
    ("ips", ("10.0.0.5/24",), "ips", "ips", ["10.0.0.5/24"]),
    ("mac", "02:00:00:00:00:05", "mac", "mac", "02:00:00:00:00:05"),
    ("port_mappings", ({"containerPort": 80, "hostPort": 8080},), "portMappings", "portMappings", [{"containerPort": 80, "hostPort": 8080}]),
    ("bandwidth", {"ingressRate": 1}, "bandwidth", "bandwidth", {"ingressRate": 1}),
    ("infiniband_guid", "00:11:22:33:44:55:66:77", "infinibandGUID", "infiniband-guid", "00:11:22:33:44:55:66:77"),
]


@pytest.mark.parametrize("attr,value,cap,field,_rc", ELEMENT_REQUESTS)
def test_request_without_capability_fails(attr: str, value: Any, cap: str, field: str, _rc: Any) -> None:
    other = {c: True for c in ALL_CAPS if c != cap}
    err = build_error(selected=[sel("a", 0), sel("b", 1, caps=other, **{attr: value})])
    assert err.msg.startswith(f"pod ns1/p: [1].{field}: network ns1/b (NAD b)")
    assert repr(cap) in err.msg


@pytest.mark.parametrize("attr,value,cap,field,rc", ELEMENT_REQUESTS)
def test_request_with_capability_is_passed(attr: str, value: Any, cap: str, field: str, rc: Any) -> None:
    atts = build(selected=[sel("b", 0, caps={cap: True}, **{attr: value})])
    assert atts[1].capability_args[cap] == rc


def test_capability_false_is_not_declared() -> None:
    build_error(selected=[sel("b", 0, caps={"mac": False}, mac="02:00:00:00:00:05")])


def test_runtime_config_only_to_primary() -> None:
    rc = {"portMappings": [{"containerPort": 80}], "bandwidth": {"ingressRate": 5}, "io.kubernetes.cri.pod-annotations": {}}
    atts = build(selected=[sel("a", 0, caps=ALL_CAPS)], defaults=[target("d", caps=ALL_CAPS)], runtime_config=rc)
    assert atts[0].capability_args == rc
    for att in atts[1:]:
        assert set(att.capability_args) == {"CNIDeviceInfoFile"}


def test_runtime_config_is_not_checked_against_capabilities() -> None:
    # libcni drops what a plugin did not declare; the runtime's data is not an explicit request.
    (att,) = build(runtime_config={"portMappings": []})
    assert att.capability_args == {"portMappings": []}


def test_primary_element_overrides_runtime_config() -> None:
    el = SelectionElement(name="calico", namespace="kube-system", mac="02:00:00:00:00:09")
    primary = target("kube-system/calico", "pod: default-network", el, caps={"mac": True})
    (att,) = build(primary=primary, runtime_config={"mac": "02:00:00:00:00:01", "portMappings": []})
    assert att.capability_args == {"mac": "02:00:00:00:00:09", "portMappings": []}


def test_primary_element_request_without_capability_fails() -> None:
    el = SelectionElement(name="calico", namespace="kube-system", ips=("10.0.0.1",))
    with pytest.raises(CNIError) as ei:
        build(primary=target("kube-system/calico", "pod: default-network", el))
    assert ei.value.msg.startswith("pod: default-network.ips")


# --- CNI_ARGS and args.cni ------------------------------------------------------------------------

def test_delegate_cni_args() -> None:
    runtime = (("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", "ns1"), ("K8S_POD_NAME", "p"),
               ("IP", "10.0.0.7/24"), ("MAC", "02:00:00:00:00:07"), ("K8S_POD_UID", "u"))
    atts = build(selected=[sel("a", 0)], runtime_args=runtime)
    assert atts[0].cni_args == (("IgnoreUnknown", "true"), ("K8S_POD_NAMESPACE", "ns1"), ("K8S_POD_NAME", "p"),
                                ("IP", "10.0.0.7/24"), ("MAC", "02:00:00:00:00:07"), ("K8S_POD_UID", "u"))
    assert atts[1].cni_args == (("IgnoreUnknown", "true"), ("K8S_POD_NAMESPACE", "ns1"), ("K8S_POD_NAME", "p"),
                                ("K8S_POD_UID", "u"))


def test_delegate_cni_args_without_runtime_args() -> None:
    atts = build(selected=[sel("a", 0)])
    assert all(a.cni_args == (("IgnoreUnknown", "true"),) for a in atts)


def test_args_cni_from_element() -> None:
    atts = build(selected=[
        sel("a", 0, cni_args={"foo": "bar"}),
        sel("b", 1, ipam_claim_reference="claim-b"),
        sel("c", 2, cni_args={"x": 1}, ipam_claim_reference="claim-c"),
        sel("d", 3),
        sel("e", 4, cni_args={}),
    ])
    assert [a.args_cni for a in atts] == [
        None, {"foo": "bar"}, {"ipam-claim-reference": "claim-b"}, {"x": 1, "ipam-claim-reference": "claim-c"}, None, None,
    ]


def test_args_cni_does_not_alias_element() -> None:
    cni_args = {"foo": "bar"}
    atts = build(selected=[sel("a", 0, cni_args=cni_args)])
    assert atts[1].args_cni is not None
    atts[1].args_cni["foo"] = "changed"
    assert cni_args == {"foo": "bar"}


def test_default_route_carried() -> None:
    atts = build(selected=[sel("a", 0, default_route=("10.0.0.1",)), sel("b", 1)])
    assert [a.default_route for a in atts] == [None, ("10.0.0.1",), None]


# --- devices and device info ----------------------------------------------------------------------

def test_devices_consumed_in_order() -> None:
    atts = build(selected=[sel("a", 0, resource="intel/vf"), sel("b", 1, resource="intel/vf"), sel("c", 2, resource="other")],
                 devices={"intel/vf": ["0000:01:00.1", "0000:01:00.2", "0000:01:00.3"], "other": ["X"]})
    assert [a.device_id for a in atts] == [None, "0000:01:00.1", "0000:01:00.2", "X"]
    assert atts[1].capability_args["deviceID"] == "0000:01:00.1"
    assert "deviceID" not in atts[0].capability_args


def test_devices_input_not_mutated() -> None:
    devices = {"intel/vf": ["a", "b"]}
    build(selected=[sel("a", 0, resource="intel/vf")], devices=devices)
    assert devices == {"intel/vf": ["a", "b"]}


@pytest.mark.parametrize("devices,failing", [({}, 0), ({"intel/vf": []}, 0), ({"intel/vf": ["only-one"]}, 1),
                                             ({"other/vf": ["x", "y"]}, 0)])
def test_missing_device_is_error(devices: dict[str, list[str]], failing: int) -> None:
    selected = [sel("a", 0, resource="intel/vf"), sel("b", 1, resource="intel/vf")]
    err = build_error(selected=selected, devices=devices)
    assert err.msg.startswith(f"pod ns1/p: [{failing}]: network ns1/{'ab'[failing]}")
    assert "'intel/vf'" in err.msg


def test_element_device_id_without_resource() -> None:
    atts = build(selected=[sel("a", 0, device_id="0000:09:00.0")])
    assert atts[1].device_id == "0000:09:00.0"
    assert atts[1].capability_args["deviceID"] == "0000:09:00.0"


def test_allocated_device_wins_over_element_device_id() -> None:
    atts = build(selected=[sel("a", 0, resource="r", device_id="0000:09:00.0")], devices={"r": ["0000:01:00.1"]})
    assert atts[1].device_id == "0000:01:00.1"


def test_primary_with_resource_gets_device_but_no_info_file() -> None:
    primary = target("cluster", "clusterNetwork", resource="r")
    (att,) = build(primary=primary, devices={"r": ["D"]})
    assert att.device_id == "D"
    assert att.device_info_file is None
    assert "CNIDeviceInfoFile" not in att.capability_args


def test_device_info_file_only_for_non_default() -> None:
    atts = build(defaults=[target("d")], selected=[sel("a", 0, interface="fast0")])
    assert atts[0].device_info_file is None and "CNIDeviceInfoFile" not in atts[0].capability_args
    assert atts[1].device_info_file == f"{DEVINFO}/d-cid1_net1"
    assert atts[2].device_info_file == f"{DEVINFO}/ns1-a-cid1_fast0"
    assert atts[2].capability_args["CNIDeviceInfoFile"] == atts[2].device_info_file


# --- serialisation --------------------------------------------------------------------------------

def test_attachment_round_trip() -> None:
    atts = build(
        defaults=[target("d")],
        selected=[sel("a", 0, caps=ALL_CAPS, resource="r", ips=("10.0.0.5/24",), mac="02:00:00:00:00:05",
                      port_mappings=({"containerPort": 80},), bandwidth={"egressRate": 1}, cni_args={"k": "v"},
                      default_route=("10.0.0.1",), interface="fast0")],
        runtime_args=(("K8S_POD_NAME", "p"),), runtime_config={"portMappings": []}, devices={"r": ["D1"]},
    )
    for att in atts:
        d = att.to_dict()
        wire = json.loads(json.dumps(d))
        back = Attachment.from_dict(wire)
        assert back == att
        assert back.to_dict() == d
        assert back.capability_args == att.capability_args
        assert back.args_cni == att.args_cni
        assert back.network.to_dict() == att.network.to_dict()
        assert back.network.resource_name == att.network.resource_name
        assert back.network.origin == att.network.origin


def test_attachment_from_minimal_dict() -> None:
    att = Attachment.from_dict({"name": "n", "ifname": "eth0", "network": {"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "x"}]}})
    assert att.capability_args == {} and att.cni_args == () and att.default_route is None and not att.is_default
    assert att.network.origin == "" and att.network.resource_name is None


def test_attachment_empty_default_route_survives_round_trip() -> None:
    att = Attachment(name="n", ifname="net1", network=net("n"), default_route=())
    assert Attachment.from_dict(att.to_dict()).default_route == ()


def test_pod_identity_ref() -> None:
    assert plan.PodIdentity(namespace="ns", name="p").ref == "ns/p"
    assert plan.PodIdentity().ref == "(no pod)"
