"""A synchronous rtnetlink socket with the part of pyroute2's IPRoute API the built-in delegates use.

pyroute2 (0.9) runs every IPRoute call through an asyncio event loop of its own: a task, a message queue and
several loop iterations per request, about half of the ~0.8 ms each request costs a daemon ADD (a pod's
attachments made some 25 of them). This class keeps what gives a request and an answer its meaning from
pyroute2 (the message classes that decode answers, the request filters that turn `kind="veth", peer={...}`
or `state="up"` into fields and attributes, NetlinkRequest's message set-up, the rtnetlink Marshal that
turns kernel errors into NetlinkError) and does the socket I/O itself, blocking, on a plain netlink socket:
the same bytes go to the kernel and the same messages come back.

Two more costs are cut where the delegates spend most (profiled: ~4 ms of Python per attachment, against
~1 ms in the kernel):
- pyroute2 decodes an answer by building an object per attribute: some 40 for a link, ~0.13 ms, while the
  delegates read three or four of them. Answers are decoded by pyroute2's own message classes, but each
  attribute only when first read (_Lazy); anything that reads the attribute list itself gets it whole.
- pyroute2's request filters cost ~0.1 ms a request. The requests the delegates make most (a link by name or
  index; set or delete a link by index; create a veth, macvlan or ipvlan; add an address; one link's
  addresses) are built straight into the message the filters would make (tests/delegates/test_rtnl.py compares the bytes, and the answers);
  every other shape still goes through them.
"""
from __future__ import annotations

import itertools
import socket
import struct
import types
from typing import Any

from pyroute2 import config
from pyroute2.iproute.linux import get_arguments_processor, get_dump_filter
from pyroute2.netlink import NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_GETADDR, RTM_GETLINK, RTM_GETROUTE,
                                   RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, RTM_SETLINK)
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP
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


_NLMSGHDR = struct.Struct("IHHII")  # length, type, flags, sequence number, port id
_NLA_HDR = struct.Struct("HH")
_IFINFOMSG = struct.Struct("BxHiII")  # family, device type, index, flags, change
_IFADDRMSG = struct.Struct("BBBBI")  # family, prefix length, flags, scope, index
_U32 = struct.Struct("I")
_U16 = struct.Struct("H")
# attribute numbers (linux/if_link.h, linux/veth.h, linux/if_addr.h)
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_TXQLEN = 1, 3, 4, 5, 10, 13
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER, IFLA_MACVLAN_MODE, IFLA_IPVLAN_MODE = 1, 1, 1
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
_ERRNO = struct.Struct("i")
_NLA_FLAGS = NLA_F_NESTED | NLA_F_NET_BYTEORDER


class _Lazy:
    """Mixin for a pyroute2 message class: decoding records where each attribute lies; get_attrs (and so get,
    get_attr, get_nested) has pyroute2's class for that attribute decode it, as pyroute2's decode_nlas would
    have, the first time it is read. Anything reading msg["attrs"] gets the whole list decoded by pyroute2."""

    def decode_nlas(self, offset: int) -> None:
        spans: list[tuple[int, int, int]] = []
        data, end = self.data, self.offset + self.length
        unpack, add = _NLA_HDR.unpack_from, spans.append
        while offset <= end - 4:
            length, kind = unpack(data, offset)
            if not 4 <= length <= end - offset:
                length = min(max(length, 4), end - offset)  # as pyroute2 clamps a malformed one
            add((kind, offset, length))
            offset += (length + 3) & ~3
        self.__dict__["_spans"] = spans
        self.__dict__["_read"] = {}

    def _whole(self) -> None:
        spans = self.__dict__.pop("_spans", None)
        if spans:
            super().decode_nlas(spans[0][1])  # type: ignore[misc]

    def __getitem__(self, key: Any) -> Any:
        if key == "attrs" and "_spans" in self.__dict__:
            self._whole()
        return super().__getitem__(key)  # type: ignore[misc]

    def get_attrs(self, attr: str) -> list[Any]:
        spans = self.__dict__.get("_spans")
        if spans is None:
            return super().get_attrs(attr)  # type: ignore[misc]
        if self.prefix is not None:  # type: ignore[attr-defined]
            attr = self.name2nla(attr)  # type: ignore[attr-defined]
        read: dict[str, list[Any]] = self.__dict__["_read"]
        if attr not in read:
            table = type(self)._nlmsg_base__t_nla_map  # type: ignore[attr-defined]  # compiled by pyroute2
            read[attr] = [self._one(prime, kind, offset, length) for kind, offset, length in spans
                          if (prime := table.get(kind & ~_NLA_FLAGS)) is not None and prime["name"] == attr]
        return read[attr]

    def _one(self, prime: dict[str, Any], kind: int, offset: int, length: int) -> Any:
        """One attribute's value, as pyroute2's decode_nlas and nla_slot.get_value make it."""
        msg_class = prime["class"]
        if isinstance(msg_class, types.FunctionType):
            msg_class = msg_class(self, data=self.data, offset=offset)
        nla = msg_class(data=self.data, offset=offset, parent=self, length=length, init=prime["init"])
        nla._nla_array = prime["nla_array"]
        nla._nla_flags = kind & _NLA_FLAGS
        try:
            nla.decode()
        except Exception:  # as nla_slot.get_value: the raw bytes of an attribute pyroute2 cannot decode
            return nla.data[nla.offset:nla.offset + nla.length]
        return nla.getvalue()


