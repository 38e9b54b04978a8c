"""Reference plugin versus ours, case by case: the same config, container ID, network name, bridge or
master name and subnets; the reference first, then ours, each in its own fresh pair of namespaces.

A "host" namespace stands in for the host: the plugin runs inside it (`ip netns exec`), so its bridge,
host veth, forwarding sysctls and iptables rules start from the same clean slate in both runs (with
`net.ipv4.ip_forward=0`, so that enabling forwarding is visible) and never touch the real host or a
concurrent test run. The container namespace is CNI_NETNS. host-local gets a separate dataDir per run,
so both runs are given the same first address.

Per case the test compares: the ADD exit code and result (normalised: MACs, host veth name, sandbox
path), the state after ADD (snapshot.py, nftables included), the DEL exit code and output, the state
after DEL, and a second DEL. Every difference is listed in the assertion message.

Besides the cases: bridge macspoofchk over several attachments in one host namespace (the nftables
ruleset after every step), and a check that the reference has no vlanTrunk (so no parity for it).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import REFERENCE_PLUGINS, PluginRun
from tests.parity.snapshot import Normaliser, diff, nftables_state, ns_name, snapshot

pytestmark = pytest.mark.integration

OURS = {"bridge": Path(sys.prefix) / "bin" / "meta-bridge", "macvlan": Path(sys.prefix) / "bin" / "meta-macvlan"}
IFNAME = "eth0"


@attrs.frozen
class Case:
    id: str
    plugin: str                      # "bridge" | "macvlan"
    ipam: str = "4"                  # "4", "6", "46" (dual stack) or "l2" (ipam {})
    version: str = "1.0.0"
    conf: dict[str, Any] = attrs.field(factory=dict)  # extra plugin fields
    mac: bool = False                # runtimeConfig.mac with capabilities {"mac": true}
    routes: bool = False             # host-local returns a default and a static route per family
    dns: bool = False                # plugin-level dns
    pre_bridge: bool = False         # the bridge exists before ADD with another address of the subnet
    expect_ok: bool = True           # the reference's ADD succeeds
    vlan_filtering: bool = False     # ... only if the kernel has bridge VLAN filtering
    no_nft: bool = False             # the plugin's PATH lacks the nft command


MACVLAN = [
    Case("macvlan-bridge-v4", "macvlan", conf={"mode": "bridge"}),
    Case("macvlan-private-v4", "macvlan", conf={"mode": "private"}),
    Case("macvlan-vepa-v4", "macvlan", conf={"mode": "vepa"}),
    Case("macvlan-passthru-v4", "macvlan", conf={"mode": "passthru"}),
    Case("macvlan-default-mode-v4", "macvlan"),
    Case("macvlan-bridge-v6", "macvlan", "6", conf={"mode": "bridge"}),
    Case("macvlan-bridge-dual", "macvlan", "46", conf={"mode": "bridge"}),
    Case("macvlan-mtu1400-v4", "macvlan", conf={"mode": "bridge", "mtu": 1400}),
    Case("macvlan-mtu-above-master-error", "macvlan", conf={"mode": "bridge", "mtu": 9000}, expect_ok=False),
    Case("macvlan-runtimeconfig-mac-v4", "macvlan", conf={"mode": "bridge"}, mac=True),
    Case("macvlan-l2only", "macvlan", "l2", conf={"mode": "bridge"}),
    Case("macvlan-routes-dns-dual", "macvlan", "46", conf={"mode": "bridge"}, routes=True, dns=True),
    Case("macvlan-bridge-v4-0.4.0", "macvlan", version="0.4.0", conf={"mode": "bridge"}),
    Case("macvlan-bridge-dual-0.4.0", "macvlan", "46", version="0.4.0", conf={"mode": "bridge"}),
]

BRIDGE = [
    Case("bridge-v4", "bridge"),
    Case("bridge-v6", "bridge", "6"),
    Case("bridge-dual", "bridge", "46"),
    Case("bridge-mtu1400-v4", "bridge", conf={"mtu": 1400}),
    Case("bridge-runtimeconfig-mac-v4", "bridge", mac=True),
    Case("bridge-hairpin-v4", "bridge", conf={"hairpinMode": True}),
    Case("bridge-promisc-v4", "bridge", conf={"promiscMode": True}),
    Case("bridge-hairpin-and-promisc-error", "bridge", conf={"hairpinMode": True, "promiscMode": True},
         expect_ok=False),
    Case("bridge-isGateway-v4", "bridge", conf={"isGateway": True}),
    Case("bridge-isGateway-dual", "bridge", "46", conf={"isGateway": True}),
    Case("bridge-isDefaultGateway-v4", "bridge", conf={"isDefaultGateway": True}),
    Case("bridge-isDefaultGateway-dual", "bridge", "46", conf={"isDefaultGateway": True}),
    # 1.1.1 adds its default route next to IPAM's and fails with "file exists" (fixed upstream later).
    Case("bridge-isDefaultGateway-ipam-default-route-error", "bridge", conf={"isDefaultGateway": True}, routes=True,
         expect_ok=False),
    Case("bridge-ipMasq-v4", "bridge", conf={"isGateway": True, "ipMasq": True}),
    Case("bridge-ipMasq-dual", "bridge", "46", conf={"isGateway": True, "ipMasq": True}),
    # Without CONFIG_BRIDGE_VLAN_FILTERING (as the usual test machine's kernel) creating the bridge fails:
    # then both must fail alike.
    Case("bridge-vlan100-v4", "bridge", conf={"vlan": 100}, vlan_filtering=True),
    Case("bridge-forceAddress-v4", "bridge", conf={"isGateway": True, "forceAddress": True}, pre_bridge=True),
    Case("bridge-address-conflict-error", "bridge", conf={"isGateway": True}, pre_bridge=True, expect_ok=False),
    Case("bridge-l2only", "bridge", "l2"),
    Case("bridge-enabledad-false-v6", "bridge", "6", conf={"enabledad": False}),
    Case("bridge-enabledad-true-v6", "bridge", "6", conf={"enabledad": True}),
    Case("bridge-routes-dns-dual", "bridge", "46", routes=True, dns=True),
    Case("bridge-isGateway-v4-0.4.0", "bridge", version="0.4.0", conf={"isGateway": True}),
    Case("bridge-dual-0.4.0", "bridge", "46", version="0.4.0"),
    # macspoofchk: the nftables rules (bridge family, table nat) are part of the compared state.
    Case("bridge-macspoofchk-v4", "bridge", conf={"macspoofchk": True}),
    Case("bridge-macspoofchk-isGateway-ipMasq-dual", "bridge", "46",
         conf={"macspoofchk": True, "isGateway": True, "ipMasq": True}),
    Case("bridge-macspoofchk-runtimeconfig-mac-v4", "bridge", conf={"macspoofchk": True}, mac=True),
    Case("bridge-macspoofchk-l2only", "bridge", "l2", conf={"macspoofchk": True}),
    Case("bridge-macspoofchk-hairpin-v4-0.4.0", "bridge", version="0.4.0",
         conf={"macspoofchk": True, "hairpinMode": True}),
    # fails after the spoof check is set up: both remove its rules again
    Case("bridge-macspoofchk-address-conflict-error", "bridge", conf={"macspoofchk": True, "isGateway": True},
         pre_bridge=True, expect_ok=False),
    Case("bridge-macspoofchk-without-nft-error", "bridge", conf={"macspoofchk": True}, expect_ok=False, no_nft=True),
]


@attrs.frozen
class Names:
    """What both runs of one case share."""

    net: str
    cid: str
    bridge: str
    master: str
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network
    mac: str

    @classmethod
    def fresh(cls) -> "Names":
        h = uuid.uuid4().hex
        octet = int(h[:4], 16) % 250 + 1
        return cls(net=f"mcp-{h[:8]}", cid=f"mcp-{h[8:24]}", bridge=f"mcpb{h[:8]}", master=f"mcpm{h[8:16]}",
                   subnet4=ipaddress.ip_network(f"10.236.{octet}.0/24"),
                   subnet6=ipaddress.ip_network(f"fd00:236:0:{octet:x}::/64"),
                   mac="02:36:" + ":".join(h[i:i + 2] for i in range(24, 32, 2)))


def build_config(case: Case, n: Names, data_dir: Path) -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": case.version, "name": n.net, "type": case.plugin}
    if case.plugin == "bridge":
        conf["bridge"] = n.bridge
    else:
        conf["master"] = n.master
    conf.update(case.conf)
    if case.ipam == "l2":
        conf["ipam"] = {}
    else:
        ranges, routes = [], []
        if "4" in case.ipam:
            ranges.append([{"subnet": str(n.subnet4)}])
            routes += [{"dst": "0.0.0.0/0"}, {"dst": "10.236.255.0/24", "gw": str(n.subnet4[254])}]
        if "6" in case.ipam:
            ranges.append([{"subnet": str(n.subnet6)}])
            routes += [{"dst": "::/0"}, {"dst": "fd00:236:ffff::/64", "gw": str(n.subnet6[254])}]
        conf["ipam"] = {"type": "host-local", "ranges": ranges, "dataDir": str(data_dir)}
        if case.routes:
            conf["ipam"]["routes"] = routes
    if case.dns:
        conf["dns"] = {"nameservers": ["10.236.0.53"], "domain": "parity.example", "search": ["parity.example"]}
    if case.mac:
        conf["capabilities"] = {"mac": True}
        conf["runtimeConfig"] = {"mac": n.mac}
    return conf


def exec_plugin(host_netns: str, binary: Path, command: str, config: dict[str, Any], n: Names,
                netns: str, path: str | None = None) -> PluginRun:
    """Exec a CNI plugin as libcni does, with the calling process in the host namespace `host_netns`
    (and PATH `path` if given)."""
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=n.cid, CNI_NETNS=netns, CNI_IFNAME=IFNAME,
               CNI_ARGS="", CNI_PATH=str(REFERENCE_PLUGINS))
    cmd = [str(binary)] if path is None else ["env", f"PATH={path}", str(binary)]
    p = subprocess.run(["ip", "netns", "exec", ns_name(host_netns), *cmd], input=json.dumps(config).encode(),
                       capture_output=True, env=env, timeout=120)
    return PluginRun(p.returncode, p.stdout.decode(), p.stderr.decode())


def output(run: PluginRun, norm: Normaliser) -> Any:
    """A plugin's stdout, parsed when JSON (a result or an error), normalised."""
    try:
        return norm(json.loads(run.stdout)) if run.stdout.strip() else None
    except ValueError:
        return norm(run.stdout)


