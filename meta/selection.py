"""The `k8s.v1.cni.cncf.io/networks` annotation: both NPWG forms into NetworkSelectionElements.

Comma form: `[<namespace>/]<name>[@<interface>]`, comma separated. JSON form: a list of objects, validated
against schemas/selection.json. An invalid annotation is an error here (the spec allows ignoring it; silently
dropping networks that an operator asked for is worse than refusing the pod).
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import attrs

from . import schema
from .cni.errors import INVALID_CONFIG, CNIError

NETWORKS = "k8s.v1.cni.cncf.io/networks"
DEFAULT_NETWORK = "v1.multus-cni.io/default-network"
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")


@attrs.frozen
class SelectionElement:
    """One requested attachment (NPWG NetworkSelectionElement)."""

    name: str
    namespace: str
    interface: str | None = None
    ips: tuple[str, ...] = ()
    mac: str | None = None
    # None: not requested; a tuple of gateway IPs otherwise (the spec lets one element claim the default route).
    default_route: tuple[str, ...] | None = None
    port_mappings: tuple[dict[str, Any], ...] = attrs.field(default=(), eq=False)
    bandwidth: dict[str, Any] | None = attrs.field(default=None, eq=False)
    cni_args: dict[str, Any] | None = attrs.field(default=None, eq=False)
    infiniband_guid: str | None = None
    device_id: str | None = None
    ipam_claim_reference: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _is_json(value: str) -> bool:
    return any(c in value for c in '[{"')


def parse(value: str, pod_namespace: str, where: str) -> tuple[SelectionElement, ...]:
    """Parse an annotation value; `where` names its origin in errors (e.g. `pod ns/name annotation X`)."""
    value = value.strip()
    if not value:
        return ()
    elements = _parse_json(value, pod_namespace, where) if _is_json(value) else _parse_comma(value, pod_namespace, where)
    with_route = [i for i, e in enumerate(elements) if e.default_route is not None]
    if len(with_route) > 1:
        raise CNIError(INVALID_CONFIG, f"{where}: [{with_route[1]}].default-route: only one network may request the default route "
                       f"(also requested by [{with_route[0]}])")
    return elements


def _parse_comma(value: str, pod_namespace: str, where: str) -> tuple[SelectionElement, ...]:
    out = []
    for i, item in enumerate(value.split(",")):
        item = item.strip()
        name, _, ifname = item.partition("@")
        ns, slash, name = name.rpartition("/")
        field = f"{where}: [{i}]"
        if slash and (not _LABEL.match(ns) or len(ns) > 63):
            raise CNIError(INVALID_CONFIG, f"{field}: namespace {ns!r} is not a valid namespace name")
        if not _NAME.match(name) or len(name) > 253:
            raise CNIError(INVALID_CONFIG, f"{field}: network name {name!r} is not a valid object name "
                           "(expected [<namespace>/]<name>[@<interface>])")
        if "@" in item:
            _check_ifname(ifname, f"{field}: interface")
        out.append(SelectionElement(name=name, namespace=ns or pod_namespace, interface=ifname or None))
    return tuple(out)


def _check_ifname(ifname: str, field: str) -> None:
    from .cni.request import validate_ifname

    why = validate_ifname(ifname)
    if why:
        raise CNIError(INVALID_CONFIG, f"{field} {ifname!r} {why}")


def _parse_json(value: str, pod_namespace: str, where: str) -> tuple[SelectionElement, ...]:
    try:
        data = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise CNIError(INVALID_CONFIG, f"{where}: not valid JSON: {type(e).__name__}: {e}") from None
    schema.check("selection", data, where)
    out = []
    for i, raw in enumerate(data):
        field = f"{where}: [{i}]"
        ips = tuple(raw.get("ips", ()))
        for ip in ips:
            try:
                ipaddress.ip_interface(ip)
            except ValueError:
                raise CNIError(INVALID_CONFIG, f"{field}.ips: {ip!r} is not an IP address or CIDR") from None
        route = raw.get("default-route")
        if route is not None:
            families = set()
            for gw in route:
                try:
                    fam = ipaddress.ip_address(gw).version
                except ValueError:
                    raise CNIError(INVALID_CONFIG, f"{field}.default-route: {gw!r} is not an IP address") from None
                if fam in families:
                    raise CNIError(INVALID_CONFIG, f"{field}.default-route: more than one IPv{fam} gateway (ECMP is not supported)")
                families.add(fam)
        if ips and raw.get("ipam-claim-reference"):
            raise CNIError(INVALID_CONFIG, f"{field}: ips and ipam-claim-reference are mutually exclusive")
        iface = raw.get("interface") or raw.get("interfaceRequest")
        out.append(
            SelectionElement(
                name=raw["name"],
                namespace=raw.get("namespace") or pod_namespace,
                interface=iface,
                ips=ips,
                mac=raw.get("mac"),
                default_route=tuple(route) if route is not None else None,
                port_mappings=tuple(raw.get("portMappings", ())),
                bandwidth=raw.get("bandwidth"),
                cni_args=raw.get("cni-args"),
                infiniband_guid=raw.get("infiniband-guid"),
                device_id=raw.get("deviceID"),
                ipam_claim_reference=raw.get("ipam-claim-reference"),
            )
        )
    return tuple(out)


def parse_default_network(value: str, default_namespace: str, where: str) -> SelectionElement:
    """The `v1.multus-cni.io/default-network` override: exactly one element, same grammar."""
    elements = parse(value, default_namespace, where)
    if len(elements) != 1:
        raise CNIError(INVALID_CONFIG, f"{where}: must name exactly one network, got {len(elements)}")
    return elements[0]