class LinkMsg(_Lazy, ifinfmsg):
    pass


class AddrMsg(_Lazy, ifaddrmsg):
    pass


class RouteMsg(_Lazy, rtmsg):
    pass


# The answers the delegates read; any other type is decoded by pyroute2's Marshal.
_ANSWERS = {RTM_NEWLINK: LinkMsg, RTM_DELLINK: LinkMsg, RTM_NEWADDR: AddrMsg, RTM_NEWROUTE: RouteMsg}


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
        request.msg.encode()
        return self._exchange(request.msg.data, request.msg_seq, request.dump_filter)

    def _exchange(self, data: bytes | bytearray, seq: int, dump_filter: Any = None) -> list[Any]:
        """Send one request and read its answer as pyroute2's core does: messages of this sequence number
        until one without NLM_F_MULTI, NLMSG_DONE, or the kernel's ACK (not returned); a kernel error is
        raised as pyroute2's Marshal makes it (NetlinkError, with the kernel's extended-ack text)."""
        self._sock.send(data)
        out: list[Any] = []
        while True:
            data = self._sock.recv(BUFFER)
            offset, size = 0, len(data)
            while offset <= size - 16:
                length, kind, flags, number, _ = _NLMSGHDR.unpack_from(data, offset)
                if not 16 <= length <= size - offset:
                    break
                start, offset = offset, offset + length
                if number != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    if _ERRNO.unpack_from(data, start + 16)[0]:
                        raise self._by_marshal(data[start:offset], seq)["header"]["error"]
                    return out
                cls = _ANSWERS.get(kind)
                if cls is None:
                    msg = self._by_marshal(data[start:offset], seq)
                else:
                    msg = cls(data, offset=start)
                    msg.decode()
                if dump_filter is None or NetlinkRequest.match_one_message(dump_filter, msg):
                    out.append(msg)
                if not flags & NLM_F_MULTI:
                    return out

    def _by_marshal(self, message: bytes, seq: int) -> Any:
        """One message as pyroute2's Marshal decodes it (a kernel error becomes its header's NetlinkError)."""
        return next(iter(self.marshal.parse(message, seq)))

    def _direct(self, body: bytes, command: str, command_map: dict[str, tuple[int, str]]) -> list[Any]:
        """A request built without pyroute2's request filters, its header as NetlinkRequest sets it."""
        msg_type, flags = command_map[command]
        seq = self.addr_pool.alloc()
        return self._exchange(_NLMSGHDR.pack(16 + len(body), msg_type, NetlinkRequest.flags[flags], seq,
                                                  self.epid) + body, seq)

    def _request(self, mode: str, message: Any, command: str, command_map: dict[str, tuple[int, str]],
                 kwarg: dict[str, Any], parameters: dict[str, Any] | None = None) -> list[Any]:
        dump_filter, kwarg = get_dump_filter(mode, command, kwarg, parameters)
        arguments = get_arguments_processor(mode, command, kwarg, parameters)
        return self._run(NetlinkRequest(self, message, command, command_map, dump_filter, arguments))

    # --- the IPRoute methods the delegates call ------------------------------------------------------------

    def link(self, command: str, **kwarg: Any) -> list[Any]:
        simple = _simple_link(command, kwarg)
        if simple is not None:
            return self._direct(simple, command, LINK)
        if isinstance(kwarg.get("match"), str):
            kwarg["match"] = {"ifname": kwarg["match"]}
        command_map = kwarg.pop("command_map", LINK)
        return self._request("link", ifinfmsg(), command, command_map, kwarg)

    def addr(self, command: str, **kwarg: Any) -> list[Any]:
        simple = _simple_addr(command, kwarg)
        if simple is not None:
            return self._direct(simple, command, ADDR)
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
        index = kwarg.get("index")
        if match is None and kwarg.keys() == {"index"} and isinstance(index, int) and isinstance(family, int):
            # The addresses of one link (what the delegates ask): the dump pyroute2 would send, filtered here.
            return [m for m in self._direct(_IFADDRMSG.pack(family, 0, 0, 0, 0), "dump", ADDR) if m["index"] == index]
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


def _nla(kind: int, value: bytes) -> bytes:
    return _NLA_HDR.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


# Link attributes a created link may be given, by keyword: (attribute number, encoder).
_LINK_ADD_ATTRS: dict[str, tuple[int, Any]] = {
    "ifname": (IFLA_IFNAME, lambda v: v.encode() + b"\0"),
    "address": (IFLA_ADDRESS, lambda v: bytes.fromhex(v.replace(":", ""))),
    "mtu": (IFLA_MTU, _U32.pack), "link": (IFLA_LINK, _U32.pack), "master": (IFLA_MASTER, _U32.pack),
    "txqlen": (IFLA_TXQLEN, _U32.pack), "net_ns_fd": (IFLA_NET_NS_FD, _U32.pack),
}
# What a simple link set may change beside the up/down state or the flags.
_LINK_SET_ATTRS = ("address", "ifname", "mtu")
_MACVLAN_MODES = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8, "source": 16}