@attrs.frozen
class Run:
    add: PluginRun
    result: Any
    after_add: dict[str, Any]
    dele: PluginRun
    del_output: Any
    after_del: dict[str, Any]
    del_again: PluginRun


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def run_case(case: Case, n: Names, binary: Path, workdir: Path, netns_factory: Callable[[], str]) -> Run:
    """ADD, snapshot, DEL, snapshot, DEL again, in fresh namespaces; the bridge and master are removed
    at the end, so the next run of the case starts from nothing again."""
    host, cont = netns_factory(), netns_factory()
    h = ns_name(host)
    subprocess.run(["ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)
    ip("-n", h, "link", "set", "lo", "up")
    master = n.master if case.plugin == "macvlan" else None
    bridge = n.bridge if case.plugin == "bridge" else None
    try:
        if master:
            ip("-n", h, "link", "add", master, "type", "veth", "peer", "name", master + "p")
            ip("-n", h, "link", "set", master, "up")
            ip("-n", h, "link", "set", master + "p", "up")
        if case.pre_bridge:
            assert bridge
            ip("-n", h, "link", "add", bridge, "type", "bridge")
            ip("-n", h, "addr", "add", f"{n.subnet4[200]}/{n.subnet4.prefixlen}", "dev", bridge)
            ip("-n", h, "link", "set", bridge, "up")
        data_dir = workdir / "ipam"
        config = build_config(case, n, data_dir)
        keep = {n.mac} if case.mac else None
        snap_args: dict[str, Any] = {"bridge": bridge, "master": master, "ipam_dir": data_dir / n.net, "keep": keep}

        path = None
        if case.no_nft:
            (workdir / "empty-path").mkdir(parents=True)
            path = str(workdir / "empty-path")
        add = exec_plugin(host, binary, "ADD", config, n, cont, path)
        after_add, norm = snapshot(host, cont, IFNAME, **snap_args)
        result = output(add, norm)

        del_conf = dict(config)
        if add.rc == 0 and add.json is not None:
            del_conf["prevResult"] = add.json  # as libcni passes the cached result on DEL
        dele = exec_plugin(host, binary, "DEL", del_conf, n, cont, path)
        # Labels of the ADD state: a leftover host veth shows as <host-veth>.
        after_del, _ = snapshot(host, cont, IFNAME, **snap_args, base=norm)
        del_again = exec_plugin(host, binary, "DEL", del_conf, n, cont, path)
        return Run(add, result, after_add, dele, output(dele, norm), after_del, del_again)
    finally:
        for name in (bridge, master):
            if name:
                subprocess.run(["ip", "-n", h, "link", "del", name], capture_output=True)


@attrs.frozen
class Kept:
    """A difference from Debian's 1.1.1 reference kept on purpose: in `cases` (or all), in one compared
    section, exactly the diff line matching `line` (a regex). Anything else still fails."""

    cases: tuple[str, ...] | None
    section: str
    line: str
    why: str


KEPT = [
    Kept(None, "ADD result", r"dns: reference=\{\} ours=<absent>",
         "an empty dns is left out, as libcni >= 1.2 does; 1.1.1 (libcni 1.1.2) printed `\"dns\": {}`"),
    Kept(None, "ADD result", r'cniVersion: reference=<absent> ours="[0-9.]+"',
         "the spec's error structure carries cniVersion; the Go skeleton omits it"),
    Kept(None, "state after ADD", r'container\.sysctls\.net\.ipv6\.conf\.eth0\.ndisc_notify: reference="0" ours="1"',
         "macvlan/ipvlan announce IPv6 addresses (unsolicited NA) as the current reference does; 1.1.1 predates it"),
    Kept(("macvlan-mtu-above-master-error",), "ADD result", r"code: reference=999 ours=7",
         "an MTU above the master's is an invalid config (7), not an internal error"),
    Kept(("macvlan-mtu-above-master-error",), "DEL exit code", r": reference=1 ours=0",
         "DEL succeeds when there is nothing to undo; the reference fails DEL for the config ADD refused"),
    Kept(("macvlan-mtu-above-master-error",), "second DEL exit code", r": reference=1 ours=0", "as above"),
    Kept(("macvlan-mtu-above-master-error",), "DEL output", r': reference=\{"code": 999, .*\} ours=null', "as above"),
    Kept(("macvlan-mtu-above-master-error",), "state after DEL", r'ipam: reference=null ours=\{"lock": ""\}',
         "DEL reaches host-local, which creates its (empty) store"),
]


def kept(case: Case, section: str, line: str) -> bool:
    return any((k.cases is None or case.id in k.cases) and k.section == section and re.fullmatch(k.line, line)
               for k in KEPT)


def compare(ref: Run, ours: Run, case: Case | None = None) -> list[str]:
    sections = [
        ("ADD exit code", ref.add.rc, ours.add.rc),
        ("ADD result", ref.result, ours.result),
        ("state after ADD", ref.after_add, ours.after_add),
        ("DEL exit code", ref.dele.rc, ours.dele.rc),
        ("DEL output", ref.del_output, ours.del_output),
        ("state after DEL", ref.after_del, ours.after_del),
        ("second DEL exit code", ref.del_again.rc, ours.del_again.rc),
    ]
    out = []
    for title, a, b in sections:
        d = [line for line in diff(a, b) if case is None or not kept(case, title, line)]
        if d:
            out.append(f"{title}:")
            out += [f"  {line}" for line in d]
    return out


def reserved(state: dict[str, Any]) -> list[str]:
    """host-local's address reservations in a snapshot (its other files are bookkeeping)."""
    found = []
    for name in state.get("ipam") or {}:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            continue
        found.append(name)
    return found


def _ours_default_route_once(ref: Run, ours: Run) -> None:
    """1.1.1 adds its default route beside the one IPAM returned and fails ("file exists"); ours counts
    IPAM's default route (with or without gw) and succeeds with a single default route."""
    assert ref.add.rc == 1 and "file exists" in ref.result["msg"]
    assert ours.add.rc == 0, ours.add.stdout
    defaults = [r for r in ours.result["routes"] if r["dst"] == "0.0.0.0/0"]
    assert defaults == [{"dst": "0.0.0.0/0"}]
    v4 = [r for r in ours.after_add["container"]["routes"]["4"] if r.get("dst") == "default"]
    assert len(v4) == 1, v4
    assert ours.dele.rc == 0 and ours.after_del["container"]["iface"] is None and not reserved(ours.after_del)
    assert ours.del_again.rc == 0


def _ours_cleans_up_failed_add(ref: Run, ours: Run) -> None:
    """Same error as the reference, but a failed ADD leaves nothing behind (1.1.1 leaves eth0 and the
    host veth on the bridge). What the reference does clean up (its spoof-check rules) is compared."""
    assert diff(ref.result, ours.result) in ([], ['cniVersion: reference=<absent> ours="1.0.0"'])
    assert ref.after_add["container"]["iface"] is not None
    assert ours.after_add["container"]["iface"] is None and ours.after_add["container"]["links"] == ["lo"]
    assert ours.dele.rc == 0 and ours.del_again.rc == 0
    assert not reserved(ours.after_add) and not reserved(ours.after_del)
    for state in ("after_add", "after_del"):
        assert diff(getattr(ref, state)["host"]["nftables"], getattr(ours, state)["host"]["nftables"]) == [], state


def _ours_needs_nft_first(ref: Run, ours: Run) -> None:
    """Without the nft command both fail ADD with code 999 and a spoof-check message and succeed DEL (the
    reference logs its teardown failure); ours says what is missing and fails before it makes anything,
    the reference fails running nft after making the veth and leaves it."""
    assert (ref.result["code"], ours.result["code"]) == (999, 999)
    assert ref.result["msg"].startswith('failed to setup spoof-check: failed to execute nft nft -j -f ')
    assert ours.result["msg"] == ("failed to setup spoof-check: the nft command (nftables) is not installed or "
                                  "not in PATH")
    assert ref.after_add["container"]["iface"] is not None
    assert ours.after_add["container"]["links"] == ["lo"] and ours.after_add["host"]["bridge"] == {"exists": False}
    assert not reserved(ours.after_add)
    assert (ref.dele.rc, ours.dele.rc, ref.del_again.rc, ours.del_again.rc) == (0, 0, 0, 0)
    assert ref.after_add["host"]["nftables"] == ours.after_add["host"]["nftables"] == {}


DELIBERATE: dict[str, Callable[[Run, Run], None]] = {
    "bridge-isDefaultGateway-ipam-default-route-error": _ours_default_route_once,
    "bridge-address-conflict-error": _ours_cleans_up_failed_add,
    "bridge-macspoofchk-address-conflict-error": _ours_cleans_up_failed_add,
    "bridge-macspoofchk-without-nft-error": _ours_needs_nft_first,
}


def spoofchk_table(cid: str, mac: str | None) -> dict[str, Any]:
    """The normalised nftables table the reference's SpoofChecker (pkg/link/spoofcheck.go) leaves for one
    attachment (`mac` None: no attachment, only the base chain that stays for good)."""
    base: dict[str, Any] = {"type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept", "rules": []}
    table = {"chains": {"PREROUTING": base}, "other": []}
    if mac is None:
        return table
    ref_id = f"{cid}-{IFNAME}"
    comment, chain = f"macspoofchk-{ref_id}", f"cni-br-iface-{ref_id}"
    base["rules"].append({"comment": comment, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "<host-veth>"}},
        {"jump": {"target": chain}}]})
    table["chains"][chain] = {"rules": [{"comment": comment, "expr": [{"jump": {"target": chain + "-mac"}}]}]}
    table["chains"][chain + "-mac"] = {"rules": [
        {"comment": comment, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "saddr"}}, "right": mac}},
            {"return": None}]},
        {"comment": comment, "expr": [{"drop": None}]}]}
    return table


