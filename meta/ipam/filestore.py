"""The IPAM store over local files (standalone mode): `<dir>/<kind>/<name>.json` per object.

A file holds {"version": <counter>, "incarnation": <random hex>, "data": {...}}; the version a caller sees is
"<counter>.<incarnation>", so an object deleted and created again never matches a version read before
(no ABA: a stale writer cannot overwrite the new object). Every operation runs under flock(2) on `<dir>/lock`
(shared for reads, exclusive for writes), so several processes (exec'd plugins, the daemon, metactl) can
share one directory; a write compares the version under the exclusive lock and replaces the file atomically
and durably (an allocation must survive a crash, or the address could be handed out twice).
"""
from __future__ import annotations

import builtins
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meta import atomicfile

from .store import Conflict, Unavailable, Versioned

_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


class FileStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def __repr__(self) -> str:
        return f"FileStore({str(self.dir)!r})"

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise Unavailable(f"IPAM data dir {self.dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _path(self, kind: str, name: str) -> Path:
        # Names come from our own naming functions; refusing anything else keeps them inside the directory.
        if not _NAME.match(name) or not re.match(r"^[a-z]+$", kind):
            raise ValueError(f"invalid object name {kind}/{name}")
        return self.dir / kind / f"{name}.json"

    @staticmethod
    def _read(kind: str, name: str, path: Path) -> Versioned | None:
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise Unavailable(f"unreadable IPAM object {path}: {e}") from None
        return Versioned(kind=kind, name=name, data=body["data"],
                         version=f"{body['version']}.{body.get('incarnation', '')}")

    def _write(self, path: Path, version: str, data: dict[str, Any]) -> None:
        counter, _, incarnation = version.partition(".")
        body = {"version": int(counter), "incarnation": incarnation, "data": data}
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomicfile.write(path, json.dumps(body, sort_keys=True).encode(), durable=True)
        except OSError as e:
            raise Unavailable(f"cannot write IPAM object {path}: {e.strerror or e}") from None

    def get(self, kind: str, name: str) -> Versioned | None:
        with self._locked(False):
            return self._read(kind, name, self._path(kind, name))

    def list(self, kind: str, pool: str, node: str | None = None) -> builtins.list[Versioned]:
        return [o for o in self.list_all(kind)
                if o.data.get("pool") == pool and (node is None or o.data.get("node") == node)]

    def list_all(self, kind: str) -> builtins.list[Versioned]:
        """Every object of `kind` (for `metactl ipam pools`; not part of the Store protocol)."""
        with self._locked(False):
            d = self.dir / kind
            names = sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".json")) if d.is_dir() else []
            out = [self._read(kind, n, d / f"{n}.json") for n in names]
        return [o for o in out if o is not None]

    def create(self, kind: str, name: str, data: dict[str, Any]) -> Versioned:
        path = self._path(kind, name)
        with self._locked(True):
            if path.exists():
                raise Conflict(f"{kind}/{name} exists")
            version = f"1.{secrets.token_hex(4)}"
            self._write(path, version, data)
        return Versioned(kind=kind, name=name, data=data, version=version)

    def update(self, obj: Versioned, data: dict[str, Any]) -> Versioned:
        path = self._path(obj.kind, obj.name)
        with self._locked(True):
            cur = self._read(obj.kind, obj.name, path)
            if cur is None or cur.version != obj.version:
                raise Conflict(f"{obj.kind}/{obj.name} changed")
            counter, _, incarnation = cur.version.partition(".")
            version = f"{int(counter) + 1}.{incarnation}"
            self._write(path, version, data)
        return Versioned(kind=obj.kind, name=obj.name, data=data, version=version)

    def delete(self, obj: Versioned) -> None:
        path = self._path(obj.kind, obj.name)
        with self._locked(True):
            cur = self._read(obj.kind, obj.name, path)
            if cur is None:
                return
            if cur.version != obj.version:
                raise Conflict(f"{obj.kind}/{obj.name} changed")
            try:
                path.unlink()
            except OSError as e:
                raise Unavailable(f"cannot delete IPAM object {path}: {e.strerror or e}") from None
