"""Built-in `macvlan` delegate: a drop-in for the reference macvlan plugin (same config fields and defaults).

Fields: master (default: the interface of the default route, on the host or in the container with
linkInContainer), mode (bridge|private|vepa|passthru, default bridge), mtu (0..master's), mac, linkInContainer,
ipam (an empty ipam makes an L2-only link), dns.

Kept different on purpose: DEL does not need the master to exist (the reference fails DEL with "Link not
found" when the master is gone, which makes such a pod undeletable).
"""
from __future__ import annotations

import sys
from typing import Any

import attrs


from . import _netlink as nl
from ._child import add_with_ipam, check_link, create_link, delete_child
from ._plugin import PluginArgs, gc_via_ipam, require, status_via_ipam

MODES = ("bridge", "private", "vepa", "passthru")


@attrs.frozen
class Conf:
    master: str | None
    mode: str
    mtu: int
    mac: str | None
    link_in_container: bool
    dns: dict[str, Any] = attrs.field(eq=False)


def load_conf(args: PluginArgs) -> Conf:
    c = args.config
    mode = c.get("mode") or "bridge"
    require(mode in MODES, f"unknown macvlan mode: {mode!r}")
    mtu = c.get("mtu") or 0
    require(isinstance(mtu, int) and mtu >= 0, f"invalid MTU {mtu!r}")
    master = c.get("master") or None
    require(master is None or isinstance(master, str), f"invalid master {master!r}")
    return Conf(master=master, mode=mode, mtu=mtu, mac=args.mac_request(c.get("mac")),
                link_in_container=bool(c.get("linkInContainer")), dns=c.get("dns") or {})


def cmd_add(args: PluginArgs) -> dict[str, Any]:
    conf = load_conf(args)
    with nl.Links(args.netns) as links:
        # txqlen 0 as the reference's (vishvananda/netlink sends its zero-valued LinkAttrs.TxQLen).
        iface, index = create_link(links, conf, args.ifname, "macvlan", {"macvlan_mode": conf.mode, "txqlen": 0})
        return add_with_ipam(args, links, iface, index, conf.dns)


cmd_del = delete_child


def cmd_check(args: PluginArgs) -> None:
    conf = load_conf(args)
    check_link(args, "macvlan", "IFLA_MACVLAN_MODE", conf.mode)


cmd_status = status_via_ipam
cmd_gc = gc_via_ipam


def main() -> int:
    from ._plugin import standalone_main

    return standalone_main(sys.modules[__name__], "meta-macvlan")


if __name__ == "__main__":
    sys.exit(main())