def check_spoofchk(case: Case, n: Names, run: Run) -> None:
    """The spoof check of a macspoofchk case: the reference's rules after ADD (none left after a failed
    ADD), only the base chain after DEL."""
    if case.no_nft:  # nothing could be made
        assert run.after_add["host"]["nftables"] == run.after_del["host"]["nftables"] == {}
        return
    added = case.expect_ok and run.add.rc == 0
    after_add = run.after_add["host"]["nftables"]
    assert after_add["bridge nat"] == spoofchk_table(n.cid, (n.mac if case.mac else "<mac:container>") if added
                                                     else None), after_add
    assert run.after_del["host"]["nftables"]["bridge nat"] == spoofchk_table(n.cid, None)


@pytest.fixture(scope="session")
def vlan_filtering_supported() -> bool:
    """Whether this kernel can turn on a bridge's VLAN filtering (tried in a throw-away namespace)."""
    name = f"mcp-probe-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        return subprocess.run(["ip", "-n", name, "link", "add", "mcpbprobe", "type", "bridge", "vlan_filtering", "1"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("case", MACVLAN + BRIDGE, ids=lambda c: c.id)
def test_parity(case: Case, tmp_path: Path, netns_factory: Callable[[], str], reference_plugins: Path,
                vlan_filtering_supported: bool) -> None:
    assert os.geteuid() == 0, "parity tests create network namespaces: run as root"
    if case.conf.get("macspoofchk"):
        assert shutil.which("nft"), "macspoofchk needs the nft command: tests/infra/provision.sh installs nftables"
    n = Names.fresh()
    ref = run_case(case, n, reference_plugins / case.plugin, tmp_path / "reference", netns_factory)

    # The case means what it says: the reference succeeded (or failed) and really attached the interface.
    if case.expect_ok and (vlan_filtering_supported or not case.vlan_filtering):
        assert ref.add.rc == 0, f"reference ADD failed: {ref.add.stdout}{ref.add.stderr}"
        assert ref.after_add["container"]["iface"] is not None
        assert ref.dele.rc == 0 and ref.after_del["container"]["iface"] is None
    else:
        assert ref.add.rc != 0 and ref.result.get("code"), f"reference ADD should fail: {ref.add.stdout}"

    ours = run_case(case, n, OURS[case.plugin], tmp_path / "ours", netns_factory)
    if case.conf.get("macspoofchk"):
        check_spoofchk(case, n, ref)  # the case means what it says: the reference's rules come and go
    if case.id in DELIBERATE:
        DELIBERATE[case.id](ref, ours)
    else:
        problems = compare(ref, ours, case)
        assert not problems, (f"{case.id}: meta-{case.plugin} differs from the reference {case.plugin} "
                              f"(ours stderr: {ours.add.stderr.strip()[-2000:]!r})\n" + "\n".join(problems))
    if case.conf.get("macspoofchk"):
        check_spoofchk(case, n, ours)


