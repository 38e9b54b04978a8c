"""CNI results: reading any version into the current (1.1.0) shape and writing any supported version.

Conversion follows the spec's rules (libcni pkg/types/{020,040,100}): 0.1/0.2 `ip4`/`ip6` become `ips`,
0.3/0.4 carry `ips[].version`, 1.1 adds interface `mtu`/`socketPath`/`pciID` that older versions drop.
Results are plain JSON dicts; these functions never mutate their input.
"""
from __future__ import annotations

import copy
import ipaddress
from typing import Any

from . import version as cniversion
from .errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, CNIError

Result = dict[str, Any]

_IFACE_10 = ("name", "mac", "sandbox")
_IFACE_11 = _IFACE_10 + ("mtu", "socketPath", "pciID")


def _fail(source: str, why: str) -> CNIError:
    return CNIError(DECODE_FAILURE, f"invalid result from {source}: {why}")


def _check_shape(res: Result, source: str) -> None:
    ifaces = res.get("interfaces", [])
    if not isinstance(ifaces, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in ifaces):
        raise _fail(source, "interfaces must be a list of objects with a name")
    ips = res.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(i, dict) and isinstance(i.get("address"), str) for i in ips):
        raise _fail(source, "ips must be a list of objects with an address")
    for ip in ips:
        try:
            ipaddress.ip_interface(ip["address"])
            if ip.get("gateway") is not None:
                ipaddress.ip_address(ip["gateway"])
        except (ValueError, TypeError):
            raise _fail(source, f"ips[] address {ip['address']!r} / gateway {ip.get('gateway')!r} is not an IP") from None
        idx = ip.get("interface")
        if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(ifaces)):
            raise _fail(source, f"ips[].interface {idx!r} does not index interfaces")
    routes = res.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, dict) and isinstance(r.get("dst"), str) for r in routes):
        raise _fail(source, "routes must be a list of objects with a dst")
    if not isinstance(res.get("dns", {}), dict):
        raise _fail(source, "dns must be an object")


def to_current(raw: object, version: str | None = None, source: str = "delegate") -> Result:
    """Read a result of any readable version into the 1.1.0 shape.

    `version` is what the caller expects; a `cniVersion` inside the result wins (libcni's
    fixupResultVersion substitutes the config version only when the result has none).
    """
    if not isinstance(raw, dict):
        raise _fail(source, "not a JSON object")
    ver = raw.get("cniVersion") or version or "0.1.0"
    if not isinstance(ver, str) or ver not in cniversion.READABLE:
        raise CNIError(INCOMPATIBLE_VERSION, f"unsupported result version {ver!r} from {source}")
    if ver in ("0.1.0", "0.2.0"):
        out = _from_02x(raw, source)
    else:
        # libcni decodes a JSON null list as empty
        out = {k: copy.deepcopy(raw[k]) for k in ("interfaces", "ips", "routes", "dns") if raw.get(k) is not None}
        _check_shape(out, source)
        for ip in out.get("ips", []):
            ip.pop("version", None)
    out["cniVersion"] = cniversion.CURRENT
    _check_shape(out, source)
    return out


def _from_02x(raw: Result, source: str) -> Result:
    ips: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    for key in ("ip4", "ip6"):
        block = raw.get(key)
        if block is None:
            continue
        if not isinstance(block, dict) or not isinstance(block.get("ip"), str):
            raise _fail(source, f"{key} must be an object with an ip")
        entry: dict[str, Any] = {"address": block["ip"]}
        if block.get("gateway"):
            entry["gateway"] = block["gateway"]
        ips.append(entry)
        block_routes = block.get("routes") or []
        if not isinstance(block_routes, list):
            raise _fail(source, f"{key}.routes must be a list")
        for r in block_routes:
            if isinstance(r, dict):
                routes.append({k: r[k] for k in ("dst", "gw") if k in r})
    out: Result = {}
    if ips:
        out["ips"] = ips
    if routes:
        out["routes"] = routes
    if isinstance(raw.get("dns"), dict):
        out["dns"] = copy.deepcopy(raw["dns"])
    return out


def family(address: str) -> str:
    """"4" or "6" for an address with or without a prefix length."""
    return "6" if ":" in address else "4"


def _dns_nonempty(dns: object) -> bool:
    return isinstance(dns, dict) and any(dns.get(k) for k in ("nameservers", "domain", "search", "options"))


def from_current(cur: Result, version: str) -> Result:
    """Write a 1.1.0-shaped result in `version` (one of version.SUPPORTED), omitting empty fields."""
    if version not in cniversion.SUPPORTED:
        raise CNIError(INCOMPATIBLE_VERSION, f"cannot convert result to version {version!r}")
    is11 = version == "1.1.0"
    legacy = not cniversion.at_least(version, "1.0.0")
    out: Result = {"cniVersion": version}
    keys = _IFACE_11 if is11 else _IFACE_10
    ifaces = [{k: i[k] for k in keys if i.get(k) not in (None, "")} for i in cur.get("interfaces", [])]
    if ifaces:
        out["interfaces"] = ifaces
    ips = []
    for ip in cur.get("ips", []):
        entry = {}
        if legacy:
            entry["version"] = family(ip["address"])
        entry.update({k: ip[k] for k in ("interface", "address", "gateway") if ip.get(k) is not None})
        ips.append(entry)
    if ips:
        out["ips"] = ips
    if cur.get("routes"):
        out["routes"] = copy.deepcopy(cur["routes"])
    if _dns_nonempty(cur.get("dns")):
        out["dns"] = {k: copy.deepcopy(v) for k, v in cur["dns"].items() if v}
    return out
