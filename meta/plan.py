"""Planning: a pod, its resolved networks and meta-cni's config into the ordered list of attachments.

Pure: no I/O. Everything a delegate invocation needs (and everything DEL needs later) is decided here:
interface names, capability arguments (runtimeConfig), CNI_ARGS, `args.cni`, device IDs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .cni import args as cniargs
from .cni.errors import INVALID_CONFIG, CNIError
from .nad import NetworkConfig
from .selection import SelectionElement

# NetworkSelectionElement fields that reach delegates as runtimeConfig, and the capability that carries each.
ELEMENT_CAPABILITIES = (
    ("ips", "ips", "ips"),
    ("mac", "mac", "mac"),
    ("port_mappings", "portMappings", "portMappings"),
    ("bandwidth", "bandwidth", "bandwidth"),
    ("infiniband_guid", "infinibandGUID", "infiniband-guid"),
)
# CNI_ARGS keys that request an address or MAC for the runtime's own (primary) interface only.
PRIMARY_ONLY_ARGS = ("IP", "MAC")


@attrs.frozen
class Target:
    """A network reference resolved to its delegate config. `where` names the reference in errors."""

    name: str
    network: NetworkConfig
    where: str
    element: SelectionElement | None = None


@attrs.frozen
class Attachment:
    """One delegate network to attach as `ifname`."""

    name: str
    ifname: str
    network: NetworkConfig
    is_default: bool = False
    capability_args: dict[str, Any] = attrs.field(factory=dict, eq=False)
    cni_args: cniargs.Pairs = ()
    args_cni: dict[str, Any] | None = attrs.field(default=None, eq=False)
    device_id: str | None = None
    device_info_file: str | None = None
    default_route: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "ifname": self.ifname, "network": self.network.to_dict(), "origin": self.network.origin,
            "resourceName": self.network.resource_name, "isDefault": self.is_default,
            "capabilityArgs": self.capability_args, "cniArgs": [list(p) for p in self.cni_args], "argsCni": self.args_cni,
            "deviceID": self.device_id, "deviceInfoFile": self.device_info_file,
            "defaultRoute": list(self.default_route) if self.default_route is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Attachment":
        return cls(
            name=d["name"], ifname=d["ifname"],
            network=NetworkConfig.from_dict(d["network"], d.get("origin", ""), d.get("resourceName")),
            is_default=bool(d.get("isDefault")), capability_args=dict(d.get("capabilityArgs") or {}),
            cni_args=tuple((k, v) for k, v in d.get("cniArgs") or ()), args_cni=d.get("argsCni"),
            device_id=d.get("deviceID"), device_info_file=d.get("deviceInfoFile"),
            default_route=tuple(d["defaultRoute"]) if d.get("defaultRoute") is not None else None,
        )


@attrs.frozen
class PodIdentity:
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    infra_container_id: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else "(no pod)"


def element_capabilities(target: Target) -> dict[str, Any]:
    el = target.element
    if el is None:
        return {}
    out: dict[str, Any] = {}
    for attr, capability, field in ELEMENT_CAPABILITIES:
        value = getattr(el, attr)
        if value in (None, ()):
            continue
        if not target.network.declares(capability):
            raise CNIError(INVALID_CONFIG, f"{target.where}.{field}: network {target.name} ({target.network.origin}) "
                           f"has no plugin with capability {capability!r}, so the request cannot be honoured")
        out[capability] = list(value) if isinstance(value, tuple) else value
    return out


def _args_cni(target: Target) -> dict[str, Any] | None:
    el = target.element
    if el is None:
        return None
    out: dict[str, Any] = dict(el.cni_args or {})
    if el.ipam_claim_reference:
        out["ipam-claim-reference"] = el.ipam_claim_reference
    return out or None


def _delegate_args(runtime_args: cniargs.Pairs, primary: bool) -> cniargs.Pairs:
    # Delegates must accept the K8S_POD_* keys, so IgnoreUnknown is always on.
    skip = {cniargs.IGNORE_UNKNOWN} | (set() if primary else set(PRIMARY_ONLY_ARGS))
    return ((cniargs.IGNORE_UNKNOWN, "true"),) + tuple((k, v) for k, v in runtime_args if k not in skip)


def build(
    *,
    ifname: str,
    container_id: str,
    runtime_args: cniargs.Pairs,
    runtime_config: Mapping[str, Any],
    primary: Target,
    defaults: Sequence[Target],
    selected: Sequence[Target],
    devices: Mapping[str, Sequence[str]],
    device_info_dir: str,
) -> tuple[Attachment, ...]:
    """The attachments in ADD order: the primary as `ifname`, then default networks, then selected ones."""
    explicit: dict[str, str] = {ifname: primary.where}
    for t in selected:
        if t.element and t.element.interface:
            if t.element.interface in explicit:
                raise CNIError(INVALID_CONFIG, f"{t.where}.interface: {t.element.interface!r} is already used by {explicit[t.element.interface]}")
            explicit[t.element.interface] = t.where
    taken = set(explicit)
    unused = {res: list(ids) for res, ids in devices.items()}
    out: list[Attachment] = []

    # The runtime's runtimeConfig belongs to the primary only (NPWG §7.5); element requests override it.
    primary_caps = dict(runtime_config) | element_capabilities(primary)
    out.append(_attachment(primary, ifname, True, primary_caps, _delegate_args(runtime_args, True), unused,
                           container_id, device_info_dir))
    for idx, t in enumerate([*defaults, *selected], start=1):
        if t.element and t.element.interface:
            name = t.element.interface
        else:
            name = f"net{idx}"
            n = 1
            while name in taken:
                name, n = f"net{n}", n + 1
            taken.add(name)
        out.append(_attachment(t, name, False, element_capabilities(t), _delegate_args(runtime_args, False), unused,
                               container_id, device_info_dir))
    return tuple(out)


def _attachment(t: Target, ifname: str, is_default: bool, caps: dict[str, Any], cni_args: cniargs.Pairs,
                unused: dict[str, list[str]], container_id: str, device_info_dir: str) -> Attachment:
    device = t.element.device_id if t.element else None
    resource = t.network.resource_name
    if resource:
        pool = unused.get(resource) or []
        if not pool:
            raise CNIError(INVALID_CONFIG, f"{t.where}: network {t.name} needs a device of resource {resource!r} "
                           "(k8s.v1.cni.cncf.io/resourceName) but none is left allocated to the pod")
        # The device kubelet allocated wins over a deviceID in the selection element, as in Multus.
        device = pool.pop(0)
    info_file = None
    if not is_default:
        info_file = f"{device_info_dir}/{t.name.replace('/', '-')}-{container_id}_{ifname}"
        caps = caps | {"CNIDeviceInfoFile": info_file}
    if device:
        caps = caps | {"deviceID": device}
    return Attachment(
        name=t.name, ifname=ifname, network=t.network, is_default=is_default, capability_args=caps,
        cni_args=cni_args, args_cni=_args_cni(t), device_id=device, device_info_file=info_file,
        default_route=t.element.default_route if t.element else None,
    )
