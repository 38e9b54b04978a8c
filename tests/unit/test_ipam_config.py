"""meta-ipam configuration: every field, and messages that name the network and the field."""
from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from delegates._plugin import PluginArgs
from meta.cni.errors import INVALID_CONFIG, CNIError
from meta.ipam import config, plugin
from meta.ipam.config import ConfigError, PoolSpec


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def parse(**ipam: Any) -> config.IpamConf:
    return config.parse({"type": "meta-ipam", **ipam}, "blue")


def error(**ipam: Any) -> str:
    with pytest.raises(ConfigError) as e:
        parse(**ipam)
    return str(e.value)


def test_minimal_cidr_defaults() -> None:
    c = parse(range="10.232.0.0/24")
    assert c.network == "blue" and c.pool.network_name == "blue"
    (r,) = c.pool.ranges
    assert (ip(str(r.network.network_address)), r.first, r.last) == (ip("10.232.0.0"), int(ip("10.232.0.1")), int(ip("10.232.0.254")))
    assert r.gateway is None and r.excluded == ()
    assert c.routes == () and c.dns == {} and c.sticky is False
    assert (c.node_name, c.data_dir, c.kubeconfig, c.api_timeout) == (None, "/var/lib/cni/meta-ipam", None, 10.0)
    assert c.pool.data() == {"pool": "blue", "ranges": ["10.232.0.0/24"], "blockPrefix": {"4": 26, "6": 122}}


def test_every_field() -> None:
    c = parse(range="10.232.1.10-10.232.1.200/24", range_start="10.232.1.20", range_end="10.232.1.100",
              exclude=["10.232.1.30", "10.232.1.40/30", "10.232.1.50-10.232.1.52"], gateway=["10.232.1.1", "fd00:232:1::1"],
              ipRanges=[{"range": "fd00:232:1::/64", "exclude": ["fd00:232:1::/120"]},
                        {"range": "10.232.2.0/24", "gateway": "10.232.2.254", "range_end": "10.232.2.99"}],
              routes=[{"dst": "0.0.0.0/0"}, {"dst": "192.0.2.0/24", "gw": "10.232.1.1"}],
              dns={"nameservers": ["10.232.1.1"], "domain": "x", "search": ["a"], "options": ["ndots:2"]},
              network_name="shared", block_size={"4": 28, "6": 120}, sticky=True, nodeName="n1",
              dataDir="/tmp/x", kubeconfig="/etc/k.conf", apiTimeout=2.5)
    r4, r6, r4b = c.pool.ranges
    assert r4.canonical() == "10.232.1.20-10.232.1.100/24 exclude 10.232.1.1,10.232.1.30,10.232.1.40-10.232.1.43,10.232.1.50-10.232.1.52"
    assert r4.gateway == ip("10.232.1.1")
    assert r6.gateway == ip("fd00:232:1::1")  # the top-level gateway of that family
    assert r6.canonical() == "fd00:232:1::/64 exclude fd00:232:1::1-fd00:232:1::ff"
    assert r4b.gateway == ip("10.232.2.254") and r4b.canonical().startswith("10.232.2.1-10.232.2.99/24")
    assert c.routes == ({"dst": "0.0.0.0/0"}, {"dst": "192.0.2.0/24", "gw": "10.232.1.1"})
    assert c.dns["options"] == ["ndots:2"]
    assert c.pool.network_name == "shared" and dict(c.pool.block_prefix) == {4: 28, 6: 120}
    assert c.pool.prefix_of(r4) == 28 and c.pool.prefix_of(r6) == 120
    assert (c.sticky, c.node_name, c.data_dir, c.kubeconfig, c.api_timeout) == (True, "n1", "/tmp/x", "/etc/k.conf", 2.5)


def test_block_prefix_is_never_larger_than_the_network() -> None:
    c = parse(range="10.232.3.0/28")
    assert c.pool.prefix_of(c.pool.ranges[0]) == 28


