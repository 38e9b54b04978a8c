"""The meta plugin's commands: ADD, DEL, CHECK, STATUS and GC over the Source, Invoker and Cache seams.

ADD: plan every attachment, persist the plan, run the delegates in order (rolling back in reverse on the
first failure), publish the network-status, answer with the primary's result. DEL: from the cache only,
in reverse, going on past failures; the cache entry is removed only when every delegate DEL succeeded,
so a failed DEL can be retried and nothing is leaked.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from . import config as metaconfig
from . import devices, netns, plan, schema, selection, status
from .cache import Cache, Record
from .cni import args as cniargs
from .cni import request as cnirequest
from .cni import result as cniresult
from .cni import version as cniversion
from .cni.errors import INCOMPATIBLE_VERSION, INTERNAL, INVALID_CONFIG, NOT_AVAILABLE, UNKNOWN_CONTAINER, CNIError
from .invoke import Invocation, Invoker, chain
from .invoke.exec import ExecInvoker
from .networks import resolve_element, resolve_reference
from .sources import Pod, Source, SourceFactory, open_source

if TYPE_CHECKING:
    from .invoke.workers import Spread, Worker  # multiprocessing: the daemon's, not thin mode's, import

log = logging.getLogger("meta-cni")
MAX_PARALLEL = 8


@attrs.define
class Context:
    """Everything one command works with; the seams are fields so tests and the daemon can swap them."""

    req: cnirequest.Request
    cfg: metaconfig.MetaConfig
    invoker: Invoker
    _source: Source | None = None
    sources: SourceFactory = open_source
    # The daemon's attachment workers (meta/invoke/workers.py); None: every attachment is made here.
    spread: Spread | None = None

    @property
    def source(self) -> Source:
        if self._source is None:
            self._source = self.sources(self.cfg)
        return self._source

    @property
    def cache(self) -> Cache:
        return Cache(self.cfg.cni_dir, self.req.network_name)

    def invocation(self, command: str, netns: str | None = None) -> Invocation:
        path = ((self.cfg.bin_dir,) if self.cfg.bin_dir else ()) + self.req.path
        return Invocation(command=command, container_id=self.req.container_id,
                          netns=self.req.netns if netns is None else netns, ifname="",
                          cni_args=cniargs.render(self.req.args), path=path, where="")


def run(env: Mapping[str, str], stdin: bytes, invoker: Invoker | None = None, source: Source | None = None,
        sources: SourceFactory = open_source, spread: Spread | None = None) -> str | None:
    """Execute one CNI command; the text to print on success (None for no output). A long-lived caller (the
    daemon) passes `invoker` and `sources` that keep their state (watch caches, sockets) across calls, and
    `spread`, its worker processes for attachments."""
    req = cnirequest.parse(env, stdin)
    cni_dir = req.config.get("cniDir")
    cni_dir = cni_dir if isinstance(cni_dir, str) and cni_dir.startswith("/") else metaconfig.DEFAULTS["cniDir"]
    schema.use_memo(Path(cni_dir) / ".schema-memo.json")
    try:
        try:
            cfg = metaconfig.load(req.config)
        except CNIError as e:
            if req.command != "DEL":
                raise
            # DEL needs only the cache; a config that broke after ADD must not leak what ADD made.
            log.warning("DEL with an invalid config (%s): deleting from the cache in %s", e.msg, cni_dir)
            raw = {k: req.config.get(k) for k in ("binDir", "manifestsDir", "kubeconfig")}
            cfg = metaconfig.MetaConfig(
                name=req.network_name, cni_version=req.cni_version, cluster_network="", cni_dir=cni_dir,
                bin_dir=raw["binDir"] if isinstance(raw["binDir"], str) else None,
                manifests_dir=raw["manifestsDir"] if isinstance(raw["manifestsDir"], str) else metaconfig.DEFAULTS["manifestsDir"],
                kubeconfig=raw["kubeconfig"] if isinstance(raw["kubeconfig"], str) else None,
            )
        ctx = Context(req=req, cfg=cfg, invoker=invoker or default_invoker(cfg), source=source, sources=sources,
                      spread=spread)
        handler = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}[req.command]
        out = handler(ctx)
    finally:
        schema.memo.flush()
    return json.dumps(out, indent=4) if out is not None else None


def default_invoker(cfg: metaconfig.MetaConfig) -> Invoker:
    """Built-in delegates in-process, any other plugin exec'd from the CNI path."""
    from .invoke.builtin import BuiltinInvoker

    return BuiltinInvoker(ExecInvoker(cfg.delegate_timeout), cfg.builtin_standard_types)


