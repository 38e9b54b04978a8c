"""The few things meta-cni itself does inside the pod's network namespace.

Standard library only: the calling thread joins the namespace with setns(2) and returns, interface
names come from if_nameindex(3) inside, and routes are changed with iproute2 run under nsenter, so the
thin plugin does not pay for importing a netlink library.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator

from .cni.errors import INTERNAL, UNKNOWN_CONTAINER, CNIError

CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None


class NetnsGone(CNIError):
    """The namespace path does not exist (any more): DEL treats this as nothing left to undo."""


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def open_netns(netns: str) -> int:
    """An fd of the namespace at `netns`; NetnsGone when the path is missing."""
    try:
        return os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsGone(UNKNOWN_CONTAINER, f"netns {netns!r} does not exist") from None
    except OSError as e:
        raise CNIError(UNKNOWN_CONTAINER, f"cannot open netns {netns!r}: {e.strerror}") from None


@contextlib.contextmanager
def entered(netns: str) -> Iterator[int]:
    """Run the block with the calling thread (only it) in the network namespace at `netns`, as Go's
    ns.Do does; yields the namespace fd. Netlink sockets opened inside stay bound to that namespace,
    and /proc/sys/net opened inside is the namespace's."""
    target = open_netns(netns)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as e:
            raise CNIError(UNKNOWN_CONTAINER, f"{netns!r} is not a network namespace: {e.strerror}") from None
        try:
            yield target
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def link_names(netns: str) -> set[str]:
    """Names of the interfaces in the network namespace at `netns`."""
    with entered(netns):
        return {name for _, name in socket.if_nameindex()}


def set_default_route(netns: str, ifname: str, gateways: tuple[str, ...]) -> None:
    """Make `gateways` (at most one per family) the only default routes, via `ifname`."""
    for gw in gateways:
        family, dst = ("-6", "::/0") if ":" in gw else ("-4", "0.0.0.0/0")
        # iproute2's batch mode takes options only on its own command line, so one batch per family.
        batch = f"route flush exact {dst}\nroute add default via {gw} dev {ifname}\n"
        proc = subprocess.run(["nsenter", f"--net={netns}", "ip", family, "-batch", "-"], input=batch,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise CNIError(INTERNAL, f"setting default route via {gw} on {ifname} failed: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
