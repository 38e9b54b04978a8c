"""Running meta-cni's own delegates (`delegates/`) in this process: no exec, no second interpreter.

Types `meta-bridge`, `meta-macvlan`, `meta-ipvlan` and the IPAMs `meta-host-local` and `meta-ipam` (meta/ipam)
always run here; with `builtinStandardTypes` the reference names `bridge`, `macvlan`, `ipvlan` and `host-local`
do too. A built-in delegate's IPAM goes through this invoker as well, so built-in IPAM never costs an exec.
Everything else goes to the fallback invoker (exec). The delegates (and pyroute2) are imported only when a
built-in type is used.
"""
from __future__ import annotations

import importlib
import json
from types import ModuleType

from ..cni import args as cniargs
from ..cni.errors import DECODE_FAILURE, CNIError
from . import Invocation, Invoker

BUILTIN = {"meta-bridge": "bridge", "meta-macvlan": "macvlan", "meta-ipvlan": "ipvlan", "meta-host-local": "host_local",
           "meta-ipam": "meta.ipam.plugin"}
STANDARD = {"bridge": "bridge", "macvlan": "macvlan", "ipvlan": "ipvlan", "host-local": "host_local"}


def _module_name(m: str) -> str:
    # A bare name is a delegate under delegates/; a dotted one (the meta-ipam plugin) is a full module path.
    return m if "." in m else f"delegates.{m}"


def available() -> set[str]:
    """Built-in modules that exist in this build (the set grows as delegates are added)."""
    import importlib.util

    return {m for m in set(BUILTIN.values()) if importlib.util.find_spec(_module_name(m)) is not None}


class BuiltinInvoker:
    def __init__(self, fallback: Invoker, standard_types: bool) -> None:
        self.fallback = fallback
        have = available()
        names = dict(BUILTIN) | (dict(STANDARD) if standard_types else {})
        self.names = {t: m for t, m in names.items() if m in have}

    def in_process(self, plugin_type: str) -> bool:
        return plugin_type in self.names

    def module(self, plugin_type: str) -> ModuleType | None:
        name = self.names.get(plugin_type)
        return importlib.import_module(_module_name(name)) if name else None

    def run(self, plugin_type: str, stdin: bytes, inv: Invocation) -> bytes:
        module = self.module(plugin_type)
        if module is None:
            return self.fallback.run(plugin_type, stdin, inv)
        from delegates._plugin import PluginArgs, dispatch, render

        try:
            config = json.loads(stdin)
        except ValueError as e:
            raise CNIError(DECODE_FAILURE, f"{inv.where}: {plugin_type}: bad config: {e}") from None
        args = PluginArgs(command=inv.command, container_id=inv.container_id, netns=inv.netns, ifname=inv.ifname,
                          cni_args=cniargs.parse(inv.cni_args), path=inv.path, config=config, stdin=stdin,
                          ipam_invoker=self)
        try:
            result = dispatch(module, args)
        except CNIError as e:
            raise CNIError(e.code, f"{inv.where}: {plugin_type} {inv.command}: {e.msg}", e.details) from None
        return render(result, args.cni_version, indent=None)  # parsed by the caller, never shown
