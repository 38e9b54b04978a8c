"""Result conversion between spec versions (meta/cni/result.py)."""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from meta.cni import result as cniresult
from meta.cni import version as cniversion
from meta.cni.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, CNIError

SANDBOX = "/var/run/netns/x"

CURRENT: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": SANDBOX, "mtu": 1400, "socketPath": "/s", "pciID": "0000:00:01.0"},
    ],
    "ips": [
        {"interface": 1, "address": "10.0.0.2/24", "gateway": "10.0.0.1"},
        {"interface": 1, "address": "fd00::2/64", "gateway": "fd00::1"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.0.0.53"], "domain": "cluster.local", "search": ["a"], "options": ["ndots:5"]},
}


# --- to_current -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ver", ["0.1.0", "0.2.0"])
def test_to_current_from_02x(ver: str) -> None:
    raw = {
        "cniVersion": ver,
        "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "10.9.0.0/16"}]},
        "ip6": {"ip": "fd01::5/64", "routes": [{"dst": "::/0", "gw": "fd01::1"}]},
        "dns": {"nameservers": ["1.1.1.1"]},
    }
    out = cniresult.to_current(raw)
    assert out == {
        "cniVersion": "1.1.0",
        "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1"}, {"address": "fd01::5/64"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "10.9.0.0/16"}, {"dst": "::/0", "gw": "fd01::1"}],
        "dns": {"nameservers": ["1.1.1.1"]},
    }


def test_to_current_02x_only_ip6() -> None:
    out = cniresult.to_current({"cniVersion": "0.2.0", "ip6": {"ip": "fd01::5/64"}})
    assert out == {"cniVersion": "1.1.0", "ips": [{"address": "fd01::5/64"}]}


def test_to_current_02x_empty() -> None:
    assert cniresult.to_current({"cniVersion": "0.2.0"}) == {"cniVersion": "1.1.0"}


def test_to_current_02x_routes_keep_only_dst_gw() -> None:
    raw = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16", "routes": [{"dst": "1.0.0.0/8", "gw": "10.1.0.1", "x": 1}]}}
    assert cniresult.to_current(raw)["routes"] == [{"dst": "1.0.0.0/8", "gw": "10.1.0.1"}]


@pytest.mark.parametrize("block", [{"gateway": "1.1.1.1"}, "10.0.0.1/24", {"ip": 5}, []])
def test_to_current_02x_bad_block_is_code_6(block: object) -> None:
    with pytest.raises(CNIError) as ei:
        cniresult.to_current({"cniVersion": "0.2.0", "ip4": block}, source="network x")
    assert ei.value.code == DECODE_FAILURE
    assert "ip4" in ei.value.msg and "network x" in ei.value.msg


