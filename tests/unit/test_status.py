"""The network-status annotation built from ADD results (meta/status.py)."""
from __future__ import annotations

from typing import Any

from meta import status
from meta.nad import NetworkConfig
from meta.plan import Attachment

SANDBOX = "/var/run/netns/pod"
NET = NetworkConfig(name="n", cni_version="1.0.0", plugins=({"type": "bridge"},), origin="NAD ns/n")


def att(name: str = "ns/n", ifname: str = "net1", is_default: bool = False, device_id: str | None = None) -> Attachment:
    return Attachment(name=name, ifname=ifname, network=NET, is_default=is_default, device_id=device_id)


BRIDGE_RESULT: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:00:00:00:00:01"},
        {"name": "veth1", "mac": "aa:00:00:00:00:02"},
        {"name": "net1", "mac": "aa:00:00:00:00:03", "sandbox": SANDBOX},
    ],
    "ips": [
        {"interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
        {"interface": 2, "address": "fd00:1::5/64", "gateway": "fd00:1::1"},
        {"interface": 0, "address": "10.1.0.1/24"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00:1::fe"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.9"}],
    "dns": {"nameservers": ["10.1.0.53"], "domain": "", "search": ["svc"], "options": []},
}


def test_entry_full() -> None:
    e = status.entry(att(), BRIDGE_RESULT)
    assert e == {
        "name": "ns/n",
        "interface": "net1",
        "ips": ["10.1.0.5", "fd00:1::5"],
        "mac": "aa:00:00:00:00:03",
        "default": False,
        "dns": {"nameservers": ["10.1.0.53"], "search": ["svc"]},
        "gateway": ["10.1.0.1", "fd00:1::fe"],
    }


def test_entry_default_flag() -> None:
    assert status.entry(att(is_default=True, ifname="eth0"), None)["default"] is True
    assert status.entry(att(), None)["default"] is False


def test_entry_without_result_is_minimal() -> None:
    assert status.entry(att(), None) == {"name": "ns/n", "interface": "net1", "default": False}
    assert status.entry(att(), {}) == {"name": "ns/n", "interface": "net1", "default": False}


def test_interface_chosen_by_sandbox_and_name() -> None:
    res = {"interfaces": [{"name": "other", "mac": "aa:00:00:00:00:09", "sandbox": SANDBOX},
                          {"name": "net1", "mac": "aa:00:00:00:00:03", "sandbox": SANDBOX},
                          {"name": "net1", "mac": "aa:00:00:00:00:04"}],
           "ips": [{"interface": 0, "address": "10.0.0.9/24"}, {"interface": 1, "address": "10.0.0.3/24"}]}
    e = status.entry(att(), res)
    assert (e["interface"], e["mac"], e["ips"]) == ("net1", "aa:00:00:00:00:03", ["10.0.0.3"])


def test_interface_falls_back_to_first_sandbox() -> None:
    # Some plugins rename: the sandbox interface is still the pod's one.
    res = {"interfaces": [{"name": "host0"}, {"name": "renamed", "sandbox": SANDBOX, "mac": "aa:00:00:00:00:05"}],
           "ips": [{"interface": 1, "address": "10.0.0.5/24"}, {"interface": 0, "address": "10.0.0.1/24"}]}
    e = status.entry(att(), res)
    assert (e["interface"], e["mac"], e["ips"]) == ("renamed", "aa:00:00:00:00:05", ["10.0.0.5"])


def test_no_sandbox_interface_keeps_planned_name_and_all_ips() -> None:
    res = {"interfaces": [{"name": "host0", "mac": "aa:00:00:00:00:01"}],
           "ips": [{"interface": 0, "address": "10.0.0.5/24"}, {"address": "fd00::5/64"}]}
    e = status.entry(att(), res)
    assert e["interface"] == "net1"
    assert "mac" not in e
    assert e["ips"] == ["10.0.0.5", "fd00::5"]


