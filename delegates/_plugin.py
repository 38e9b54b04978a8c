"""What every built-in delegate shares: its arguments, calling its IPAM plugin, and the standalone
CNI executable (`meta-bridge`, `meta-macvlan`, `meta-ipvlan`).

A delegate module provides `cmd_add(args) -> result`, `cmd_del(args)`, `cmd_check(args)` and
`cmd_status(args)`, and `cmd_gc(args)` when it has something to collect (without one, GC succeeds doing
nothing, as skel answers for the reference plugins that leave GC unimplemented); results are in the current
(1.1.0) shape and converted to the config's version by whoever prints them (the standalone main, or
meta-cni's built-in invoker).
"""
from __future__ import annotations

import json
import os
import sys
from types import ModuleType
from typing import Any

import attrs

from meta.cni import args as cniargs
from meta.cni import result as cniresult
from meta.cni import version as cniversion
from meta.cni.errors import DECODE_FAILURE, INTERNAL, INVALID_CONFIG, CNIError
from meta.invoke import Invocation, Invoker
from meta.invoke.exec import ExecInvoker

IPAM_TIMEOUT = 60.0


@attrs.frozen
class PluginArgs:
    """One call of a delegate: the CNI environment and the request config (exact bytes kept for IPAM)."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_args: cniargs.Pairs
    path: tuple[str, ...]
    config: dict[str, Any] = attrs.field(eq=False)
    stdin: bytes = attrs.field(eq=False, repr=False)
    # Who runs the IPAM plugin: meta-cni's built-in invoker (so a built-in IPAM runs in this process
    # too), or, standalone, plain exec.
    ipam_invoker: Invoker | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion") or "0.1.0")

    @property
    def runtime_config(self) -> dict[str, Any]:
        rc = self.config.get("runtimeConfig")
        return rc if isinstance(rc, dict) else {}

    @property
    def ipam_type(self) -> str | None:
        ipam = self.config.get("ipam")
        return ipam.get("type") if isinstance(ipam, dict) and ipam.get("type") else None

    def prev_result(self) -> dict[str, Any] | None:
        prev = self.config.get("prevResult")
        return cniresult.to_current(prev, self.cni_version, source="prevResult") if prev else None

    def mac_request(self, config_mac: str | None = None) -> str | None:
        """The MAC to give the container interface: runtimeConfig.mac > args.cni.mac > CNI_ARGS MAC > config."""
        args_cni = (self.config.get("args") or {}).get("cni") or {} if isinstance(self.config.get("args"), dict) else {}
        for candidate in (self.runtime_config.get("mac"), args_cni.get("mac"), cniargs.get(self.cni_args, "MAC"), config_mac):
            if candidate:
                return str(candidate)
        return None


def _ipam(args: PluginArgs, command: str) -> bytes:
    ipam_type = args.ipam_type
    assert ipam_type
    inv = Invocation(command=command, container_id=args.container_id, netns=args.netns, ifname=args.ifname,
                     cni_args=cniargs.render(args.cni_args), path=args.path, where=f"ipam {ipam_type}")
    # IPAM plugins receive the whole plugin config, as libcni's DelegateAdd passes it.
    return (args.ipam_invoker or ExecInvoker(IPAM_TIMEOUT)).run(ipam_type, args.stdin, inv)


def ipam_add(args: PluginArgs) -> dict[str, Any]:
    out = _ipam(args, "ADD")
    try:
        raw = json.loads(out)
    except ValueError:
        raise CNIError(DECODE_FAILURE, f"ipam {args.ipam_type} ADD printed no valid JSON result") from None
    return cniresult.to_current(raw, args.cni_version, source=f"ipam {args.ipam_type}")


def ipam_del(args: PluginArgs) -> None:
    _ipam(args, "DEL")


def ipam_check(args: PluginArgs) -> None:
    _ipam(args, "CHECK")


def ipam_status(args: PluginArgs) -> None:
    _ipam(args, "STATUS")


def ipam_gc(args: PluginArgs) -> None:
    _ipam(args, "GC")


def status_via_ipam(args: PluginArgs) -> None:
    """STATUS of a plugin whose readiness is its IPAM's, as the reference bridge, macvlan and ipvlan."""
    if args.ipam_type:
        ipam_status(args)


def gc_via_ipam(args: PluginArgs) -> None:
    """GC of a plugin whose only per-attachment state outside the pod's namespace is its IPAM's: the spec
    says GC must reach delegates, and the IPAM's reservations are what leaks when DEL never came. The IPAM
    gets the same config, `cni.dev/valid-attachments` included."""
    if args.ipam_type:
        ipam_gc(args)


def dispatch(module: ModuleType, args: PluginArgs) -> dict[str, Any] | None:
    """Run one command of a delegate module."""
    if args.command == "ADD":
        return module.cmd_add(args)  # type: ignore[no-any-return]
    if args.command == "DEL":
        module.cmd_del(args)
    elif args.command == "CHECK":
        if not cniversion.at_least(args.cni_version, "0.4.0"):
            raise CNIError(1, f"config version {args.cni_version} does not allow CHECK")
        module.cmd_check(args)
    elif args.command == "STATUS":
        if not cniversion.at_least(args.cni_version, "1.1.0"):
            raise CNIError(1, f"config version {args.cni_version} does not allow STATUS")
        module.cmd_status(args)
    elif args.command == "GC":
        if not cniversion.at_least(args.cni_version, "1.1.0"):
            raise CNIError(1, f"config version {args.cni_version} does not allow GC")
        gc = getattr(module, "cmd_gc", None)
        if gc is not None:
            gc(args)
    else:
        raise CNIError(4, f"unknown CNI_COMMAND: {args.command}")
    return None


def render(result: dict[str, Any] | None, version: str, indent: int | None = 4) -> bytes:
    """The result as a plugin prints it: indented as the reference plugins print theirs; indent None for a
    caller that only parses it (in-process: an indent makes json use its pure-Python encoder, ~0.2 ms)."""
    if result is None:
        return b""
    return json.dumps(cniresult.from_current(result, version), indent=indent).encode()


def standalone_main(module: ModuleType, name: str) -> int:
    """The CNI executable of one built-in delegate: environment and stdin in, result or error JSON out."""
    from meta.cni import request as cnirequest
    from meta.main import version_info

    env = os.environ
    command = env.get("CNI_COMMAND", "")
    stdin = sys.stdin.buffer.read()
    if command == "VERSION":
        sys.stdout.write(version_info(stdin))
        return 0
    version = None
    try:
        req = cnirequest.parse(env, stdin)
        version = req.cni_version
        args = PluginArgs(command=req.command, container_id=req.container_id, netns=req.netns, ifname=req.ifname,
                          cni_args=req.args, path=req.path, config=req.config, stdin=stdin)
        result = dispatch(module, args)
        if result is not None:
            sys.stdout.write(render(result, version).decode())
        return 0
    except CNIError as e:
        sys.stdout.write(e.to_json(version))
    except Exception as e:  # an error structure, never a bare traceback on stdout
        import traceback

        traceback.print_exc()
        sys.stdout.write(CNIError(INTERNAL, f"{name}: {type(e).__name__}: {e}").to_json(version))
    return 1


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CNIError(INVALID_CONFIG, msg)
