"""`meta-ipam`, the CNI IPAM plugin: in-process for meta-cni's built-in delegates, or exec'd by any plugin.

ADD allocates one address per range (see config.py for the fields) and answers with gateways, routes and DNS;
DEL frees exactly this attachment's addresses (CNI_CONTAINERID + CNI_IFNAME), succeeding when there are none;
CHECK verifies the attachment still holds an address in every range (and every prevResult address); STATUS
checks that the store answers; GC frees this node's allocations of this network whose attachment is not in
`cni.dev/valid-attachments` (collect.py says which). The owner recorded with every address is the attachment,
the network's name and the pod from CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID). Static
addresses come from runtimeConfig.ips (the `ips` capability), args.cni.ips and CNI_ARGS IP=; a sticky claim
from args.cni.ipam-claim-reference, or, with `sticky: true`, a StatefulSet pod's name.

The store is the cluster's (`kubeconfig` in the ipam config: custom resources) or, standalone, files under
`dataDir` with a file lock. Allocators are kept per store and node for the life of the process, so the
daemon reuses its cache of this node's blocks.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from delegates._plugin import PluginArgs
from meta import schema
from meta.cni import request as cnirequest
from meta.cni import version as cniversion
from meta.cni.errors import INTERNAL, INVALID_CONFIG, NOT_AVAILABLE, TRY_AGAIN_LATER, CNIError

from . import collect, config
from .allocator import Allocator, Lease
from .config import ConfigError, IpamConf, Request
from .ranges import Address, pool_object_name
from .store import BLOCK, POOL, Store, Unavailable

log = logging.getLogger("meta-ipam")

_allocators: dict[tuple[Any, ...], Allocator] = {}
_stores: dict[tuple[Any, ...], Store] = {}
_guard = threading.Lock()
_standalone = False


def _what(args: PluginArgs) -> str:
    return f'meta-ipam: network "{args.config.get("name") or ""}"'


def load_conf(args: PluginArgs) -> IpamConf:
    """The ipam config alone (STATUS and GC ask on behalf of no attachment)."""
    ipam = args.config.get("ipam")
    if _standalone and schema.memo.path is None:
        # The exec'd plugin keeps the digests of validated configs beside its data, sparing later calls
        # the ~80 ms jsonschema import (meta-cni does the same in its cniDir).
        data_dir = ipam.get("dataDir") if isinstance(ipam, dict) else None
        base = data_dir if isinstance(data_dir, str) and data_dir.startswith("/") else config.DEFAULT_DATA_DIR
        schema.use_memo(Path(base) / ".schema-memo.json")
    schema.check("ipam", {"ipam": ipam}, _what(args))
    try:
        return config.parse(ipam, str(args.config.get("name") or ""))
    except ConfigError as e:
        raise CNIError(INVALID_CONFIG, f"{_what(args)}: {e}") from None


def load(args: PluginArgs) -> tuple[IpamConf, Request]:
    conf = load_conf(args)
    raw_args = args.config.get("args")
    args_cni = raw_args.get("cni") if isinstance(raw_args, dict) else None
    try:
        req = config.parse_request(container_id=args.container_id, ifname=args.ifname, network=conf.network,
                                   cni_args=args.cni_args, runtime_config=args.runtime_config,
                                   args_cni=args_cni if isinstance(args_cni, dict) else {}, sticky=conf.sticky)
    except ConfigError as e:
        raise CNIError(INVALID_CONFIG, f"{_what(args)}: {e}") from None
    return conf, req


def node_name(conf: IpamConf) -> str:
    return config.node_name(conf.node_name)


def _store_key(conf: IpamConf) -> tuple[Any, ...]:
    return ("kube", conf.kubeconfig, conf.api_timeout) if conf.kubeconfig else ("file", conf.data_dir)


def open_store(conf: IpamConf) -> Store:
    key = _store_key(conf)
    with _guard:
        store = _stores.get(key)
        if store is not None:
            return store
    if conf.kubeconfig:
        try:
            # Imported only in cluster mode: the kubernetes client costs ~230 ms.
            from .kubestore import KubeStore
        except ImportError as e:
            raise CNIError(INTERNAL, f"meta-ipam: kubeconfig is set but the cluster store is not available: {e}") \
                from None
        try:
            store = KubeStore.from_kubeconfig(conf.kubeconfig, conf.api_timeout)
        except Unavailable as e:
            raise CNIError(11, f"meta-ipam: cluster store unavailable: {e}") from None
    else:
        from .filestore import FileStore

        store = FileStore(conf.data_dir)
    with _guard:
        return _stores.setdefault(key, store)


def allocator_for(conf: IpamConf) -> Allocator:
    node = node_name(conf)
    key = (*_store_key(conf), node)
    store = open_store(conf)
    with _guard:
        return _allocators.setdefault(key, Allocator(store, node))


def result(conf: IpamConf, leases: list[Lease]) -> dict[str, Any]:
    ips = []
    for lease in leases:
        ip: dict[str, Any] = {"address": lease.cidr}
        if lease.gateway is not None:
            ip["gateway"] = str(lease.gateway)
        ips.append(ip)
    out: dict[str, Any] = {"cniVersion": cniversion.CURRENT, "ips": ips}
    if conf.routes:
        out["routes"] = [dict(r) for r in conf.routes]
    if conf.dns:
        out["dns"] = dict(conf.dns)
    return out


def _prev_addresses(args: PluginArgs) -> list[Address]:
    try:
        prev = args.prev_result() or {}
    except CNIError:
        return []  # a hint only: without it DEL searches wider
    out: list[Address] = []
    for ip in prev.get("ips") or []:
        try:
            out.append(ipaddress.ip_interface(ip["address"]).ip)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def cmd_add(args: PluginArgs) -> dict[str, Any]:
    conf, req = load(args)
    families = [r.version for r in conf.pool.ranges]
    if (families.count(4) > 1 or families.count(6) > 1) and not cniversion.at_least(args.cni_version, "0.3.0"):
        raise CNIError(INVALID_CONFIG, f"{_what(args)}: CNI version {args.cni_version} does not support more than "
                                       f"one address per family")
    leases = allocator_for(conf).allocate(conf.pool, req.owner, static=req.static, claim=req.claim)
    return result(conf, leases)


def cmd_del(args: PluginArgs) -> None:
    conf, req = load(args)
    allocator_for(conf).release(conf.pool, req.owner, hints=[*_prev_addresses(args), *req.static])


def cmd_check(args: PluginArgs) -> None:
    conf, req = load(args)
    prev = _prev_addresses(args)
    held = allocator_for(conf).held(conf.pool, req.owner, hints=prev)
    for i, r in enumerate(conf.pool.ranges):
        if i not in held:
            raise CNIError(INTERNAL, f'{_what(args)}: {req.owner} holds no address in range {r.canonical()} of pool '
                                     f'"{conf.pool.network_name}"')
    mine = set(held.values())
    for a in prev:
        if any(r.version == a.version and r.contains(int(a)) for r in conf.pool.ranges) and a not in mine:
            raise CNIError(INTERNAL, f'{_what(args)}: prevResult address {a} is not held by {req.owner} in pool '
                                     f'"{conf.pool.network_name}"')


def cmd_status(args: PluginArgs) -> None:
    conf = load_conf(args)
    try:
        open_store(conf).get(POOL, pool_object_name(conf.pool.network_name))
    except (Unavailable, CNIError) as e:
        raise CNIError(NOT_AVAILABLE, f"{_what(args)}: IPAM store not available: {getattr(e, 'msg', e)}") from None


def cmd_gc(args: PluginArgs) -> None:
    """CNI GC: free this node's allocations of this network (in its pool) whose attachment the runtime no
    longer lists; released sticky addresses, other nodes' and other networks' allocations stay (collect.py)."""
    conf = load_conf(args)
    valid = cnirequest.valid_attachments(args.config)
    allocator = allocator_for(conf)
    pool = conf.pool.network_name
    try:
        blocks = {o.name: o for o in allocator.store.list(BLOCK, pool)}
    except Unavailable as e:
        raise CNIError(TRY_AGAIN_LATER, f"{_what(args)}: IPAM store unavailable: {e}") from None
    stale = collect.stale_attachments(blocks.values(), node=allocator.node, network=conf.network, valid=valid)
    for h in allocator.free(pool, stale, blocks):
        log.info("meta-ipam GC: %s %s of pool %s (network %s, %s)", h.outcome, h.ip, pool, conf.network,
                 h.describe())


def main() -> int:
    from delegates._plugin import standalone_main

    global _standalone
    _standalone = True
    try:
        return standalone_main(sys.modules[__name__], "meta-ipam")
    finally:
        schema.memo.flush()


if __name__ == "__main__":
    sys.exit(main())
