"""`metactl validate`: offline lint of NAD and pod manifests.

Checks what ADD would reject (schemas, annotation syntax, capabilities that selection elements need)
plus the field sanity of well-known delegate plugins, and reports every problem, one line each.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from . import nad, plan, schema, selection
from .cni.errors import CNIError
from .cni.version import CURRENT
from .ipam import config as ipamconfig
from .sources import manifests


@attrs.frozen
class Problem:
    file: str
    obj: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.obj}: {self.message}"


def _ipam_problems(ipam: dict[str, Any]) -> list[str]:
    out = []
    ranges = [r for rs in ipam.get("ranges") or [] if isinstance(rs, list) for r in rs if isinstance(r, dict)]
    if isinstance(ipam.get("subnet"), str):
        ranges.append(ipam)
    for r in ranges:
        try:
            net = ipaddress.ip_network(r["subnet"], strict=False)
        except (ValueError, KeyError, TypeError):
            out.append(f"ipam.subnet: {r.get('subnet')!r} is not a CIDR")
            continue
        for key in ("rangeStart", "rangeEnd", "gateway"):
            if isinstance(r.get(key), str):
                try:
                    if ipaddress.ip_address(r[key]) not in net:
                        out.append(f"ipam.{key}: {r[key]} is outside subnet {net}")
                except ValueError:
                    out.append(f"ipam.{key}: {r[key]!r} is not an IP address")
    return out


META_IPAM = "meta-ipam"


def _meta_ipam_problems(ipam: dict[str, Any], network: str) -> list[str]:
    """What meta-ipam's ADD would refuse in its config (code 7): the schema, then the parse (ranges,
    gateways, routes, block sizes), each naming the field."""
    found = schema.problems("ipam", {"ipam": ipam})
    if found:
        return found
    try:
        ipamconfig.parse(ipam, network)
    except ipamconfig.ConfigError as e:
        return [str(e)]
    return []


def _plugin_label(net: nad.NetworkConfig, i: int) -> str:
    return f"plugins[{i}] ({net.plugins[i]['type']})" if len(net.plugins) > 1 else str(net.plugins[i]["type"])


def delegate_problems(net: nad.NetworkConfig) -> list[str]:
    """Sanity of each plugin of a delegate network (known types only)."""
    out = []
    for i, plugin in enumerate(net.plugins):
        prefix = _plugin_label(net, i)
        out += [f"{prefix}: {p}" for p in schema.plugin_problems(plugin["type"], plugin)]
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type"):
            out += [f"{prefix}: ipam: {p}" for p in schema.plugin_problems(ipam["type"], ipam)]
            if ipam["type"] == "host-local":
                out += [f"{prefix}: {p}" for p in _ipam_problems(ipam)]
            elif ipam["type"] == META_IPAM:
                out += [f"{prefix}: {p}" for p in _meta_ipam_problems(ipam, net.name)]
    return out


def _meta_ipam_pools(net: nad.NetworkConfig) -> list[tuple[str, ipamconfig.PoolSpec]]:
    """The meta-ipam pools a valid network uses, with the plugin they are configured in."""
    out = []
    for i, plugin in enumerate(net.plugins):
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == META_IPAM and not _meta_ipam_problems(ipam, net.name):
            out.append((_plugin_label(net, i), ipamconfig.parse(ipam, net.name).pool))
    return out


def pool_disagreements(nads: dict[str, nad.NetworkConfig | None]) -> list[tuple[str, str]]:
    """(NAD ref, problem) for each NAD whose meta-ipam pool (network_name) is shared with an earlier NAD
    that gives it other ranges or block sizes: the ADD of the later one would be refused (code 7)."""
    first: dict[str, tuple[str, ipamconfig.PoolSpec]] = {}
    out = []
    for ref, net in nads.items():
        for label, pool in _meta_ipam_pools(net) if net is not None else []:
            seen = first.setdefault(pool.network_name, (ref, pool))
            if seen[0] != ref and not pool.agrees_with(seen[1].data()):
                out.append((ref, f"{label}: ipam.network_name: pool {pool.network_name!r} is also used by "
                                 f"NetworkAttachmentDefinition {seen[0]} with ranges {seen[1].data()['ranges']}; "
                                 f"this one has {pool.data()['ranges']}: NADs sharing a pool need the same "
                                 f"ranges and block_size"))
    return out


def _objects(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    import yaml

    try:
        docs = list(yaml.load_all(path.read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except OSError as e:
        return [], f"cannot read: {e.strerror}"
    except yaml.YAMLError as e:
        return [], f"not valid YAML: {' '.join(str(e).split())}"
    out = []
    for doc in docs:
        items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        out += [o for o in items if isinstance(o, dict)]
    return out, None


def _ref(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return f"{obj.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"


def validate(paths: Iterable[Path], conf_dir: Path | None = None) -> tuple[list[Problem], int]:
    """All problems in the given manifest files (directories are searched) and the number of objects checked."""
    files: list[Path] = []
    for p in paths:
        files += manifests.ManifestsSource(str(p)).files() if p.is_dir() else [p]
    problems: list[Problem] = []
    nads: dict[str, nad.NetworkConfig | None] = {}
    files_of: dict[str, str] = {}
    pods: list[tuple[str, dict[str, Any]]] = []
    count = 0
    for f in files:
        objs, err = _objects(f)
        if err:
            problems.append(Problem(str(f), "file", err))
        for obj in objs:
            kind = obj.get("kind")
            if kind == "NetworkAttachmentDefinition":
                count += 1
                ref = _ref(obj)
                net, found = nad_problems(obj, conf_dir)
                nads[ref.split(" ", 1)[1]] = net
                files_of[ref.split(" ", 1)[1]] = str(f)
                problems += [Problem(str(f), ref, p) for p in found]
            elif kind == "Pod":
                count += 1
                pods.append((str(f), obj))
    problems += [Problem(files_of[ref], f"NetworkAttachmentDefinition {ref}", m) for ref, m in pool_disagreements(nads)]
    for f, obj in pods:
        problems += [Problem(f, _ref(obj), m) for m in _pod_problems(obj, nads)]
    return problems, count


def nad_problems(obj: dict[str, Any], conf_dir: Path | None = None) -> tuple[nad.NetworkConfig | None, list[str]]:
    """Every problem of one NetworkAttachmentDefinition object, as "field: message" lines, and its delegate
    network when it could be resolved (None when it is broken, or its empty spec.config can only be resolved
    from a conf dir on the node and `conf_dir` is not given)."""
    ref = _ref(obj)
    try:
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        if not str(spec.get("config") or "").strip() and conf_dir is None:
            schema.check("nad", obj, ref)
            return None, []
        net = nad.from_nad(obj, conf_dir or Path("/nonexistent"), CURRENT)
        return net, delegate_problems(net)
    except CNIError as e:
        return None, [_strip(m, ref) for m in (e.details.split("; ") if e.details else [e.msg])]


def _strip(message: str, ref: str) -> str:
    for prefix in (f"{ref} spec.config: ", f"{ref}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _pod_problems(obj: dict[str, Any], nads: dict[str, nad.NetworkConfig | None]) -> list[str]:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    ns = meta.get("namespace") or "default"
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict):
        return ["metadata.annotations: must be a map"]
    out = []
    try:
        if selection.DEFAULT_NETWORK in ann:
            selection.parse_default_network(str(ann[selection.DEFAULT_NETWORK]), "kube-system", f"annotation {selection.DEFAULT_NETWORK}")
        elements = selection.parse(str(ann.get(selection.NETWORKS, "")), ns, f"annotation {selection.NETWORKS}")
    except CNIError as e:
        return [e.msg]
    for i, el in enumerate(elements):
        where = f"annotation {selection.NETWORKS}: [{i}]"
        if el.ref not in nads:
            out.append(f"{where}: NetworkAttachmentDefinition {el.ref} is not among the validated manifests")
            continue
        net = nads[el.ref]
        if net is None:
            continue
        try:
            plan.element_capabilities(plan.Target(name=el.ref, network=net, where=where, element=el))
        except CNIError as e:
            out.append(e.msg)
    return out