# --- macspoofchk across attachments: several ADDs and DELs in one host namespace -------------------------


@attrs.frozen
class Step:
    command: str   # "ADD", "DEL", or "DELNS" (the container namespace disappears without a DEL)
    container: int  # container ID number
    netns: int      # container namespace number


SPOOFCHK_SEQUENCES = {
    # DEL of one attachment removes only its own rules
    "two-containers": [Step("ADD", 0, 0), Step("ADD", 1, 1), Step("DEL", 0, 0), Step("DEL", 1, 1)],
    # the same container ID attached again (new namespace, no DEL between): a second base-chain rule, the
    # regular chains flushed and refilled for the new port; one DEL removes every rule of the ID
    "re-add-without-del": [Step("ADD", 0, 0), Step("ADD", 0, 1), Step("DEL", 0, 1), Step("DEL", 0, 0)],
}


@attrs.frozen
class StepOutcome:
    rc: int
    output: Any
    nftables: Any


def run_spoofchk_sequence(steps: list[Step], n: Names, binary: Path, netns_factory: Callable[[], str]
                          ) -> list[StepOutcome]:
    """Run `steps` (L2-only bridge configs with macspoofchk, each ADD with its own runtimeConfig MAC) in a
    fresh host namespace; after each step the normalised nftables ruleset. Host veths are labelled by the
    ADD that made them (<veth:step-N>), so that both plugins' runs line up."""
    host = netns_factory()
    h = ns_name(host)
    ip("-n", h, "link", "set", "lo", "up")
    conts: dict[int, str] = {}  # container namespaces by number (paths, also of deleted ones)
    macs = {i: n.mac[:-2] + f"{i:02x}" for i in range(len(steps))}
    norm = Normaliser(keep=set(macs.values()))
    outcomes = []
    try:
        for i, step in enumerate(steps):
            names = attrs.evolve(n, cid=f"{n.cid}-{step.container}", mac=macs[i])
            if step.netns not in conts:
                conts[step.netns] = netns_factory()
                norm.add(conts[step.netns], f"sandbox-{step.netns}")
            if step.command == "DELNS":
                subprocess.run(["ip", "netns", "del", ns_name(conts[step.netns])], check=True)
                outcomes.append(StepOutcome(0, None, norm(nftables_state(host))))
                continue
            config = {"cniVersion": "1.0.0", "name": n.net, "type": "bridge", "bridge": n.bridge, "ipam": {},
                      "macspoofchk": True, "capabilities": {"mac": True}, "runtimeConfig": {"mac": names.mac}}
            run = exec_plugin(host, binary, step.command, config, names, conts[step.netns])
            if step.command == "ADD" and run.rc == 0:
                norm.add_name(run.json["interfaces"][1]["name"], f"veth:step-{i}")
            outcomes.append(StepOutcome(run.rc, output(run, norm), norm(nftables_state(host))))
        return outcomes
    finally:
        subprocess.run(["ip", "-n", h, "link", "del", n.bridge], capture_output=True)


