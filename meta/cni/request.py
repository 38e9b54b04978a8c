"""One CNI invocation: the environment and the stdin config, validated as the spec and libcni's skel do."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from . import args as cniargs
from . import version as cniversion
from .errors import DECODE_FAILURE, INVALID_CONFIG, INVALID_ENV, UNKNOWN_CONTAINER, CNIError

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
_REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
}
# The GC config key listing the attachments still in use (spec 1.1.0 §GC); the spec-v1.1.0 tag named it
# `cni.dev/attachments`, and libcni v1.3 sends both.
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
VALID_ATTACHMENTS_OLD = "cni.dev/attachments"
# Container IDs and network names: libcni's pkg/utils ValidateContainerID / ValidateNetworkName.
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")


def validate_ifname(ifname: str) -> str | None:
    """Why `ifname` is not a usable Linux interface name, or None if it is."""
    if not ifname:
        return "is empty"
    if len(ifname) > 15:
        return "is longer than 15 characters"
    if ifname in (".", ".."):
        return "is '.' or '..'"
    if any(c in ifname for c in "/:") or any(c.isspace() for c in ifname):
        return "contains '/', ':' or whitespace"
    return None


@attrs.frozen
class Request:
    """A validated CNI request. `config` is the decoded stdin; `config_bytes` the exact bytes."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: cniargs.Pairs
    path: tuple[str, ...]
    config: dict[str, Any] = attrs.field(eq=False)
    config_bytes: bytes = attrs.field(eq=False, repr=False)
    cni_version: str

    @property
    def network_name(self) -> str:
        return str(self.config["name"])

    def pod_arg(self, key: str) -> str | None:
        return cniargs.get(self.args, key)


def _env(env: Mapping[str, str], key: str) -> str:
    # libcni always sets all six CNI_* variables, possibly empty: empty means absent.
    return env.get(key, "") or ""


def parse(env: Mapping[str, str], stdin: bytes) -> Request:
    """Validate env and stdin for ADD/DEL/CHECK/STATUS/GC (VERSION is answered before this)."""
    command = _env(env, "CNI_COMMAND")
    if command not in COMMANDS or command == "VERSION":
        raise CNIError(INVALID_ENV, f"unknown CNI_COMMAND: {command}" if command else "required env variables [CNI_COMMAND] missing")
    missing = [k for k in _REQUIRED[command] if not _env(env, k)]
    if missing:
        raise CNIError(INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    container_id = _env(env, "CNI_CONTAINERID")
    if container_id and not NAME_RE.match(container_id):
        raise CNIError(INVALID_ENV, f"CNI_CONTAINERID {container_id!r} is invalid: must match {NAME_RE.pattern}")
    ifname = _env(env, "CNI_IFNAME")
    if ifname:
        why = validate_ifname(ifname)
        if why:
            raise CNIError(INVALID_ENV, f"CNI_IFNAME {ifname!r} {why}")
    netns = _env(env, "CNI_NETNS")
    if command in ("ADD", "CHECK") and not os.path.exists(netns):
        raise CNIError(UNKNOWN_CONTAINER, f"CNI_NETNS {netns!r} does not exist")
    pairs = cniargs.parse(_env(env, "CNI_ARGS"))
    path = tuple(p for p in _env(env, "CNI_PATH").split(os.pathsep) if p)

    config = decode_config(stdin)
    return Request(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=pairs,
        path=path,
        config=config,
        config_bytes=stdin,
        cni_version=config["cniVersion"],
    )


def decode_config(stdin: bytes) -> dict[str, Any]:
    """Decode the stdin network configuration; fixes `cniVersion` to the version in use."""
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CNIError(DECODE_FAILURE, f"error unmarshalling network config from stdin: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network config on stdin is not a JSON object")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CNIError(INVALID_CONFIG, "missing network name: field 'name' of the network config")
    if not NAME_RE.match(name):
        raise CNIError(INVALID_CONFIG, f"network config field 'name' {name!r} is invalid: must match {NAME_RE.pattern}")
    ver = config.get("cniVersion")
    if ver is not None and not isinstance(ver, str):
        raise CNIError(INVALID_CONFIG, f"network config field 'cniVersion' must be a string, got {ver!r}")
    if ver is None:
        # A runtime that does not know 1.1's `cniVersions` sends none; pick ours, else the spec's implied 0.1.0.
        ver = cniversion.select(None, config.get("cniVersions")) or "0.1.0"
    cniversion.require_supported(ver)
    config = dict(config)
    config["cniVersion"] = ver
    return config


def valid_attachments(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (containerID, ifname) pairs a GC config says are still in use; error 7 when the list is malformed
    (collecting garbage on a list read wrongly would delete attachments that are in use)."""
    raw = config.get(VALID_ATTACHMENTS, config.get(VALID_ATTACHMENTS_OLD, []))
    if not isinstance(raw, list) or not all(isinstance(v, dict) and isinstance(v.get("containerID"), str)
                                            and isinstance(v.get("ifname"), str) for v in raw):
        raise CNIError(INVALID_CONFIG, f"{VALID_ATTACHMENTS} must be a list of {{containerID, ifname}} objects")
    return {(v["containerID"], v["ifname"]) for v in raw}