# --- ADD ----------------------------------------------------------------------------------------------

def pod_identity(req: cnirequest.Request) -> plan.PodIdentity:
    name = req.pod_arg(cniargs.POD_NAME)
    return plan.PodIdentity(
        namespace=(req.pod_arg(cniargs.POD_NAMESPACE) or "default") if name else None, name=name,
        uid=req.pod_arg(cniargs.POD_UID) or None, infra_container_id=req.pod_arg(cniargs.POD_INFRA_CONTAINER_ID),
    )


def _isolation(ctx: Context, el: selection.SelectionElement, pod_ns: str, where: str, extra: tuple[str, ...] = ()) -> None:
    cfg = ctx.cfg
    if cfg.namespace_isolation and el.namespace != pod_ns and el.namespace not in cfg.global_namespaces + extra:
        raise CNIError(INVALID_CONFIG, f"{where}.namespace: network {el.ref} is in another namespace and "
                       f"namespaceIsolation allows only {pod_ns!r} and {list(cfg.global_namespaces + extra)}")


def build_plan(ctx: Context, ident: plan.PodIdentity, pod: Pod | None) -> tuple[plan.Attachment, ...]:
    """The attachments to make for the pod as the source knows it (None if it does not)."""
    cfg, req = ctx.cfg, ctx.req
    if pod is None and ident.name:
        log.info("pod %s not in the source: attaching the cluster and default networks only", ident.ref)
    if pod and pod.uid and ident.uid and pod.uid != ident.uid:
        raise CNIError(UNKNOWN_CONTAINER, f"pod {pod.ref}: UID {pod.uid} in the source differs from K8S_POD_UID {ident.uid} "
                       "(the sandbox belongs to an older pod of the same name)")
    ann = pod.annotations if pod else {}
    where_pod = f"pod {pod.ref}" if pod else ""
    if pod and selection.DEFAULT_NETWORK in ann:
        where = f"{where_pod}: annotation {selection.DEFAULT_NETWORK}"
        el = selection.parse_default_network(ann[selection.DEFAULT_NETWORK], cfg.networks_namespace, where)
        _isolation(ctx, el, pod.namespace, where, (cfg.networks_namespace,))
        primary = resolve_element(el, cfg, ctx.source, where)
    else:
        primary = resolve_reference(cfg.cluster_network, cfg, ctx.source, "meta-cni config clusterNetwork")
    defaults = []
    if not (pod and pod.namespace in cfg.system_namespaces):
        defaults = [resolve_reference(r, cfg, ctx.source, f"meta-cni config defaultNetworks[{i}]")
                    for i, r in enumerate(cfg.default_networks)]
    selected = []
    if pod:
        where = f"{where_pod}: annotation {selection.NETWORKS}"
        for i, el in enumerate(selection.parse(ann.get(selection.NETWORKS, ""), pod.namespace, where)):
            _isolation(ctx, el, pod.namespace, f"{where}: [{i}]")
            selected.append(resolve_element(el, cfg, ctx.source, f"{where}: [{i}]"))
    allocated: dict[str, list[str]] = {}
    if any(t.network.resource_name for t in [primary, *defaults, *selected]):
        allocated = devices.allocated(Path(cfg.kubelet_checkpoint), (pod.uid if pod else None) or ident.uid)
    return plan.build(
        ifname=req.ifname, container_id=req.container_id, runtime_args=req.args, runtime_config=cfg.runtime_config,
        primary=primary, defaults=defaults, selected=selected, devices=allocated, device_info_dir=cfg.device_info_dir,
    )