def _reference_drop_first(outcome: StepOutcome, mac_chain: str) -> StepOutcome:
    """Kept on purpose: the reference adds its drop rule with `"index": 0` (after the chain's first rule)
    in the batch that also flushes the chain. When the chain already had rules (the same container ID and
    ifname attached again without DEL), index 0 resolves to the old MAC rule being flushed, so the drop
    rule ends up before the new MAC rule and the port drops all its frames. Ours appends MAC rule, then
    drop. Returns the reference's outcome with the two rules in our order, after checking they were not."""
    chains = outcome.nftables["bridge nat"]["chains"]
    rules = chains[mac_chain]["rules"]
    assert len(rules) == 2 and rules[0]["expr"] == [{"drop": None}], \
        f"the reference no longer puts drop first: drop this difference ({rules})"
    fixed = json.loads(json.dumps(outcome.nftables))
    fixed["bridge nat"]["chains"][mac_chain]["rules"] = [rules[1], rules[0]]
    return attrs.evolve(outcome, nftables=fixed)


@pytest.mark.parametrize("sequence", sorted(SPOOFCHK_SEQUENCES))
def test_parity_macspoofchk_sequence(sequence: str, netns_factory: Callable[[], str],
                                     reference_plugins: Path) -> None:
    assert shutil.which("nft"), "macspoofchk needs the nft command: tests/infra/provision.sh installs nftables"
    steps = SPOOFCHK_SEQUENCES[sequence]
    n = Names.fresh()
    ref = run_spoofchk_sequence(steps, n, reference_plugins / "bridge", netns_factory)
    ours = run_spoofchk_sequence(steps, n, OURS["bridge"], netns_factory)
    assert all(o.rc == 0 for o in ref), [(s, o.rc, o.output) for s, o in zip(steps, ref)]
    if sequence == "re-add-without-del":
        ref[1] = _reference_drop_first(ref[1], f"cni-br-iface-{n.cid}-0-{IFNAME}-mac")
    problems = []
    for i, (step, a, b) in enumerate(zip(steps, ref, ours)):
        d = diff(attrs.asdict(a), attrs.asdict(b))
        # the reference's ADD result has `"dns": {}` (KEPT above)
        d = [line for line in d if not (step.command == "ADD" and line == "output.dns: reference={} ours=<absent>")]
        problems += [f"step {i} {step}: {line}" for line in d]
    assert not problems, "\n".join(problems)
    # the rules the reference leaves are what they should be: none of any container after the last DEL
    last = ref[-1].nftables["bridge nat"]
    assert list(last["chains"]) == ["PREROUTING"] and last["chains"]["PREROUTING"]["rules"] == []


