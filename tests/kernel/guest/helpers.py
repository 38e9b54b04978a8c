"""Helpers of the guest lane (run only inside the QEMU guest, see ../conftest.py): running the reference
plugin and ours the same way, a normalised snapshot of what a plugin left in a namespace, and the
parity comparison of one lifecycle.

Links are named `mck*`; subnets are inside 10.237.0.0/16 (fd10:237::/32 for IPv6), one per test case.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from meta.netns import entered
from tests.conftest import REFERENCE_PLUGINS, PluginRun, run_plugin
from tests.conftest import host_local_reservations as ip_files

OURS = Path(sys.prefix) / "bin"
IFNAME = "net1"
VETH_NAME = re.compile(r"^veth[0-9a-f]{8}$")  # the random host end of a veth (pkg/ip RandomVethName)


def ip_json(netns: str | None, *args: str) -> Any:
    cmd = ["ip", "-j", *(["-n", Path(netns).name] if netns else []), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def bridge_json(*args: str) -> Any:
    out = subprocess.run(["bridge", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def link_names(netns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(netns, "link")}


def mac_of(name: str, netns: str | None = None) -> str:
    return str(ip_json(netns, "link", "show", "dev", name)[0]["address"])


def cni(binary: Path, command: str, config: dict[str, Any], netns: str, *, ifname: str = IFNAME,
        cid: str = "mck-c1") -> PluginRun:
    return run_plugin(binary, command, config, container_id=cid, netns=netns, ifname=ifname,
                      path=str(REFERENCE_PLUGINS))


def ok(run: PluginRun, what: str = "") -> Any:
    assert run.rc == 0, f"{what} rc {run.rc}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    return run.json


def failed(run: PluginRun) -> dict[str, Any]:
    assert run.rc != 0, f"expected a failure, got rc 0: {run.stdout}"
    err = run.json
    assert isinstance(err, dict) and "code" in err and "msg" in err, run.stdout
    return err


def with_prev(config: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return dict(config, prevResult=result)


def host_local(data_dir: Path, *subnets: str, **extra: Any) -> dict[str, Any]:
    return {"type": "host-local", "ranges": [[{"subnet": s}] for s in subnets], "dataDir": str(data_dir), **extra}


def read_sysctl(netns: str, key: str) -> str | None:
    with entered(netns):
        try:
            return Path("/proc/sys", key).read_text().strip()
        except OSError:
            return None


def link_local_host_route(route: dict[str, Any]) -> bool:
    """The kernel's local route of an IPv6 link-local address: it appears once that address passed DAD, which
    is timing, not configuration."""
    return route.get("type") == "local" and str(route.get("dst", "")).startswith("fe80:")


def _sorted(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda d: json.dumps(d, sort_keys=True))


# compared as they are (besides name, flags, MAC, kind and kind-specific data)
LINK_KEYS = ("mtu", "min_mtu", "max_mtu", "operstate", "link_type", "txqlen", "qdisc", "promiscuity", "allmulti",
             "group", "num_tx_queues", "num_rx_queues", "gso_max_size", "gso_max_segs", "inet6_addr_gen_mode")


def snapshot(netns: str, *, random_mac: bool, ifname: str = IFNAME) -> dict[str, Any]:
    """What a plugin left in the namespace, with the values that legitimately differ between two runs
    (random MACs and the IPv6 link-local addresses derived from them) replaced by placeholders."""
    link = ip_json(netns, "-d", "link", "show", "dev", ifname)[0]
    info = link.get("linkinfo") or {}
    addrs = []
    for a in ip_json(netns, "addr", "show", "dev", ifname)[0].get("addr_info", []):
        local = a.get("local")
        if random_mac and a.get("family") == "inet6" and a.get("scope") == "link":
            local = "<link-local>"
        addrs.append({"family": a.get("family"), "local": local, "prefixlen": a.get("prefixlen"),
                      "scope": a.get("scope"), "broadcast": a.get("broadcast"), "label": a.get("label"),
                      "noprefixroute": a.get("noprefixroute"), "dadfailed": a.get("dadfailed")})
    routes = [dict(r, family=fam) for fam in ("-4", "-6") for r in ip_json(netns, fam, "route", "show", "table", "all")
              if not link_local_host_route(r)]
    sysctls = {key.format(ifname): read_sysctl(netns, key.format(ifname)) for key in (
        "net/ipv4/conf/{}/arp_notify", "net/ipv6/conf/{}/ndisc_notify", "net/ipv6/conf/{}/disable_ipv6",
        "net/ipv6/conf/{}/keep_addr_on_down", "net/ipv6/conf/{}/accept_dad", "net/ipv6/conf/lo/disable_ipv6")}
    return {
        "link": {
            "ifname": link.get("ifname"), "flags": sorted(link.get("flags", [])),
            **{k: link.get(k) for k in LINK_KEYS},
            "address": "<random>" if random_mac else link.get("address"),
            # a veth's peer is new each time; a macvlan/ipvlan master is the same link
            "link_index": "<peer>" if info.get("info_kind") == "veth" else link.get("link_index"),
            "link_netnsid": link.get("link_netnsid"),
            "kind": info.get("info_kind"), "info_data": info.get("info_data"),
        },
        "addrs": _sorted(addrs),
        "routes": _sorted(routes),
        "sysctls": sysctls,
    }


def normalised_result(result: dict[str, Any], netns: str, *, random_mac: bool) -> dict[str, Any]:
    """A CNI result with the sandbox path (checked here) and, for random MACs, the MAC replaced. An empty
    `dns` is dropped: the Debian reference (libcni types v1.1.2) prints `"dns": {}`, v1.2.0 and later omit
    it, as meta-cni does."""
    result = json.loads(json.dumps(result))
    if result.get("dns") == {}:
        del result["dns"]
    for iface in result.get("interfaces", []):
        if VETH_NAME.match(iface.get("name", "")):
            iface["name"] = "<veth>"
        if "sandbox" in iface:
            assert iface["sandbox"] == netns, iface
            iface["sandbox"] = "<netns>"
        if random_mac and "mac" in iface:
            iface["mac"] = "<random>"
    return result

# Parity: one lifecycle (ADD, snapshot, CHECK, DEL, DEL again) run the same way through the reference
# plugin and through ours, each in a fresh namespace with its own host-local dataDir, one after the other
# (ipvlan refuses the same address on two slaves of one master).


@attrs.frozen
class Side:
    result: dict[str, Any]
    state: dict[str, Any]


def lifecycle(binary: Path, config: dict[str, Any], netns: str, data_dir: Path, *, random_mac: bool,
              check: bool = True, del_twice: bool = False, after_add: Callable[[str], None] | None = None) -> Side:
    result = ok(cni(binary, "ADD", config, netns), f"{binary} ADD")
    state = snapshot(netns, random_mac=random_mac)
    if after_add:
        after_add(netns)
    if check:
        ok(cni(binary, "CHECK", with_prev(config, result), netns), f"{binary} CHECK")
    ok(cni(binary, "DEL", with_prev(config, result), netns), f"{binary} DEL")
    assert IFNAME not in link_names(netns), f"{binary.name}: {IFNAME} left after DEL"
    assert ip_files(data_dir) == [], f"{binary.name}: addresses not released: {ip_files(data_dir)}"
    if del_twice:
        ok(cni(binary, "DEL", with_prev(config, result), netns), f"{binary} second DEL")
    return Side(normalised_result(result, netns, random_mac=random_mac), state)


def compare(reference: Path, ours: Path, make_config: Callable[[Path], dict[str, Any]],
            netns_factory: Callable[[], str], tmp_path: Path, *, random_mac: bool, check: bool = True,
            check_reference: bool = True, del_twice: bool = False,
            after_add: Callable[[str], None] | None = None) -> tuple[Side, Side]:
    """`check_reference=False` where the reference's CHECK is known broken (ours is still checked);
    `after_add(netns)` runs on each side right after ADD (to capture more state)."""
    sides = []
    for binary, sub in ((reference, "ref"), (ours, "ours")):
        data_dir = tmp_path / sub
        sides.append(lifecycle(binary, make_config(data_dir), netns_factory(), data_dir, random_mac=random_mac,
                               check=check and (check_reference or binary == ours), del_twice=del_twice,
                               after_add=after_add))
    ref, our = sides
    assert our.result == ref.result
    assert comparable(our.state) == comparable(ref.state)
    return ref, our


# Sysctls that upstream sets (and ours, following it) but the Debian reference (plugins 1.1.1) does not:
# ndisc_notify (macvlan/ipvlan, upstream since v1.2). The tests assert ours' value directly.
VERSION_DELTA_SYSCTLS = ("ndisc_notify",)


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    sysctls = {k: v for k, v in state["sysctls"].items() if k.rsplit("/", 1)[-1] not in VERSION_DELTA_SYSCTLS}
    return dict(state, sysctls=sysctls)