@pytest.mark.parametrize("ipam, message", [
    ({}, "ipam.range: missing: give a range or ipRanges"),
    ({"range_start": "10.232.0.5"}, "ipam.range: missing (range_start, range_end and exclude narrow a range)"),
    ({"range": "10.232.0.0"}, "ipam.range: '10.232.0.0' is not a CIDR or first-last/prefix"),
    ({"range": "10.232.0.300/24"}, "ipam.range: '10.232.0.300/24' is not a CIDR or first-last/prefix"),
    ({"range": "10.232.0.5/24"}, "ipam.range: 10.232.0.5/24 has host bits set: write 10.232.0.0/24 with range_start "
                                 "10.232.0.5, or 10.232.0.5-10.232.0.254/24"),
    ({"range": "10.232.0.0/31"}, "ipam.range: 10.232.0.0/31 is too small to allocate from (at most /30)"),
    ({"range": "10.232.0.9-10.232.0.5/24"}, "ipam.range: 10.232.0.9-10.232.0.5/24: the first address comes after the last one"),
    ({"range": "10.232.0.0-10.232.0.5/24"}, "ipam.range: 10.232.0.0 is the network address of 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "range_start": "10.232.1.1"}, "ipam.range_start: 10.232.1.1 is not in 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "range_end": "10.232.0.255"}, "ipam.range_end: 10.232.0.255 is the broadcast address of 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "range_start": "10.232.0.9", "range_end": "10.232.0.8"},
     "ipam.range_end: the range is empty (10.232.0.9 comes after 10.232.0.8)"),
    ({"range": "10.232.0.0/24", "range_start": "nope"}, "ipam.range_start: 'nope' is not an IP address"),
    ({"range": "10.232.0.0/24", "exclude": ["10.232.9.0/24"]}, "ipam.exclude[0]: 10.232.9.0/24 is outside range network 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "exclude": ["10.232.0.1/24"]}, "ipam.exclude[0]: '10.232.0.1/24' is not a CIDR"),
    ({"range": "10.232.0.0/24", "exclude": ["10.232.0.0/24"]}, "ipam.exclude: excludes every address of 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "gateway": "10.232.1.1"}, "ipam.gateway: 10.232.1.1 is in none of the ranges"),
    ({"range": "10.232.0.0/24", "gateway": "10.232.0.255"}, "ipam.gateway: 10.232.0.255 is the broadcast address of 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "gateway": ["10.232.0.1", "10.232.0.2"]}, "ipam.gateway: 10.232.0.1, 10.232.0.2 are all in 10.232.0.0/24"),
    ({"range": "10.232.0.0/24", "ipRanges": [{"range": "10.232.0.128/25"}]},
     "ipam.ipRanges[0].range: 10.232.0.128/25 overlaps 10.232.0.0/24 of range"),
    ({"ipRanges": [{"range": "fd00::/64"}, {"range": "fd00::/120", "range_start": "fd01::1"}]},
     "ipam.ipRanges[1].range_start: fd01::1 is not in fd00::/120"),
    ({"range": "10.232.0.0/24", "block_size": {"4": 20}}, "ipam.block_size.4: must be a prefix length from 22 to 32, got 20"),
    ({"range": "10.232.0.0/24", "block_size": {"5": 26}}, 'ipam.block_size.5: unknown family: use "4" or "6"'),
    ({"range": "10.232.0.0/24", "block_size": 26}, "ipam.block_size: must be an object of prefix lengths"),
    ({"range": "10.232.0.0/24", "routes": [{"dst": "nope"}]}, "ipam.routes[0].dst: 'nope' is not a CIDR"),
    ({"range": "10.232.0.0/24", "routes": [{"dst": "0.0.0.0/0", "gw": "10.232.0.7"}]},
     "ipam.routes[0].gw: 10.232.0.7 is inside range 10.232.0.0/24 and could be handed to a pod: make it the gateway or exclude it"),
    ({"range": "10.232.0.0/24", "sticky": "yes"}, "ipam.sticky: must be true or false, got 'yes'"),
    ({"range": "10.232.0.0/24", "apiTimeout": 0}, "ipam.apiTimeout: must be a number of seconds > 0, got 0"),
])
def test_bad_fields_are_named(ipam: dict[str, Any], message: str) -> None:
    assert error(**ipam).startswith(message)


def test_route_gateway_that_is_excluded_or_the_gateway_is_fine() -> None:
    c = parse(range="10.232.0.0/24", gateway="10.232.0.1", exclude=["10.232.0.254"],
              routes=[{"dst": "0.0.0.0/0", "gw": "10.232.0.1"}, {"dst": "192.0.2.0/24", "gw": "10.232.0.254"}])
    assert len(c.routes) == 2


def test_pool_agreement_ignores_order_and_how_an_address_was_kept_out() -> None:
    a = parse(range="10.232.0.0/24", gateway="10.232.0.1", ipRanges=[{"range": "fd00::/120"}], network_name="p").pool
    b = parse(ipRanges=[{"range": "fd00::/120"}, {"range": "10.232.0.0/24", "exclude": ["10.232.0.1"]}], network_name="p").pool
    c = parse(range="10.232.0.0/24", network_name="p", ipRanges=[{"range": "fd00::/120"}]).pool
    d = parse(range="10.232.0.0/24", gateway="10.232.0.1", ipRanges=[{"range": "fd00::/120"}], network_name="p",
              block_size={"4": 28}).pool
    assert a.agrees_with(b.data()) and b.agrees_with(a.data())
    assert not a.agrees_with(c.data())
    assert not a.agrees_with(d.data())
    v4 = parse(range="10.232.0.0/24", network_name="p").pool
    assert v4.agrees_with(parse(range="10.232.0.0/24", network_name="p", block_size={"6": 120}).pool.data())


# --- the request --------------------------------------------------------------------------------------------


def request(cni_args: str = "", runtime_config: dict[str, Any] | None = None, args_cni: dict[str, Any] | None = None,
            sticky: bool = False) -> config.Request:
    from meta.cni import args as cniargs

    return config.parse_request(container_id="c1", ifname="net1", network="blue", cni_args=cniargs.parse(cni_args),
                                runtime_config=runtime_config or {}, args_cni=args_cni or {}, sticky=sticky)


def test_owner_from_cni_args() -> None:
    r = request("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0;K8S_POD_UID=u-1")
    assert r.owner == config.Owner("c1", "net1", "ns1", "web-0", "u-1", "blue")
    assert r.static == () and r.claim is None
    assert r.owner.entry("n1", static=True, claim="x") == {
        "containerID": "c1", "ifname": "net1", "podNamespace": "ns1", "podName": "web-0", "podUID": "u-1",
        "network": "blue", "node": "n1", "static": True, "claim": "x", "released": False}


def test_static_addresses_from_every_source() -> None:
    r = request("IP=10.232.0.5,fd00::5", runtime_config={"ips": ["10.232.0.7/24"]}, args_cni={"ips": ["10.232.0.8", "10.232.0.7"]})
    assert r.static == (ip("10.232.0.7"), ip("10.232.0.8"), ip("10.232.0.5"), ip("fd00::5"))


def test_bad_static_address_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^runtimeConfig.ips\[0\]: 'x' is not an IP address"):
        request(runtime_config={"ips": ["x/24"]})


def test_claims() -> None:
    pod = "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-3"
    assert request(pod, args_cni={"ipam-claim-reference": "vm-a.net"}).claim == "ipamclaim:ns1/vm-a.net"
    assert request(pod, sticky=True).claim == "ns1/web-3"
    assert request(pod).claim is None  # not sticky
    assert request("K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-7d9c-x2k4q", sticky=True).claim is None  # no ordinal
    assert request("K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-03", sticky=True).claim is None  # not an ordinal


# --- through the plugin: the JSON Schema, and the network named in every message ----------------------------


def plugin_args(ipam: Any, name: str = "blue") -> PluginArgs:
    conf = {"cniVersion": "1.0.0", "name": name, "type": "bridge", "ipam": ipam}
    return PluginArgs(command="ADD", container_id="c1", netns="", ifname="net1", cni_args=(), path=(),
                      config=conf, stdin=json.dumps(conf).encode())


@pytest.mark.parametrize("ipam, message", [
    ({"type": "meta-ipam", "range": "10.232.0.0/24", "rangeStart": "10.232.0.5"}, 'meta-ipam: network "blue": ipam.rangeStart: unknown field'),
    ({"type": "meta-ipam", "range": 24}, "meta-ipam: network \"blue\": ipam.range: 24 is not of type 'string'"),
    ({"type": "meta-ipam", "ipRanges": [{"range": "fd00::/64", "gw": "fd00::1"}]}, 'meta-ipam: network "blue": ipam.ipRanges[0].gw: unknown field'),
    ({"type": "meta-ipam", "range": "10.232.0.0/24", "dataDir": "relative"}, "meta-ipam: network \"blue\": ipam.dataDir: 'relative' does not match"),
    ({"type": "meta-ipam", "range": "10.232.0.0/24", "gateway": "10.232.9.1"}, 'meta-ipam: network "blue": ipam.gateway: 10.232.9.1 is in none of the ranges'),
    ("nope", "meta-ipam: network \"blue\": ipam: 'nope' is not of type 'object'"),
])
def test_plugin_messages_name_network_and_field(ipam: Any, message: str) -> None:
    with pytest.raises(CNIError) as e:
        plugin.load(plugin_args(ipam))
    assert e.value.code == INVALID_CONFIG
    assert e.value.msg.startswith(message), e.value.msg


def test_network_name_defaults_to_the_network() -> None:
    conf, req = plugin.load(plugin_args({"type": "meta-ipam", "range": "10.232.0.0/24"}, name="nad-x"))
    assert conf.pool.network_name == "nad-x" and req.owner.container_id == "c1"


def test_poolspec_data_is_the_pool_object_shape() -> None:
    spec = PoolSpec(network_name="p", ranges=parse(range="10.232.0.0/24").pool.ranges)
    assert spec.data() == {"pool": "p", "ranges": ["10.232.0.0/24"], "blockPrefix": {"4": 26, "6": 122}}