def _read_device_info(att: plan.Attachment) -> dict[str, Any] | None:
    if not att.device_info_file:
        return None
    try:
        data = json.loads(Path(att.device_info_file).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_device_info(att: plan.Attachment) -> None:
    if att.device_info_file:
        try:
            os.unlink(att.device_info_file)
        except OSError:
            pass


def _apply_default_route(ctx: Context, atts: tuple[plan.Attachment, ...], results: list[dict[str, Any]]) -> None:
    """The NPWG `default-route` request: the element's gateways become the pod's only default routes."""
    for i, att in enumerate(atts):
        if not att.default_route:
            continue
        netns.set_default_route(ctx.req.netns, att.ifname, att.default_route)
        for gw in att.default_route:
            dst = "::/0" if ":" in gw else "0.0.0.0/0"
            for res in results:
                res["routes"] = [r for r in res.get("routes") or [] if r.get("dst") != dst]
            results[i].setdefault("routes", []).append({"dst": dst, "gw": gw})


class _Attacher:
    """Runs the delegates of one ADD and keeps the cache current: a result in the cache means "this
    attachment's ADD completed, so DEL must succeed for it"."""

    def __init__(self, ctx: Context, record: Record) -> None:
        self.ctx = ctx
        self.record = record
        self.atts = record.attachments
        self.results: list[dict[str, Any] | None] = [None] * len(self.atts)
        self.started: set[int] = set()
        self.base = ctx.invocation("ADD")
        self.lock = threading.Lock()

    def attach(self, i: int) -> None:
        self._done(i, self._make(i))

    def _make(self, i: int) -> dict[str, Any]:
        with self.lock:
            self.started.add(i)
        return chain.add(self.atts[i], self.ctx.invoker, self.base)

    def _done(self, i: int, res: dict[str, Any]) -> None:
        with self.lock:
            self.results[i] = res
            self.record = attrs.evolve(self.record, results=tuple(self.results))
            self.ctx.cache.save(self.record, durable=False)

    def in_process(self, i: int) -> bool:
        """Whether attachment i runs entirely in this process (its plugins and their IPAM built in)."""
        in_process = getattr(self.ctx.invoker, "in_process", None)
        if in_process is None:
            return False
        types = [p.get("type", "") for p in self.atts[i].network.plugins]
        types += [p["ipam"].get("type", "") for p in self.atts[i].network.plugins
                  if isinstance(p.get("ipam"), dict) and p["ipam"].get("type")]
        return all(in_process(t) for t in types)

    def attach_all(self, parallel: bool) -> None:
        """The primary first (NPWG: the cluster network comes first); the others in order, or, when
        `parallel`, side by side (they are independent: distinct interfaces, and IPAM stores lock): exec'd
        ones on threads, in-process ones in the daemon's idle attachment workers (meta/invoke/workers.py),
        the rest in this thread. In-process attachments are never spread over threads: they are CPU-bound
        Python, so threads only add GIL and event-loop contention (measured: three built-in attachments took
        2.6x longer on threads than one after the other). The primary's result is saved once the others
        are under way: that write then overlaps their work instead of delaying it."""
        primary = self._make(0)
        rest = list(range(1, len(self.atts)))
        execd = [i for i in rest if not self.in_process(i)] if parallel else []
        mine = [i for i in rest if i not in execd]
        spread = self.ctx.spread if parallel and len(mine) > 1 else None
        # This thread keeps one in-process attachment (it would only wait otherwise); workers take the others.
        remote = dict(zip(mine, spread.lease(len(mine) - 1))) if spread is not None else {}
        mine = [i for i in mine if i not in remote]
        if not remote and len(execd) < 2 and not (execd and mine):
            self._done(0, primary)
            for i in rest:
                self.attach(i)
            return
        errors: dict[int, BaseException] = {}
        sent = self._send(remote)
        mine = sorted(set(mine) | (set(remote) - set(sent)))
        with contextlib.ExitStack() as stack:
            futures = {}
            if execd:
                from concurrent.futures import ThreadPoolExecutor

                pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(len(execd), MAX_PARALLEL),
                                                              thread_name_prefix="attach"))
                futures = {i: pool.submit(self.attach, i) for i in execd}
            try:
                self._done(0, primary)
            except Exception as e:  # the others are under way: they finish, then rollback sees all
                errors[0] = e
            for i in mine:
                try:
                    self.attach(i)
                except Exception as e:  # the others still finish, then rollback sees all
                    errors[i] = e
            self._receive(sent, errors)
        errors.update({i: e for i, f in futures.items() if (e := f.exception()) is not None})
        if errors:
            raise errors[min(errors)]  # the first by attachment order

    def _send(self, remote: dict[int, Worker]) -> dict[int, Worker]:
        """Hand each attachment to its worker; those it could not hand over (a worker that died while idle:
        nothing of theirs was made) are left out, for this thread to make."""
        sent: dict[int, Worker] = {}
        for i, worker in remote.items():
            assert self.ctx.spread is not None
            try:
                self.ctx.spread.send(worker, self.atts[i], self.base)
            except (OSError, ValueError) as e:
                log.warning("attachment worker unavailable (%s): making %s here", e, self.atts[i].name)
                worker.kill()
                self.ctx.spread.give_back(worker)
                continue
            with self.lock:
                self.started.add(i)
            sent[i] = worker
        return sent

    def _receive(self, sent: dict[int, Worker], errors: dict[int, BaseException]) -> None:
        for i, worker in sent.items():
            assert self.ctx.spread is not None
            try:
                self._done(i, self.ctx.spread.receive(worker, self.atts[i]))
            except CNIError as e:
                errors[i] = e
            finally:
                self.ctx.spread.give_back(worker)

    def rollback(self, first: CNIError) -> None:
        """Undo every attachment that was started, in reverse order."""
        base = self.ctx.invocation("DEL")
        errors: list[CNIError] = []
        for i in sorted(self.started, reverse=True):
            errors.extend(_undo(self.ctx, self.atts[i], base, self.results[i]))
            _remove_device_info(self.atts[i])
        if errors:
            # Keep the cache so that the runtime's DEL retries what could not be undone now.
            self.ctx.cache.save(attrs.evolve(self.record, results=tuple(self.results)))
            first.details = "; ".join(([first.details] if first.details else []) + [f"rollback: {e.msg}" for e in errors])
            log.error("rollback after failed ADD left %d error(s): %s", len(errors), "; ".join(e.msg for e in errors))
        else:
            self.ctx.cache.remove(self.record.container_id, self.record.ifname)


