"""The networks annotation in both NPWG forms (meta/selection.py)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from meta import selection
from meta.cni.errors import INVALID_CONFIG, CNIError
from meta.selection import SelectionElement

WHERE = "pod ns1/p: annotation k8s.v1.cni.cncf.io/networks"


def parse(value: str) -> tuple[SelectionElement, ...]:
    return selection.parse(value, "ns1", WHERE)


def parse_error(value: str) -> CNIError:
    with pytest.raises(CNIError) as ei:
        parse(value)
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith(WHERE + ": "), ei.value.msg
    return ei.value


def parse_json(elements: Any) -> tuple[SelectionElement, ...]:
    return parse(json.dumps(elements))


# --- comma form -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_empty_is_nothing(value: str) -> None:
    assert parse(value) == ()


def test_comma_forms() -> None:
    got = parse("net-a, other/net-b@fast0 ,net-c@net9,   ns2/d.e")
    assert got == (
        SelectionElement(name="net-a", namespace="ns1"),
        SelectionElement(name="net-b", namespace="other", interface="fast0"),
        SelectionElement(name="net-c", namespace="ns1", interface="net9"),
        SelectionElement(name="d.e", namespace="ns2"),
    )
    assert got[1].ref == "other/net-b"
    assert all(e.default_route is None and e.ips == () for e in got)


def test_comma_same_network_twice_is_allowed() -> None:
    # Multiple attachments to one network are allowed (NPWG §4.2).
    assert [e.ref for e in parse("a,a")] == ["ns1/a", "ns1/a"]


@pytest.mark.parametrize("value,index,what", [
    ("Bad", 0, "network name 'Bad'"),
    ("a,-b", 1, "network name '-b'"),
    ("a,b-", 1, "network name 'b-'"),
    ("a,b_c", 1, "network name 'b_c'"),
    ("a,,b", 1, "network name ''"),
    ("a,", 1, "network name ''"),
    ("ns/", 0, "network name ''"),
    ("a/b c", 0, "network name 'b c'"),
    ("a," + "x" * 254, 1, "network name"),
    ("/a", 0, "namespace ''"),
    ("NS/a", 0, "namespace 'NS'"),
    ("x,n.s/a", 1, "namespace 'n.s'"),
    ("a/b/c", 0, "namespace 'a/b'"),
    ("a@", 0, "interface '' is empty"),
    ("a,b@" + "x" * 16, 1, "longer than 15"),
    ("a@..", 0, "'.' or '..'"),
    ("a@x:y", 0, "contains"),
    ("a,b,c@e f", 2, "contains"),
])
def test_comma_invalid(value: str, index: int, what: str) -> None:
    err = parse_error(value)
    assert f"{WHERE}: [{index}]" in err.msg
    assert what in err.msg


def test_comma_name_of_253_chars_is_valid() -> None:
    assert parse("a" * 253)[0].name == "a" * 253


def test_comma_namespace_longer_than_63_is_invalid() -> None:
    # A namespace is a DNS-1123 label (at most 63 chars); the JSON form enforces this, the comma form must too.
    err = parse_error("a" * 64 + "/net")
    assert "[0]" in err.msg and "namespace" in err.msg


def test_comma_interface_is_everything_after_first_at() -> None:
    # Linux allows '@' in interface names, so only the first one separates.
    assert parse("a@b@c")[0].interface == "b@c"


# --- JSON form ------------------------------------------------------------------------------------

def test_json_minimal() -> None:
    assert parse_json([{"name": "a"}]) == (SelectionElement(name="a", namespace="ns1"),)


def test_json_empty_list() -> None:
    assert parse("[]") == ()


def test_json_every_field() -> None:
    el = {
        "name": "net-a",
        "namespace": "other",
        "interface": "fast0",
        "ips": ["10.0.0.5/24", "fd00::5"],
        "mac": "02:00:00:00:00:05",
        "default-route": ["10.0.0.1", "fd00::1"],
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "1.2.3.4"}],
        "bandwidth": {"ingressRate": 1000, "ingressBurst": 10, "egressRate": 2000, "egressBurst": 20},
        "cni-args": {"foo": "bar", "n": [1]},
        "infiniband-guid": "00:11:22:33:44:55:66:77",
        "deviceID": "0000:04:00.5",
    }
    (got,) = parse_json([el])
    assert got.name == "net-a" and got.namespace == "other" and got.interface == "fast0"
    assert got.ips == ("10.0.0.5/24", "fd00::5")
    assert got.mac == "02:00:00:00:00:05"
    assert got.default_route == ("10.0.0.1", "fd00::1")
    assert got.port_mappings == (el["portMappings"][0],)
    assert got.bandwidth == el["bandwidth"]
    assert got.cni_args == {"foo": "bar", "n": [1]}
    assert got.infiniband_guid == "00:11:22:33:44:55:66:77"
    assert got.device_id == "0000:04:00.5"
    assert got.ipam_claim_reference is None


def test_json_ipam_claim_reference() -> None:
    (got,) = parse_json([{"name": "a", "ipam-claim-reference": "pod.a.net1"}])
    assert got.ipam_claim_reference == "pod.a.net1"


def test_json_interface_request_is_legacy_interface() -> None:
    (got,) = parse_json([{"name": "a", "interfaceRequest": "legacy0"}])
    assert got.interface == "legacy0"


def test_json_interface_wins_over_interface_request() -> None:
    (got,) = parse_json([{"name": "a", "interface": "new0", "interfaceRequest": "old0"}])
    assert got.interface == "new0"


def test_json_empty_namespace_means_pod_namespace() -> None:
    # The schema rejects "", so only absence defaults; check absence explicitly.
    (got,) = parse_json([{"name": "a"}])
    assert got.namespace == "ns1"


def test_json_dash_mac_and_empty_default_route() -> None:
    (got,) = parse_json([{"name": "a", "mac": "02-00-00-00-00-05", "default-route": []}])
    assert got.mac == "02-00-00-00-00-05"
    assert got.default_route == ()


def test_json_one_default_route_among_many() -> None:
    got = parse_json([{"name": "a"}, {"name": "b", "default-route": ["10.0.0.1"]}, {"name": "c"}])
    assert [e.default_route for e in got] == [None, ("10.0.0.1",), None]


def test_json_detection_by_quote_brace_or_bracket() -> None:
    # A value with `"` but otherwise comma-like is JSON (and invalid).
    err = parse_error('a,"b"')
    assert "not valid JSON" in err.msg


@pytest.mark.parametrize("value,field", [
    ('[{"name": "a", "bogus": 1}]', "[0].bogus: unknown field"),
    ('[{"name": "a"}, {"name": "b", "Interface": "x"}]', "[1].Interface: unknown field"),
    ('[{"namespace": "x"}]', "[0]: 'name' is a required property"),
    ('[{"name": "A"}]', "[0].name"),
    ('[{"name": "a", "namespace": "N_S"}]', "[0].namespace"),
    ('[{"name": "a", "namespace": ""}]', "[0].namespace"),
    ('[{"name": "a", "interface": ""}]', "[0].interface"),
    ('[{"name": "a", "interface": "x/y"}]', "[0].interface"),
    ('[{"name": "a", "interface": "."}]', "[0].interface"),
    ('[{"name": "a", "interface": "0123456789abcdef"}]', "[0].interface"),
    ('[{"name": "a", "interfaceRequest": "a b"}]', "[0].interfaceRequest"),
    ('[{"name": "a", "mac": "zz:00:00:00:00:00"}]', "[0].mac"),
    ('[{"name": "a", "mac": "02:00:00:00:00"}]', "[0].mac"),
    ('[{"name": "a", "mac": 5}]', "[0].mac"),
    ('[{"name": "a", "ips": "10.0.0.1"}]', "[0].ips"),
    ('[{"name": "a", "ips": ["10.0.0.1/33"]}]', "[0].ips: '10.0.0.1/33' is not an IP address or CIDR"),
    ('[{"name": "a", "ips": ["nope"]}]', "[0].ips: 'nope'"),
    ('[{"name": "a", "ips": [""]}]', "[0].ips"),
    ('[{"name": "a", "default-route": ["10.0.0.1/24"]}]', "[0].default-route: '10.0.0.1/24' is not an IP address"),
    ('[{"name": "a", "portMappings": [{"hostPort": 80}]}]', "[0].portMappings[0]"),
    ('[{"name": "a", "portMappings": [{"containerPort": 0}]}]', "[0].portMappings[0].containerPort"),
    ('[{"name": "a", "portMappings": [{"containerPort": 80, "protocol": "icmp"}]}]', "[0].portMappings[0].protocol"),
    ('[{"name": "a", "portMappings": [{"containerPort": 80, "extra": 1}]}]', "[0].portMappings[0].extra: unknown field"),
    ('[{"name": "a", "bandwidth": {"ingressRate": -1}}]', "[0].bandwidth.ingressRate"),
    ('[{"name": "a", "bandwidth": {"rate": 1}}]', "[0].bandwidth.rate: unknown field"),
    ('[{"name": "a", "cni-args": []}]', "[0].cni-args"),
    ('[{"name": "a", "infiniband-guid": "00:11:22:33:44:55"}]', "[0].infiniband-guid"),
    ('[{"name": "a", "deviceID": ""}]', "[0].deviceID"),
    ('[{"name": "a", "ipam-claim-reference": "Bad_Name"}]', "[0].ipam-claim-reference"),
    ('{"name": "a"}', "(top level)"),
    ('"a"', "(top level)"),
    ('["a"]', "[0]"),
    ('[null]', "[0]"),
])
def test_json_invalid(value: str, field: str) -> None:
    err = parse_error(value)
    assert f"{WHERE}: {field}" in err.msg


def test_json_not_json() -> None:
    assert "not valid JSON" in parse_error("[{").msg


def test_json_two_default_routes() -> None:
    err = parse_error(json.dumps([{"name": "a", "default-route": ["10.0.0.1"]}, {"name": "b"},
                                  {"name": "c", "default-route": ["fd00::1"]}]))
    assert "[2].default-route" in err.msg and "[0]" in err.msg


def test_json_two_ipv4_gateways() -> None:
    err = parse_error(json.dumps([{"name": "a", "default-route": ["10.0.0.1", "10.0.0.2"]}]))
    assert "[0].default-route" in err.msg and "IPv4" in err.msg


def test_json_two_ipv6_gateways() -> None:
    err = parse_error(json.dumps([{"name": "a", "default-route": ["fd00::1", "10.0.0.1", "fd00::2"]}]))
    assert "IPv6" in err.msg


def test_json_ips_and_ipam_claim_are_exclusive() -> None:
    err = parse_error(json.dumps([{"name": "a"}, {"name": "b", "ips": ["10.0.0.5/24"], "ipam-claim-reference": "claim"}]))
    assert "[1]" in err.msg and "mutually exclusive" in err.msg


def test_json_message_lists_all_problems_in_details() -> None:
    err = parse_error(json.dumps([{"name": "a", "bogus": 1, "mac": "x"}]))
    assert "(and 1 more)" in err.msg
    assert "bogus" in err.details and "mac" in err.details


def test_json_interface_with_trailing_newline_is_invalid() -> None:
    # "eth1\n" is not a usable ifname; the schema pattern's `$` must not accept it before a final newline.
    err = parse_error(json.dumps([{"name": "a", "interface": "eth1\n"}]))
    assert "[0].interface" in err.msg


def test_deeply_nested_json_is_code_7() -> None:
    # The annotation is user input: a deep nesting must be a validation error naming it, not a RecursionError.
    err = parse_error("[" * 100_000)
    assert WHERE in err.msg


# --- default-network ------------------------------------------------------------------------------

DN_WHERE = "pod ns1/p: annotation v1.multus-cni.io/default-network"


@pytest.mark.parametrize("value,expected", [
    ("calico", SelectionElement(name="calico", namespace="kube-system")),
    ("other/calico", SelectionElement(name="calico", namespace="other")),
    ('[{"name": "calico", "namespace": "x"}]', SelectionElement(name="calico", namespace="x")),
])
def test_default_network(value: str, expected: SelectionElement) -> None:
    assert selection.parse_default_network(value, "kube-system", DN_WHERE) == expected


@pytest.mark.parametrize("value,count", [("", 0), ("a,b", 2), ("[]", 0), ('[{"name":"a"},{"name":"b"}]', 2)])
def test_default_network_needs_exactly_one(value: str, count: int) -> None:
    with pytest.raises(CNIError) as ei:
        selection.parse_default_network(value, "kube-system", DN_WHERE)
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg == f"{DN_WHERE}: must name exactly one network, got {count}"


def test_default_network_invalid_element_names_where() -> None:
    with pytest.raises(CNIError) as ei:
        selection.parse_default_network("Bad", "kube-system", DN_WHERE)
    assert ei.value.msg.startswith(f"{DN_WHERE}: [0]")
