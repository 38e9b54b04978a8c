"""Resolving network references (clusterNetwork, defaultNetworks, selection elements) to delegate configs.

This is the I/O half of planning: it asks the Source for NADs and reads CNI config files.
"""
from __future__ import annotations

from pathlib import Path

from .cni.errors import INVALID_CONFIG, CNIError
from .config import MetaConfig
from .nad import find_in_dir, first_in_dir, from_nad, load_file
from .plan import Target
from .selection import SelectionElement
from .sources import Source


def resolve_reference(ref: str, cfg: MetaConfig, source: Source, where: str) -> Target:
    """A clusterNetwork/defaultNetworks entry: an absolute path (file, or directory whose first config is
    used), a NAD `[namespace/]name` (namespace defaults to networksNamespace), or the network name of a CNI
    config file in confDir."""
    if ref.startswith("/"):
        path = Path(ref)
        net = first_in_dir(path, cfg.cni_version) if path.is_dir() else load_file(path, cfg.cni_version)
        return Target(name=net.name, network=net, where=where)
    ns, _, name = ref.rpartition("/")
    ns = ns or cfg.networks_namespace
    obj = source.get_nad(ns, name)
    if obj is not None:
        return Target(name=f"{ns}/{name}", network=from_nad(obj, Path(cfg.conf_dir), cfg.cni_version), where=where)
    net = find_in_dir(Path(cfg.conf_dir), ref, cfg.cni_version)
    if net is None:
        raise CNIError(INVALID_CONFIG, f"{where}: {ref!r} is neither a NetworkAttachmentDefinition {ns}/{name} "
                       f"nor the name of a CNI config in confDir {cfg.conf_dir}")
    return Target(name=net.name, network=net, where=where)


def resolve_element(el: SelectionElement, cfg: MetaConfig, source: Source, where: str) -> Target:
    """A NetworkSelectionElement: the NAD it names must exist."""
    obj = source.get_nad(el.namespace, el.name)
    if obj is None:
        raise CNIError(INVALID_CONFIG, f"{where}: NetworkAttachmentDefinition {el.ref} not found")
    return Target(name=el.ref, network=from_nad(obj, Path(cfg.conf_dir), cfg.cni_version), where=where, element=el)