def test_ips_without_interface_index_belong_to_chosen_interface() -> None:
    res = {"interfaces": [{"name": "net1", "sandbox": SANDBOX}], "ips": [{"address": "10.0.0.5/32"}]}
    assert status.entry(att(), res)["ips"] == ["10.0.0.5"]


def test_ips_plain_address_without_prefix() -> None:
    res = {"ips": [{"address": "10.0.0.5"}, {"address": "fd00::5"}]}
    assert status.entry(att(), res)["ips"] == ["10.0.0.5", "fd00::5"]


def test_empty_mac_omitted() -> None:
    res = {"interfaces": [{"name": "net1", "sandbox": SANDBOX, "mac": ""}]}
    assert "mac" not in status.entry(att(), res)


def test_dns_only_known_nonempty_keys() -> None:
    res = {"dns": {"nameservers": [], "domain": "d", "x": "y", "options": ["o"]}}
    assert status.entry(att(), res)["dns"] == {"domain": "d", "options": ["o"]}
    assert "dns" not in status.entry(att(), {"dns": {"nameservers": []}})


def test_gateway_v4_from_ip_gateway_when_route_has_none() -> None:
    res = {"ips": [{"address": "fd00::5/64", "gateway": "fd00::1"}, {"address": "10.0.0.5/24", "gateway": "10.0.0.1"}],
           "routes": [{"dst": "0.0.0.0/0"}]}
    assert status.entry(att(), res)["gateway"] == ["10.0.0.1"]


def test_gateway_v6_from_ip_gateway_when_route_has_none() -> None:
    res = {"ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}, {"address": "fd00::5/64", "gateway": "fd00::1"}],
           "routes": [{"dst": "::/0"}]}
    assert status.entry(att(), res)["gateway"] == ["fd00::1"]


def test_gateway_only_from_default_routes_and_deduplicated() -> None:
    res = {"routes": [{"dst": "10.0.0.0/8", "gw": "10.0.0.1"}, {"dst": "0.0.0.0/0", "gw": "10.0.0.254"},
                      {"dst": "0.0.0.0/0", "gw": "10.0.0.254"}]}
    assert status.entry(att(), res)["gateway"] == ["10.0.0.254"]


def test_no_gateway_without_default_route() -> None:
    res = {"ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}], "routes": [{"dst": "10.0.0.0/8"}]}
    assert "gateway" not in status.entry(att(), res)


def test_default_route_without_any_gateway() -> None:
    res = {"ips": [{"address": "10.0.0.5/24"}], "routes": [{"dst": "0.0.0.0/0"}]}
    assert "gateway" not in status.entry(att(), res)


def test_device_info() -> None:
    info = {"type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:01:00.1"}}
    assert status.entry(att(), None, info)["device-info"] == info
    assert "device-info" not in status.entry(att(), None, None)
    assert "device-info" not in status.entry(att(), None, {})


def test_build_one_entry_per_attachment() -> None:
    atts = [att("cluster", "eth0", True), att("ns/a", "net1"), att("ns/b", "net2")]
    out = status.build(atts, [BRIDGE_RESULT, None, {"ips": [{"address": "10.2.0.5/24"}]}], [None, None, {"type": "pci"}])
    assert [e["name"] for e in out] == ["cluster", "ns/a", "ns/b"]
    assert [e["default"] for e in out] == [True, False, False]
    assert out[1] == {"name": "ns/a", "interface": "net1", "default": False}
    assert out[2]["ips"] == ["10.2.0.5"] and out[2]["device-info"] == {"type": "pci"}


def test_device_info_for() -> None:
    written = {"type": "pci", "pci": {"pci-address": "X"}}
    assert status.device_info_for(att(device_id="0000:01:00.1"), written) == written
    assert status.device_info_for(att(device_id="0000:01:00.1"), None) == {
        "type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:01:00.1"}}
    assert status.device_info_for(att(), None) is None
    assert status.device_info_for(att(), {}) is None
