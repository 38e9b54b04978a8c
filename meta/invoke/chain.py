"""A delegate network (conflist) as libcni runs it: ADD in order with prevResult passed along,
DEL in reverse with the final ADD result, CHECK with it, STATUS and GC to every plugin.

Differences from libcni, on purpose: DEL goes on past a failing plugin (every plugin gets its chance to
release what it holds, errors are collected), and CHECK on a pre-0.4.0 list is skipped instead of failing
(such plugins cannot check; failing would break every CHECK of a pod that uses one).
"""
from __future__ import annotations

import copy
import json
from typing import Any

import attrs

from ..cni import args as cniargs
from ..cni import result as cniresult
from ..cni import version as cniversion
from ..cni.errors import DECODE_FAILURE, CNIError
from ..cni.request import VALID_ATTACHMENTS, VALID_ATTACHMENTS_OLD
from ..plan import Attachment
from . import Invocation, Invoker


def plugin_request(att: Attachment, plugin: dict[str, Any], prev: dict[str, Any] | None,
                   extra: dict[str, Any] | None = None) -> bytes:
    """The stdin of one plugin: its config with name, cniVersion, runtimeConfig, args and prevResult
    injected, serialised as libcni does (compact, keys sorted)."""
    net = att.network
    conf = copy.deepcopy(plugin)
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    declared = conf.get("capabilities") or {}
    runtime = {k: v for k, v in att.capability_args.items() if declared.get(k) is True}
    if runtime:
        conf["runtimeConfig"] = runtime
    if att.device_id:
        conf["deviceID"] = att.device_id
    if att.args_cni:
        args = dict(conf.get("args") or {})
        args["cni"] = dict(args.get("cni") or {}) | att.args_cni
        conf["args"] = args
    if prev is not None:
        conf["prevResult"] = prev
    if extra:
        conf.update(extra)
    return json.dumps(conf, sort_keys=True, separators=(",", ":")).encode()


def _where(att: Attachment, i: int) -> str:
    plugins = att.network.plugins
    step = f", plugin {i + 1}/{len(plugins)}" if len(plugins) > 1 else ""
    iface = f" ({att.ifname})" if att.ifname else ""
    return f"network {att.name}{iface}{step}"


def _inv(base: Invocation, command: str, att: Attachment, i: int) -> Invocation:
    return attrs.evolve(base, command=command, ifname=att.ifname, where=_where(att, i),
                        cni_args=cniargs.render(att.cni_args) if att.cni_args else base.cni_args)


def add(att: Attachment, invoker: Invoker, base: Invocation) -> dict[str, Any]:
    """ADD every plugin in order; returns the final result in the current (1.1.0) shape."""
    net = att.network
    prev: dict[str, Any] | None = None
    for i, plugin in enumerate(net.plugins):
        inv = _inv(base, "ADD", att, i)
        out = invoker.run(plugin["type"], plugin_request(att, plugin, prev), inv)
        try:
            prev = json.loads(out)
        except ValueError:
            raise CNIError(DECODE_FAILURE, f"{inv.where}: {plugin['type']} ADD printed no valid JSON result") from None
        if not isinstance(prev, dict):
            raise CNIError(DECODE_FAILURE, f"{inv.where}: {plugin['type']} ADD result is not a JSON object")
        prev.setdefault("cniVersion", net.cni_version)  # libcni fixupResultVersion
    assert prev is not None
    return cniresult.to_current(prev, net.cni_version, source=_where(att, len(net.plugins) - 1))


def _prev_for(att: Attachment, cached: dict[str, Any] | None) -> dict[str, Any] | None:
    version = att.network.cni_version
    if cached is None or not cniversion.at_least(version, "0.4.0"):
        return None
    return cniresult.from_current(cached, version)


def delete(att: Attachment, invoker: Invoker, base: Invocation, cached: dict[str, Any] | None) -> list[CNIError]:
    """DEL every plugin in reverse order; returns the errors (empty when all succeeded)."""
    prev = _prev_for(att, cached)
    errors: list[CNIError] = []
    plugins = att.network.plugins
    for i in range(len(plugins) - 1, -1, -1):
        try:
            invoker.run(plugins[i]["type"], plugin_request(att, plugins[i], prev), _inv(base, "DEL", att, i))
        except CNIError as e:
            errors.append(e)
    return errors


def check(att: Attachment, invoker: Invoker, base: Invocation, cached: dict[str, Any] | None) -> None:
    """CHECK every plugin in order with the cached ADD result; the first failure is raised."""
    net = att.network
    if net.disable_check or not cniversion.at_least(net.cni_version, "0.4.0"):
        return
    prev = _prev_for(att, cached)
    for i, plugin in enumerate(net.plugins):
        invoker.run(plugin["type"], plugin_request(att, plugin, prev), _inv(base, "CHECK", att, i))


def status(att: Attachment, invoker: Invoker, base: Invocation) -> None:
    """STATUS to every plugin of a 1.1.0+ list (older plugins do not know the command)."""
    if not cniversion.at_least(att.network.cni_version, "1.1.0"):
        return
    for i, plugin in enumerate(att.network.plugins):
        invoker.run(plugin["type"], plugin_request(att, plugin, None), _inv(base, "STATUS", att, i))


def gc(att: Attachment, invoker: Invoker, base: Invocation, valid: list[dict[str, str]]) -> list[CNIError]:
    """GC to every plugin of a 1.1.0+ list with its still-valid attachments; errors are collected."""
    net = att.network
    if net.disable_gc or not cniversion.at_least(net.cni_version, "1.1.0"):
        return []
    extra = {VALID_ATTACHMENTS: valid, VALID_ATTACHMENTS_OLD: valid}
    errors: list[CNIError] = []
    for i, plugin in enumerate(net.plugins):
        try:
            invoker.run(plugin["type"], plugin_request(att, plugin, None, extra), _inv(base, "GC", att, i))
        except CNIError as e:
            errors.append(e)
    return errors