def test_macspoofchk_del_without_netns(netns_factory: Callable[[], str], reference_plugins: Path) -> None:
    """Kept on purpose: DEL after the container namespace is gone removes the attachment's spoof-check rules;
    the reference's DEL returns after IPAM DEL then and leaves them for good."""
    assert shutil.which("nft"), "macspoofchk needs the nft command: tests/infra/provision.sh installs nftables"
    steps = [Step("ADD", 0, 0), Step("DELNS", 0, 0), Step("DEL", 0, 0)]
    n = Names.fresh()
    ref = run_spoofchk_sequence(steps, n, reference_plugins / "bridge", netns_factory)
    ours = run_spoofchk_sequence(steps, n, OURS["bridge"], netns_factory)
    assert [o.rc for o in ref] == [o.rc for o in ours] == [0, 0, 0]
    assert diff(ref[0].nftables, ours[0].nftables) == []
    with_rules = ref[0].nftables["bridge nat"]
    assert len(with_rules["chains"]) == 3 and with_rules["chains"]["PREROUTING"]["rules"]
    assert ref[2].nftables["bridge nat"] == with_rules, "the reference now removes the rules: drop this difference"
    assert ours[2].nftables["bridge nat"] == spoofchk_table(n.cid, None)


# --- vlanTrunk: not in the reference ------------------------------------------------------------------------


