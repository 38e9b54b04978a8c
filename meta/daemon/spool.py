"""DEL requests that could not reach the daemon, kept on disk until the daemon replays them.

The shim answers such a DEL with success (the runtime then forgets the sandbox), so the request itself must
survive: it is written durably (fsync) and atomically, 0600 in a 0700 directory, to
`<cniDir>/pending-del/<key>.del`, the same cniDir (and the same disk) as the cache the DEL will work from.
The file holds the protocol's request body, so the daemon replays it exactly as if it had come over the socket;
its mtime is when it was spooled (the replay order).

`<key>` is a digest of (network name, container ID, interface): a repeated DEL overwrites its own file, and
the daemon can find the pending DEL of an attachment before it serves an ADD for the same one.

Standard library only: the shim writes here when the daemon is down.
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import atomicfile
from . import protocol

DIR = "pending-del"
SUFFIX = ".del"
# Mirrors meta.config.DEFAULTS["cniDir"]; that module is not standard library only.
DEFAULT_CNI_DIR = "/var/lib/cni/meta-cni"


def cni_dir_of(config: Mapping[str, Any]) -> str:
    """The cniDir a config uses, chosen as core.run chooses it (an invalid value means the default)."""
    value = config.get("cniDir")
    return value if isinstance(value, str) and value.startswith("/") else DEFAULT_CNI_DIR


def directory(cni_dir: str) -> Path:
    return Path(cni_dir) / DIR


def key(network: str, container_id: str, ifname: str) -> str:
    return hashlib.sha256("\0".join((network, container_id, ifname)).encode()).hexdigest()[:40]


def path_for(cni_dir: str, network: str, container_id: str, ifname: str) -> Path:
    return directory(cni_dir) / (key(network, container_id, ifname) + SUFFIX)


def write(env: Mapping[str, str], stdin: bytes, config: Mapping[str, Any]) -> Path:
    """Spool one DEL durably; OSError (or ValueError for an environment no request can carry) when it cannot be
    kept (then the DEL must fail, or it leaks)."""
    name = config.get("name")
    path = path_for(cni_dir_of(config), name if isinstance(name, str) else "", env.get("CNI_CONTAINERID", ""),
                    env.get("CNI_IFNAME", ""))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomicfile.write(path, protocol.encode_request(env, stdin), mode=0o600, durable=True)
    return path


def pending(cni_dir: str) -> list[Path]:
    """Spooled DELs of one cniDir, oldest first (the order the runtime issued them)."""
    try:
        entries = [p for p in directory(cni_dir).iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(entries, key=mtime)


def trusted(path: Path) -> bool:
    """Only files written by our own user and writable by no one else are replayed: a spooled request
    runs delegates as root."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read(path: Path) -> tuple[dict[str, str], bytes]:
    """(env, stdin) of a spooled DEL; ValueError when the file is not one, OSError when unreadable."""
    env, stdin = protocol.decode_request(path.read_bytes())
    if env.get("CNI_COMMAND") != "DEL":
        raise ValueError(f"spooled request is {env.get('CNI_COMMAND')!r}, only DEL is ever spooled")
    return env, stdin


def set_aside(path: Path, why: str) -> Path:
    """Move a file that can never be replayed out of the way, keeping it for the operator."""
    target = path.with_name(f".{why}-{path.name}")
    os.replace(path, target)
    return target


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