@pytest.mark.parametrize("ver", ["0.3.0", "0.3.1", "0.4.0"])
def test_to_current_from_03x_04x_drops_ip_version(ver: str) -> None:
    raw = {
        "cniVersion": ver,
        "interfaces": [{"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": SANDBOX}],
        "ips": [{"version": "4", "interface": 0, "address": "10.0.0.2/24", "gateway": "10.0.0.1"},
                {"version": "6", "address": "fd00::2/64"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    out = cniresult.to_current(raw)
    assert out["cniVersion"] == "1.1.0"
    assert out["ips"] == [{"interface": 0, "address": "10.0.0.2/24", "gateway": "10.0.0.1"}, {"address": "fd00::2/64"}]
    assert out["interfaces"] == raw["interfaces"]
    assert out["routes"] == raw["routes"]
    assert raw["ips"][0]["version"] == "4", "input must not be mutated"


@pytest.mark.parametrize("ver", ["1.0.0", "1.1.0"])
def test_to_current_from_1x(ver: str) -> None:
    raw = dict(copy.deepcopy(CURRENT), cniVersion=ver, extra="dropped")
    out = cniresult.to_current(raw)
    assert out == CURRENT


def test_to_current_does_not_share_structure() -> None:
    raw = copy.deepcopy(CURRENT)
    out = cniresult.to_current(raw)
    out["interfaces"][0]["name"] = "changed"
    out["routes"].append({"dst": "1.0.0.0/8"})
    assert raw == CURRENT


def test_to_current_version_inside_result_wins() -> None:
    # libcni fixupResultVersion: the caller's version applies only when the result has none.
    raw = {"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}
    assert cniresult.to_current(raw, "1.0.0")["ips"] == [{"address": "10.0.0.2/24"}]


def test_to_current_uses_caller_version_when_absent() -> None:
    raw = {"ips": [{"address": "10.0.0.2/24"}]}
    assert cniresult.to_current(raw, "1.0.0")["ips"] == [{"address": "10.0.0.2/24"}]
    # Without any version it is 0.1.0, where `ips` means nothing.
    assert "ips" not in cniresult.to_current(raw)


@pytest.mark.parametrize("ver", ["9.9.9", "1.0", 5, ["1.0.0"]])
def test_to_current_unreadable_version_is_code_1(ver: object) -> None:
    with pytest.raises(CNIError) as ei:
        cniresult.to_current({"cniVersion": ver}, source="network x")
    assert ei.value.code == INCOMPATIBLE_VERSION
    assert "network x" in ei.value.msg


@pytest.mark.parametrize("raw,why", [
    ([], "not a JSON object"),
    ("x", "not a JSON object"),
    (None, "not a JSON object"),
    ({"interfaces": {"name": "eth0"}}, "interfaces"),
    ({"interfaces": [{"mac": "aa"}]}, "interfaces"),
    ({"interfaces": ["eth0"]}, "interfaces"),
    ({"ips": {"address": "10.0.0.1/24"}}, "ips"),
    ({"ips": [{"gateway": "10.0.0.1"}]}, "ips"),
    ({"ips": [{"address": 5}]}, "ips"),
    ({"ips": [{"address": "10.0.0.1/24", "interface": 0}]}, "does not index"),
    ({"interfaces": [{"name": "a"}], "ips": [{"address": "10.0.0.1/24", "interface": 1}]}, "does not index"),
    ({"interfaces": [{"name": "a"}], "ips": [{"address": "10.0.0.1/24", "interface": -1}]}, "does not index"),
    ({"interfaces": [{"name": "a"}], "ips": [{"address": "10.0.0.1/24", "interface": "0"}]}, "does not index"),
    ({"interfaces": [{"name": "a"}], "ips": [{"address": "10.0.0.1/24", "interface": True}]}, "does not index"),
    ({"interfaces": [{"name": "a"}], "ips": [{"address": "10.0.0.1/24", "interface": 0.0}]}, "does not index"),
    ({"routes": {"dst": "0.0.0.0/0"}}, "routes"),
    ({"routes": [{"gw": "10.0.0.1"}]}, "routes"),
    ({"dns": ["1.1.1.1"]}, "dns"),
])
def test_malformed_result_is_code_6(raw: Any, why: str) -> None:
    if isinstance(raw, dict):
        raw = dict(raw, cniVersion="1.0.0")
    with pytest.raises(CNIError) as ei:
        cniresult.to_current(raw, source="network ns/x (net1)")
    assert ei.value.code == DECODE_FAILURE
    assert why in ei.value.msg
    assert "network ns/x (net1)" in ei.value.msg


@pytest.mark.parametrize("raw", [
    {"cniVersion": "1.0.0", "ips": 5},
    {"cniVersion": "0.4.0", "ips": True},
    {"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24", "routes": 5}},
])
def test_malformed_non_iterable_fields_are_code_6(raw: dict[str, Any]) -> None:
    # A delegate printing `"ips": 5` is a bad result, not a crash of meta-cni.
    with pytest.raises(CNIError) as ei:
        cniresult.to_current(raw)
    assert ei.value.code == DECODE_FAILURE


@pytest.mark.parametrize("key", ["ips", "interfaces", "routes"])
def test_null_lists_do_not_crash(key: str) -> None:
    # Go decodes `null` into an empty slice, so libcni accepts it; rejecting it as code 6 is acceptable too.
    try:
        out = cniresult.to_current({"cniVersion": "1.0.0", key: None})
    except CNIError as e:
        assert e.code == DECODE_FAILURE
    else:
        assert out.get(key) in (None, [])


@pytest.mark.parametrize("ips", [[{"address": "garbage"}], [{"address": "10.0.0.2/24", "gateway": "not-an-ip"}]])
def test_non_ip_addresses_are_code_6(ips: list[dict[str, Any]]) -> None:
    # libcni decodes `address` as a CIDR and `gateway` as an IP: anything else fails to decode there,
    # and later readers (status.entry) rely on valid addresses.
    with pytest.raises(CNIError) as ei:
        cniresult.to_current({"cniVersion": "1.0.0", "ips": ips})
    assert ei.value.code == DECODE_FAILURE


def test_abbreviated_ipam_result_is_valid() -> None:
    raw = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]}
    assert cniresult.to_current(raw) == {"cniVersion": "1.1.0", "ips": raw["ips"]}


# --- from_current ---------------------------------------------------------------------------------

def test_from_current_1_1_0_keeps_everything() -> None:
    assert cniresult.from_current(CURRENT, "1.1.0") == CURRENT


def test_from_current_1_0_0_drops_1_1_interface_fields() -> None:
    out = cniresult.from_current(CURRENT, "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["interfaces"][1] == {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": SANDBOX}
    assert out["ips"] == CURRENT["ips"]
    assert all("version" not in ip for ip in out["ips"])
    assert out["routes"] == CURRENT["routes"]
    assert out["dns"] == CURRENT["dns"]


@pytest.mark.parametrize("ver", ["0.3.0", "0.3.1", "0.4.0"])
def test_from_current_legacy_adds_ip_version(ver: str) -> None:
    out = cniresult.from_current(CURRENT, ver)
    assert out["cniVersion"] == ver
    assert out["ips"] == [
        {"version": "4", "interface": 1, "address": "10.0.0.2/24", "gateway": "10.0.0.1"},
        {"version": "6", "interface": 1, "address": "fd00::2/64", "gateway": "fd00::1"},
    ]
    assert all(set(i) <= {"name", "mac", "sandbox"} for i in out["interfaces"])
    assert out["interfaces"][1]["sandbox"] == SANDBOX


@pytest.mark.parametrize("ver", ["0.1.0", "0.2.0", "2.0.0", ""])
def test_from_current_unsupported_target_is_code_1(ver: str) -> None:
    with pytest.raises(CNIError) as ei:
        cniresult.from_current(CURRENT, ver)
    assert ei.value.code == INCOMPATIBLE_VERSION


@pytest.mark.parametrize("ver", cniversion.SUPPORTED)
def test_from_current_omits_empty_fields(ver: str) -> None:
    cur = {"cniVersion": "1.1.0", "interfaces": [], "ips": [], "routes": [], "dns": {}}
    assert cniresult.from_current(cur, ver) == {"cniVersion": ver}


@pytest.mark.parametrize("ver", cniversion.SUPPORTED)
def test_from_current_omits_empty_dns_members_and_empty_iface_fields(ver: str) -> None:
    cur = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "mac": "", "sandbox": None}],
           "dns": {"nameservers": [], "domain": "", "search": ["s"], "options": []}}
    out = cniresult.from_current(cur, ver)
    assert out["interfaces"] == [{"name": "eth0"}]
    assert out["dns"] == {"search": ["s"]}