def test_vlan_trunk_not_in_reference(tmp_path: Path, netns_factory: Callable[[], str],
                                    reference_plugins: Path) -> None:
    """Debian's reference bridge (plugins 1.1.1) predates `vlanTrunk` and `preserveDefaultVlan` (upstream 1.3): its
    NetConf has no such fields, and a config with them attaches exactly as one without (no VLAN filtering, the
    same VLAN table). So there is no reference behaviour to compare ours with; ours is checked against upstream's in
    tests/delegates/test_bridge.py::test_vlan_trunk (and in the full-kernel lane). Should Debian's package gain
    them, this fails: then add parity cases for them here."""
    binary = (reference_plugins / "bridge").read_bytes()
    assert b"vlanTrunk" not in binary and b"preserveDefaultVlan" not in binary
    assert b'json:"vlan"' in binary and b'json:"macspoofchk,omitempty"' in binary  # the search itself works
    n = Names.fresh()
    trunk = Case("trunk", "bridge", "l2", conf={"vlanTrunk": [{"id": 101}, {"minID": 200, "maxID": 203}],
                                               "preserveDefaultVlan": False})
    with_trunk = run_case(trunk, n, reference_plugins / "bridge", tmp_path / "trunk", netns_factory)
    without = run_case(Case("plain", "bridge", "l2"), n, reference_plugins / "bridge", tmp_path / "plain",
                       netns_factory)
    assert with_trunk.add.rc == 0, with_trunk.add.stdout
    assert with_trunk.after_add["host"]["bridge"]["info_data"]["vlan_filtering"] == 0
    assert compare(without, with_trunk) == []