def _link_attrs(kw: dict[str, Any]) -> bytes:
    """The attributes of `kw`, in its order (as pyroute2's filters); KeyError for a keyword not covered."""
    return b"".join(_nla(_LINK_ADD_ATTRS[key][0], _LINK_ADD_ATTRS[key][1](value)) for key, value in kw.items())


def _link_add(kw: dict[str, Any]) -> bytes | None:
    """The body of a veth (with its peer), macvlan or ipvlan creation as the delegates ask for it: the
    attributes in the order given, then the link info (kind, then its data); None for anything else."""
    kw = dict(kw)
    kind, state = kw.pop("kind", None), kw.pop("state", None)
    flags = IFF_UP if state == "up" else 0
    if state not in (None, "up"):
        return None
    if kind == "veth" and isinstance(kw.get("peer"), dict):
        peer = kw.pop("peer")
        data = _nla(VETH_INFO_PEER, _IFINFOMSG.pack(0, 0, 0, 0, 0) + _link_attrs(peer))
    elif kind == "macvlan" and kw.get("macvlan_mode") in _MACVLAN_MODES:
        data = _nla(IFLA_MACVLAN_MODE, _U32.pack(_MACVLAN_MODES[kw.pop("macvlan_mode")]))
    elif kind == "ipvlan" and isinstance(kw.get("ipvlan_mode"), int):
        data = _nla(IFLA_IPVLAN_MODE, _U16.pack(kw.pop("ipvlan_mode")))
    else:
        return None
    info = _nla(IFLA_INFO_KIND, kind.encode() + b"\0") + _nla(IFLA_INFO_DATA, data)
    return _IFINFOMSG.pack(0, 0, 0, flags, flags) + _link_attrs(kw) + _nla(IFLA_LINKINFO, info)


def _simple_link(command: str, kw: dict[str, Any]) -> bytes | None:
    """The body pyroute2's filters make of a link get by name or index, a set/del by index of the up/down
    state or the flags, the address, the name, the MTU, or a veth/macvlan/ipvlan creation (_link_add); None
    for any other request."""
    index, flags, change, nlas = 0, 0, 0, b""
    if command == "add":
        try:
            return _link_add(kw)
        except (KeyError, AttributeError, TypeError, ValueError, struct.error):
            return None  # pyroute2's filters say what is wrong with it
    if command == "get":
        if kw.keys() == {"ifname"} and isinstance(kw["ifname"], str):
            nlas = _link_attrs(kw)
        elif kw.keys() == {"index"} and isinstance(kw["index"], int):
            index = kw["index"]
        else:
            return None
    elif command in ("set", "del"):
        keys = kw.keys() - {"index"}
        if not isinstance(kw.get("index"), int) or not keys <= {"state", "flags", "change", *_LINK_SET_ATTRS}:
            return None
        index = kw["index"]
        if "state" in kw:
            if keys & {"flags", "change"} or kw["state"] not in ("up", "down"):
                return None
            flags, change = (IFF_UP if kw["state"] == "up" else 0), IFF_UP
        elif keys & {"flags", "change"}:
            if not (isinstance(kw.get("flags"), int) and isinstance(kw.get("change"), int)):
                return None
            flags, change = kw["flags"], kw["change"]
        try:
            nlas = _link_attrs({key: value for key, value in kw.items() if key in _LINK_SET_ATTRS})
        except (AttributeError, TypeError, ValueError, struct.error):
            return None  # pyroute2's filters say what is wrong with it
    else:
        return None
    return _IFINFOMSG.pack(0, 0, index, flags, change) + nlas


def _simple_addr(command: str, kw: dict[str, Any]) -> bytes | None:
    """The body pyroute2's filters make of an address add by index (IPv4: address, broadcast when given,
    local); None for any other request."""
    if command != "add" or not {"index", "address", "prefixlen"} <= kw.keys() <= {"index", "address", "prefixlen",
                                                                                 "broadcast"}:
        return None
    index, address, prefixlen = kw["index"], kw["address"], kw["prefixlen"]
    if not (isinstance(index, int) and isinstance(address, str) and isinstance(prefixlen, int)):
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        packed = socket.inet_pton(family, address)
        nlas = _nla(IFA_ADDRESS, packed)
        if "broadcast" in kw:
            if family == socket.AF_INET6:
                return None
            nlas += _nla(IFA_BROADCAST, socket.inet_pton(family, kw["broadcast"]))
        if family == socket.AF_INET:
            nlas += _nla(IFA_LOCAL, packed)
        return _IFADDRMSG.pack(family, prefixlen, 0, 0, index) + nlas
    except (OSError, TypeError, struct.error):
        return None