@pytest.mark.parametrize("ver", cniversion.SUPPORTED)
def test_from_current_dns_with_only_empty_members_is_omitted(ver: str) -> None:
    cur = {"cniVersion": "1.1.0", "dns": {"nameservers": [], "domain": ""}}
    assert "dns" not in cniresult.from_current(cur, ver)


def test_from_current_ip_without_interface_or_gateway() -> None:
    out = cniresult.from_current({"ips": [{"address": "10.0.0.2/24"}]}, "0.4.0")
    assert out["ips"] == [{"version": "4", "address": "10.0.0.2/24"}]


def test_from_current_interface_index_zero_kept() -> None:
    out = cniresult.from_current({"interfaces": [{"name": "eth0"}], "ips": [{"interface": 0, "address": "10.0.0.2/24"}]}, "1.0.0")
    assert out["ips"] == [{"interface": 0, "address": "10.0.0.2/24"}]


def test_from_current_does_not_mutate_or_share() -> None:
    cur = copy.deepcopy(CURRENT)
    out = cniresult.from_current(cur, "0.4.0")
    out["routes"][0]["gw"] = "changed"
    out["interfaces"][0]["name"] = "changed"
    out["ips"][0]["address"] = "changed"
    assert cur == CURRENT


@pytest.mark.parametrize("ver", cniversion.SUPPORTED)
def test_round_trip_through_every_supported_version(ver: str) -> None:
    back = cniresult.to_current(cniresult.from_current(CURRENT, ver))
    expected = copy.deepcopy(CURRENT)
    if ver != "1.1.0":
        for iface in expected["interfaces"]:
            for k in ("mtu", "socketPath", "pciID"):
                iface.pop(k, None)
    assert back == expected


@pytest.mark.parametrize("ver", cniversion.SUPPORTED)
def test_from_current_output_is_json_serialisable(ver: str) -> None:
    out = cniresult.from_current(CURRENT, ver)
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize("address,fam", [("10.0.0.1", "4"), ("10.0.0.1/8", "4"), ("fd00::1", "6"), ("::ffff:1.2.3.4/96", "6")])
def test_family(address: str, fam: str) -> None:
    assert cniresult.family(address) == fam