def cmd_add(ctx: Context) -> dict[str, Any]:
    ident = pod_identity(ctx.req)
    pod: Pod | None = None
    try:
        pod = ctx.source.get_pod(ident.namespace, ident.name, ident.uid) if ident.name and ident.namespace else None
        return _add(ctx, ident, pod)
    except CNIError as e:
        if pod is not None:
            ctx.source.record_event(pod, "Warning", "AttachmentFailed",
                                    f"meta-cni ADD for sandbox {ctx.req.container_id[:12]} failed: {e.msg}")
        raise


def _add(ctx: Context, ident: plan.PodIdentity, pod: Pod | None) -> dict[str, Any]:
    req = ctx.req
    atts = build_plan(ctx, ident, pod)
    present = netns.link_names(req.netns)
    for att in atts:
        if att.ifname in present:
            raise CNIError(INTERNAL, f"interface {att.ifname!r} for network {att.name} already exists in {req.netns}")
    if pod is not None and pod.uid and not ident.uid:
        ident = attrs.evolve(ident, uid=pod.uid)  # so that DEL clears the status of this pod only
    record = Record(container_id=req.container_id, ifname=req.ifname, netns=req.netns, cni_version=req.cni_version,
                    pod=ident, attachments=atts, results=(None,) * len(atts))
    ctx.cache.save(record)
    run = _Attacher(ctx, record)
    try:
        run.attach_all(ctx.cfg.parallel_attachments)
        results = [r for r in run.results if r is not None]
        _apply_default_route(ctx, atts, results)
        device_infos = [status.device_info_for(a, _read_device_info(a)) for a in atts]
        pod_status = status.build(atts, results, device_infos)
        if any(a.default_route for a in atts):
            ctx.cache.save(attrs.evolve(run.record, results=tuple(results)))
        if pod is not None:
            ctx.source.publish_status(pod.namespace, pod.name, pod_status, pod.uid)
    except Exception as e:
        # Whatever went wrong, nothing stays half-attached.
        first = e if isinstance(e, CNIError) else CNIError(INTERNAL, f"ADD failed after attaching: {type(e).__name__}: {e}")
        run.rollback(first)
        raise first from None
    return render(results, req.cni_version)


