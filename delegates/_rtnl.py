"""A synchronous rtnetlink socket with the part of pyroute2's IPRoute API the built-in delegates use.

pyroute2 (0.9) runs every IPRoute call through an asyncio event loop of its own: a task, a message queue and
several loop iterations per request, about half of the ~0.8 ms each request costs a daemon ADD (a pod's
attachments make some 25 of them). This class keeps everything that gives a request its meaning from
pyroute2 (the message classes, the request filters that turn `kind="veth", peer={...}` or `state="up"`
into fields and attributes, NetlinkRequest's message set-up, the rtnetlink Marshal that decodes answers
and turns kernel errors into NetlinkError) and only does the socket I/O itself, blocking, on a plain
netlink socket: the same bytes go to the kernel and the same messages come back.
"""
from __future__ import annotations

import itertools
import socket
from typing import Any

from pyroute2 import config
from pyroute2.iproute.linux import get_arguments_processor, get_dump_filter
from pyroute2.netlink import NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_GETADDR, RTM_GETLINK, RTM_GETROUTE,
                                   RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, RTM_SETLINK)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

NETLINK_ROUTE = 0
AF_UNSPEC = 0
BUFFER = 1 << 20  # a dump of every link of a busy host fits in a few reads
# The command maps of pyroute2's AsyncIPRoute.link/addr/route (message type and flag set per command).
LINK = {"set": (RTM_NEWLINK, "req"), "add": (RTM_NEWLINK, "create"), "del": (RTM_DELLINK, "req"),
        "dump": (RTM_GETLINK, "dump"), "get": (RTM_GETLINK, "get")}
ADDR = {"add": (RTM_NEWADDR, "create"), "del": (RTM_DELADDR, "req"), "replace": (RTM_NEWADDR, "replace"),
        "dump": (RTM_GETADDR, "dump")}
ROUTE = {"add": (RTM_NEWROUTE, "create"), "set": (RTM_NEWROUTE, "replace"), "replace": (RTM_NEWROUTE, "replace"),
         "del": (RTM_DELROUTE, "req"), "get": (RTM_GETROUTE, "get"), "dump": (RTM_GETROUTE, "dump")}
VLAN_FILTER = {"add": (RTM_SETLINK, "req"), "del": (RTM_DELLINK, "req")}


class _Sequence:
    """NetlinkRequest's sequence-number pool: numbers are never reused while a socket lives long enough
    to matter (one answer is read before the next request is sent)."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def alloc(self) -> int:
        return (next(self._next) - 1) % 0xFFFFFFFF + 1

    def free(self, *args: Any, **kwargs: Any) -> None:
        pass


class Rtnl:
    """One rtnetlink socket in the network namespace of the thread that created it; not thread-safe."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
            self._sock.bind((0, 0))
        except OSError:
            self._sock.close()
            raise
        # What NetlinkRequest reads from the socket it is given.
        self.addr_pool = _Sequence()
        self.status = {"nlm_echo": False, "strict_check": False}
        self.epid = self._sock.getsockname()[0]
        self.marshal = MarshalRtnl()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, request: NetlinkRequest) -> list[Any]:
        """Send one request and read its answer as pyroute2's core does: messages of this sequence number
        until one without NLM_F_MULTI, NLMSG_DONE, or the kernel's ACK (kept, as pyroute2 returns it); a
        kernel error is raised as the Marshal made it (NetlinkError)."""
        msg = request.msg
        msg.encode()
        self._sock.send(msg.data)
        seq = request.msg_seq
        out: list[Any] = []
        while True:
            data = self._sock.recv(BUFFER)
            for m in self.marshal.parse(data, seq):
                header = m["header"]
                if header["sequence_number"] != seq:
                    continue
                if header.get("error") is not None:
                    raise header["error"]
                if header["type"] == NLMSG_DONE:
                    return out
                if request.dump_filter is None or NetlinkRequest.match_one_message(request.dump_filter, m):
                    out.append(m)
                if header["type"] == NLMSG_ERROR or not header["flags"] & NLM_F_MULTI:
                    return out

    def _request(self, mode: str, message: Any, command: str, command_map: dict[str, tuple[int, str]],
                 kwarg: dict[str, Any], parameters: dict[str, Any] | None = None) -> list[Any]:
        dump_filter, kwarg = get_dump_filter(mode, command, kwarg, parameters)
        arguments = get_arguments_processor(mode, command, kwarg, parameters)
        return self._run(NetlinkRequest(self, message, command, command_map, dump_filter, arguments))

    # --- the IPRoute methods the delegates call ------------------------------------------------------------

    def link(self, command: str, **kwarg: Any) -> list[Any]:
        if isinstance(kwarg.get("match"), str):
            kwarg["match"] = {"ifname": kwarg["match"]}
        command_map = kwarg.pop("command_map", LINK)
        return self._request("link", ifinfmsg(), command, command_map, kwarg)

    def addr(self, command: str, **kwarg: Any) -> list[Any]:
        return self._request("addr", ifaddrmsg(), command, ADDR, kwarg)

    def route(self, command: str, **kwarg: Any) -> list[Any]:
        if command in ("add", "set", "replace"):
            kwarg["proto"] = kwarg.get("proto", "static") or "static"
            kwarg["type"] = kwarg.get("type", "unicast") or "unicast"
        return self._request("route", rtmsg(), command, ROUTE, kwarg, {"strict_check": False})

    def get_links(self, *indexes: int, **kwarg: Any) -> list[Any]:
        if not indexes or indexes[0] == 0:
            return self.link("dump", **kwarg)
        return [m for index in indexes for m in self.link("get", index=index, **kwarg)]

    def get_addr(self, family: int = AF_UNSPEC, match: Any = None, **kwarg: Any) -> list[Any]:
        return self.addr("dump", family=family, match=match or kwarg)

    def get_routes(self, family: int = 255, match: Any = None, **kwarg: Any) -> list[Any]:
        if isinstance(kwarg.get("dst"), str):
            return self.route("get", dst=kwarg["dst"])
        return self.route("dump", family=family, match=match or kwarg)

    def get_vlans(self, **kwarg: Any) -> list[Any]:
        # ext_mask 2: RTEXT_FILTER_BRVLAN, the bridge ports' VLANs
        return self.link("dump", family=config.AF_BRIDGE, ext_mask=2, match=kwarg)

    def brport(self, command: str, **kwarg: Any) -> list[Any]:
        if command != "set":
            raise TypeError(f"brport {command!r} is not supported here")
        return self.link("set", index=kwarg.pop("index", 0), kind="bridge_slave", **kwarg)

    def vlan_filter(self, command: str, **kwarg: Any) -> list[Any]:
        kwarg["family"] = config.AF_BRIDGE
        kwarg["command_map"] = VLAN_FILTER
        kwarg["dump_filter"] = None
        kwarg["request_filter"] = get_arguments_processor("vlan_filter", command, kwarg)
        return self.link(command, **kwarg)
