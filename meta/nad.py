"""Delegate networks: NetworkAttachmentDefinitions and CNI config files into normalised conflists.

A single plugin config is wrapped into a one-plugin list, so every delegate runs through the same
chain logic (meta/invoke/chain.py), exactly as libcni treats `.conf` files.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import attrs

from . import schema
from .cni import version as cniversion
from .cni.errors import INVALID_CONFIG, CNIError

RESOURCE_NAME = "k8s.v1.cni.cncf.io/resourceName"
CONF_SUFFIXES = (".conflist", ".conf", ".json")


@attrs.frozen
class NetworkConfig:
    """One delegate network as a conflist: name and version resolved, plugins in order."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...] = attrs.field(eq=False)
    origin: str  # "NAD ns/name" or a file path, for messages
    disable_check: bool = False
    disable_gc: bool = False
    resource_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": self.cni_version, "name": self.name, "plugins": copy.deepcopy(list(self.plugins))}
        if self.disable_check:
            out["disableCheck"] = True
        if self.disable_gc:
            out["disableGC"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str, resource_name: str | None = None) -> "NetworkConfig":
        """Inverse of to_dict (for configs read back from our own cache)."""
        return cls(
            name=data["name"], cni_version=data["cniVersion"], plugins=tuple(data["plugins"]), origin=origin,
            disable_check=bool(data.get("disableCheck")), disable_gc=bool(data.get("disableGC")),
            resource_name=resource_name,
        )

    def declares(self, capability: str) -> bool:
        """Whether any plugin of the list declares `capability` (so the runtime may send it)."""
        return any((p.get("capabilities") or {}).get(capability) is True for p in self.plugins)


def _boolish(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def parse_config(data: object, origin: str, default_name: str | None, default_version: str) -> NetworkConfig:
    """Validate a decoded CNI config or conflist (schemas/delegate.json) and normalise it."""
    schema.check("delegate", data, origin)
    assert isinstance(data, dict)
    chosen = cniversion.select(data.get("cniVersion"), data.get("cniVersions"))
    if data.get("cniVersion") is None and data.get("cniVersions") is None:
        chosen = default_version
    if chosen is None or chosen not in cniversion.READABLE:
        raise CNIError(INVALID_CONFIG, f"{origin}: cniVersion: no supported version in "
                       f"{data.get('cniVersion')!r} / {data.get('cniVersions')!r}; supported: {list(cniversion.READABLE)}")
    name = data.get("name") or default_name
    if not name:
        raise CNIError(INVALID_CONFIG, f"{origin}: name: missing network name")
    if "plugins" in data:
        plugins = tuple(copy.deepcopy(p) for p in data["plugins"])
    else:
        plugins = ({k: copy.deepcopy(v) for k, v in data.items() if k not in ("cniVersion", "cniVersions", "name")},)
    return NetworkConfig(
        name=name, cni_version=chosen, plugins=plugins, origin=origin,
        disable_check=_boolish(data.get("disableCheck")), disable_gc=_boolish(data.get("disableGC")),
    )


def load_file(path: Path, default_version: str) -> NetworkConfig:
    """A `.conf`, `.json` or `.conflist` file."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise CNIError(INVALID_CONFIG, f"cannot read CNI config {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise CNIError(INVALID_CONFIG, f"CNI config {path} is not valid JSON: {type(e).__name__}: {e}") from None
    return parse_config(data, str(path), None, default_version)


def find_in_dir(conf_dir: Path, name: str, default_version: str) -> NetworkConfig | None:
    """The config file in `conf_dir` whose network name is `name`; a conflist wins over a single config
    (NPWG §3.4.1), then file name order. Unreadable or invalid files are skipped: they are not this network.
    """
    try:
        files = sorted(p for p in conf_dir.iterdir() if p.suffix in CONF_SUFFIXES and p.is_file())
    except OSError:
        return None
    files.sort(key=lambda p: p.suffix != ".conflist")
    for path in files:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and data.get("name") == name:
            return load_file(path, default_version)
    return None


def first_in_dir(conf_dir: Path, default_version: str) -> NetworkConfig:
    """The alphabetically first config file of a directory (clusterNetwork given as a directory)."""
    try:
        files = sorted(p for p in conf_dir.iterdir() if p.suffix in CONF_SUFFIXES and p.is_file())
    except OSError as e:
        raise CNIError(INVALID_CONFIG, f"cannot read CNI config directory {conf_dir}: {e.strerror}") from None
    if not files:
        raise CNIError(INVALID_CONFIG, f"no CNI config (.conf, .conflist, .json) in {conf_dir}")
    return load_file(files[0], default_version)


def from_nad(obj: object, conf_dir: Path, default_version: str) -> NetworkConfig:
    """A NetworkAttachmentDefinition object into its delegate network.

    `spec.config` holds a config or conflist; when empty, the CNI config file of the NAD's name in
    `conf_dir` is used. A config without `name` gets the NAD's name (NPWG §3.4.2).
    """
    meta = obj.get("metadata", {}) if isinstance(obj, dict) else {}
    ref = f"{meta.get('namespace', '')}/{meta.get('name', '')}" if isinstance(meta, dict) else "?"
    what = f"NetworkAttachmentDefinition {ref}"
    schema.check("nad", obj, what)
    assert isinstance(obj, dict)
    nad_name = obj["metadata"]["name"]
    resource = (obj["metadata"].get("annotations") or {}).get(RESOURCE_NAME) or None
    text = (obj.get("spec") or {}).get("config") or ""
    if not text.strip():
        found = find_in_dir(conf_dir, nad_name, default_version)
        if found is None:
            raise CNIError(INVALID_CONFIG, f"{what}: spec.config is empty and no CNI config named {nad_name!r} is in {conf_dir}")
        return attrs.evolve(found, origin=f"{what} (file {found.origin})", resource_name=resource)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CNIError(INVALID_CONFIG, f"{what}: spec.config is not valid JSON: {type(e).__name__}: {e}") from None
    net = parse_config(data, f"{what} spec.config", nad_name, default_version)
    return attrs.evolve(net, resource_name=resource)