def render(results: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """The primary's result plus the secondary sandbox interfaces, in the caller's version."""
    out = copy.deepcopy(results[0])
    ifaces = out.setdefault("interfaces", [])
    for res in results[1:]:
        ifaces.extend(copy.deepcopy(i) for i in res.get("interfaces") or [] if i.get("sandbox"))
    return cniresult.from_current(out, version)


# --- DEL ----------------------------------------------------------------------------------------------

def _undo(ctx: Context, att: plan.Attachment, base: Invocation, result: dict[str, Any] | None) -> list[CNIError]:
    """DEL one attachment. Errors count only for an attachment whose ADD completed: a plugin whose ADD
    failed cleans up after itself, and its DEL may fail for the very reason its ADD did (a macvlan
    master that does not exist), which must not make the pod undeletable."""
    errors = chain.delete(att, ctx.invoker, base, result)
    if errors and result is None:
        log.warning("ignoring DEL errors of %s (%s), whose ADD never completed: %s", att.name, att.ifname,
                    "; ".join(e.msg for e in errors))
        return []
    return errors


def delete_record(ctx: Context, record: Record, netns_path: str) -> list[CNIError]:
    """DEL every attachment of a record in reverse; the cache entry goes only when all succeeded."""
    base = ctx.invocation("DEL", netns=netns_path)
    errors: list[CNIError] = []
    for att, res in reversed(list(zip(record.attachments, record.results))):
        errs = _undo(ctx, att, base, res)
        errors.extend(errs)
        if not errs:
            _remove_device_info(att)
    if errors:
        return errors
    ctx.cache.remove(record.container_id, record.ifname)
    pod = record.pod
    if pod.name and pod.namespace:
        try:
            ctx.source.publish_status(pod.namespace, pod.name, None, pod.uid)
        except (CNIError, OSError) as e:  # the status is informative; DEL must not fail on it
            log.warning("could not clear network-status of pod %s: %s", pod.ref, e)
    return []


def _combined(errors: list[CNIError], what: str) -> CNIError:
    first = errors[0]
    return CNIError(first.code, f"{what}: {first.msg}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                    "; ".join(e.msg for e in errors))


def cmd_del(ctx: Context) -> None:
    record = ctx.cache.load(ctx.req.container_id, ctx.req.ifname)
    if record is None:
        return None  # the cache is written before any delegate runs: no record, nothing to undo
    errors = delete_record(ctx, record, ctx.req.netns)
    if errors:
        raise _combined(errors, f"DEL of container {ctx.req.container_id} left {len(errors)} delegate error(s), will retry")
    return None


# --- CHECK, STATUS, GC --------------------------------------------------------------------------------

def cmd_check(ctx: Context) -> None:
    req = ctx.req
    if not cniversion.at_least(req.cni_version, "0.4.0"):
        raise CNIError(INCOMPATIBLE_VERSION, f"config version {req.cni_version} does not allow CHECK")
    record = ctx.cache.load(req.container_id, req.ifname)
    if record is None:
        raise CNIError(UNKNOWN_CONTAINER, f"no ADD recorded for container {req.container_id} interface {req.ifname}")
    base = ctx.invocation("CHECK")
    for att, res in zip(record.attachments, record.results):
        if res is None:
            raise CNIError(UNKNOWN_CONTAINER, f"network {att.name} ({att.ifname}) was never attached to container {req.container_id}")
        chain.check(att, ctx.invoker, base, res)
    return None


def _configured_targets(ctx: Context) -> list[plan.Target]:
    cfg = ctx.cfg
    refs = [("meta-cni config clusterNetwork", cfg.cluster_network)]
    refs += [(f"meta-cni config defaultNetworks[{i}]", r) for i, r in enumerate(cfg.default_networks)]
    return [resolve_reference(ref, cfg, ctx.source, where) for where, ref in refs]


def cmd_status(ctx: Context) -> None:
    req, cfg = ctx.req, ctx.cfg
    if not cniversion.at_least(req.cni_version, "1.1.0"):
        raise CNIError(INCOMPATIBLE_VERSION, f"config version {req.cni_version} does not allow STATUS")
    problem = ctx.source.problem()
    try:
        os.makedirs(cfg.cni_dir, mode=0o700, exist_ok=True)
        if not os.access(cfg.cni_dir, os.W_OK):
            problem = problem or f"cniDir {cfg.cni_dir} is not writable"
    except OSError as e:
        problem = problem or f"cniDir {cfg.cni_dir}: {e.strerror}"
    if problem:
        raise CNIError(NOT_AVAILABLE, problem)
    try:
        targets = _configured_targets(ctx)
    except CNIError as e:
        raise CNIError(NOT_AVAILABLE, f"not ready: {e.msg}") from None
    base = ctx.invocation("STATUS", netns="")
    for t in targets:
        try:
            chain.status(plan.Attachment(name=t.name, ifname="", network=t.network), ctx.invoker, base)
        except CNIError as e:
            code = e.code if e.code in (NOT_AVAILABLE, 51) else NOT_AVAILABLE
            raise CNIError(code, e.msg, e.details) from None
    return None


def cmd_gc(ctx: Context) -> None:
    if not cniversion.at_least(ctx.req.cni_version, "1.1.0"):
        raise CNIError(INCOMPATIBLE_VERSION, f"config version {ctx.req.cni_version} does not allow GC")
    valid = cnirequest.valid_attachments(ctx.req.config)
    errors: list[CNIError] = []
    # Delegate network (by exact config) -> (an attachment of it, its still-valid attachments).
    delegates: dict[str, tuple[plan.Attachment, list[dict[str, str]]]] = {}

    def key(att: plan.Attachment) -> str:
        return json.dumps(att.network.to_dict(), sort_keys=True)

    cache = ctx.cache
    for cid, ifname in list(cache.keys()):
        try:
            record = cache.load(cid, ifname)
        except CNIError as e:
            errors.append(e)
            continue
        if record is None:
            continue
        if (cid, ifname) in valid:
            for att in record.attachments:
                delegates.setdefault(key(att), (att, []))[1].append({"containerID": cid, "ifname": att.ifname})
        else:
            log.info("GC: container %s interface %s is no longer valid, deleting its attachments", cid, ifname)
            ctx_for = attrs.evolve(ctx, req=attrs.evolve(ctx.req, container_id=cid, ifname=ifname))
            errors.extend(delete_record(ctx_for, record, record.netns))
    try:
        for t in _configured_targets(ctx):
            att = plan.Attachment(name=t.name, ifname="", network=t.network)
            delegates.setdefault(key(att), (att, []))
    except CNIError as e:
        errors.append(e)
    # A plugin reads the list as every attachment of its network (by name) still in use; configs of one name
    # differ when a NAD was edited after some of its attachments were made. Each gets the union, or GC of
    # the old config would free what the new one holds (meta-ipam collects by network name).
    by_name: dict[str, list[dict[str, str]]] = {}
    for att, entries in delegates.values():
        union = by_name.setdefault(att.network.name, [])
        union.extend(e for e in entries if e not in union)
    base = ctx.invocation("GC", netns="")
    for att, _ in delegates.values():
        errors.extend(chain.gc(attrs.evolve(att, ifname=""), ctx.invoker, base, by_name[att.network.name]))
    if errors:
        raise _combined(errors, "GC")
    return None
