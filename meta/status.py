"""The `k8s.v1.cni.cncf.io/network-status` annotation (NPWG multi-net spec §5), built from ADD results.

Keys per entry: name, interface, ips, mac, default, dns, gateway, device-info, with the field names of the
NPWG network-attachment-definition client (the de-facto reader). IPs are written without prefix length,
as that client and Multus do. One entry per attachment, even one without a sandbox interface (spec §5.1.1
asks for a minimal entry rather than none).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from .plan import Attachment

ANNOTATION = "k8s.v1.cni.cncf.io/network-status"
DEFAULT_DST = ("0.0.0.0/0", "::/0")


def _interface_index(att: Attachment, res: dict[str, Any]) -> int | None:
    ifaces = res.get("interfaces") or []
    for i, iface in enumerate(ifaces):
        if iface.get("sandbox") and iface.get("name") == att.ifname:
            return i
    for i, iface in enumerate(ifaces):
        if iface.get("sandbox"):
            return i
    return None


def entry(att: Attachment, res: dict[str, Any] | None, device_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status entry of one attachment from its final ADD result (current shape)."""
    out: dict[str, Any] = {"name": att.name, "interface": att.ifname}
    res = res or {}
    idx = _interface_index(att, res)
    ifaces = res.get("interfaces") or []
    if idx is not None:
        out["interface"] = ifaces[idx]["name"]
    ips = [ip for ip in res.get("ips") or [] if idx is None or ip.get("interface") in (None, idx)]
    if ips:
        out["ips"] = [str(ipaddress.ip_interface(ip["address"]).ip) for ip in ips]
    if idx is not None and ifaces[idx].get("mac"):
        out["mac"] = ifaces[idx]["mac"]
    out["default"] = att.is_default
    dns = {k: v for k, v in (res.get("dns") or {}).items() if v and k in ("nameservers", "domain", "search", "options")}
    if dns:
        out["dns"] = dns
    gateways = []
    for r in res.get("routes") or []:
        if r.get("dst") in DEFAULT_DST:
            gw = r.get("gw") or next((ip.get("gateway") for ip in ips if ip.get("gateway")
                                      and ("." in ip["gateway"]) == ("." in r["dst"])), None)
            if gw and gw not in gateways:
                gateways.append(gw)
    if gateways:
        out["gateway"] = gateways
    if device_info:
        out["device-info"] = device_info
    return out


def build(attachments: Sequence[Attachment], results: Sequence[dict[str, Any] | None],
          device_infos: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [entry(a, r, d) for a, r, d in zip(attachments, results, device_infos)]


def device_info_for(att: Attachment, written: dict[str, Any] | None) -> dict[str, Any] | None:
    """Device information (Device Information Spec): what the delegate wrote, else the PCI address we passed."""
    if written:
        return written
    if att.device_id:
        return {"type": "pci", "version": "1.1.0", "pci": {"pci-address": att.device_id}}
    return None
