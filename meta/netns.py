"""The few things meta-cni itself does inside the pod's network namespace.

Standard library only: interface names are listed from a short-lived thread that joins the namespace
with setns(2) (only that thread changes namespace), and routes are changed with iproute2 run under
nsenter, so the thin plugin does not pay for importing a netlink library.
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading

from .cni.errors import INTERNAL, UNKNOWN_CONTAINER, CNIError

CLONE_NEWNET = 0x40000000


def link_names(netns: str) -> set[str]:
    """Names of the interfaces in the network namespace at `netns`."""
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CNIError(UNKNOWN_CONTAINER, f"cannot open netns {netns!r}: {e.strerror}") from None
    box: dict[str, object] = {}

    def inside() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            box["error"] = os.strerror(ctypes.get_errno())
            return
        box["names"] = {name for _, name in socket.if_nameindex()}

    try:
        t = threading.Thread(target=inside, name="meta-netns")
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise CNIError(UNKNOWN_CONTAINER, f"{netns!r} is not a network namespace: {box['error']}")
    return box["names"]  # type: ignore[return-value]


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
