"""What DEL, CHECK and GC need, kept on disk per attachment of meta-cni.

One JSON file per (network, container, interface): `<cniDir>/<network>/<containerID>/<ifname>.json`,
directories 0700 and files 0600 (delegate configs can hold secrets). Written atomically (temporary file,
fsync, rename, fsync of the directory) before the first delegate runs and again with the results after
the last one, so DEL works after the NAD is deleted, without the pod source, and after a crash mid-ADD.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from . import atomicfile
from .cni.errors import IO_FAILURE, CNIError
from .plan import Attachment, PodIdentity

KIND = "metaCacheV1"


@attrs.frozen
class Record:
    container_id: str
    ifname: str
    netns: str
    cni_version: str
    pod: PodIdentity
    attachments: tuple[Attachment, ...]
    # The final ADD result of each attachment (current shape), None until it succeeded.
    results: tuple[dict[str, Any] | None, ...] = attrs.field(eq=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND, "containerId": self.container_id, "ifName": self.ifname, "netns": self.netns,
            "cniVersion": self.cni_version,
            "pod": {"namespace": self.pod.namespace, "name": self.pod.name, "uid": self.pod.uid,
                    "infraContainerId": self.pod.infra_container_id},
            "attachments": [dict(a.to_dict(), result=r) for a, r in zip(self.attachments, self.results)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        if d.get("kind") != KIND:
            raise ValueError(f"kind is {d.get('kind')!r}, expected {KIND!r}")
        pod = d.get("pod") or {}
        atts = d["attachments"]
        return cls(
            container_id=d["containerId"], ifname=d["ifName"], netns=d.get("netns", ""), cni_version=d["cniVersion"],
            pod=PodIdentity(namespace=pod.get("namespace"), name=pod.get("name"), uid=pod.get("uid"),
                            infra_container_id=pod.get("infraContainerId")),
            attachments=tuple(Attachment.from_dict(a) for a in atts),
            results=tuple(a.get("result") for a in atts),
        )


class Cache:
    def __init__(self, root: str, network: str) -> None:
        self.dir = Path(root) / network

    def path(self, container_id: str, ifname: str) -> Path:
        return self.dir / container_id / f"{ifname}.json"

    def save(self, record: Record, durable: bool = True) -> None:
        """`durable` (fsync) is needed for the first save of an ADD, the one that says "attachments may
        exist": results saved later only make DEL more precise, and DEL of an attachment without its
        result still releases what it holds, so those survive a process crash (rename) and may skip fsync."""
        path = self.path(record.container_id, record.ifname)
        data = json.dumps(record.to_dict(), separators=(",", ":")).encode()
        try:
            try:
                atomicfile.write(path, data, durable=durable)
            except FileNotFoundError:  # the first save of this container: its directories first
                self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                for d in (self.dir, path.parent):
                    d.mkdir(mode=0o700, exist_ok=True)
                atomicfile.write(path, data, durable=durable)
        except OSError as e:
            raise CNIError(IO_FAILURE, f"cannot write meta-cni cache {path}: {e.strerror}") from None

    def load(self, container_id: str, ifname: str) -> Record | None:
        """The record, None when there is none; a CNIError naming the file when it is unreadable."""
        path = self.path(container_id, ifname)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CNIError(IO_FAILURE, f"cannot read meta-cni cache {path}: {e.strerror}") from None
        try:
            return Record.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CNIError(IO_FAILURE, f"meta-cni cache {path} is corrupt: {e}") from None

    def remove(self, container_id: str, ifname: str) -> None:
        path = self.path(container_id, ifname)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        try:
            path.parent.rmdir()  # only when no other interface of the container is cached
        except OSError:
            pass

    def keys(self) -> Iterator[tuple[str, str]]:
        """(containerID, ifname) of every cached attachment of this network."""
        try:
            containers = sorted(p for p in self.dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return
        for c in containers:
            for f in sorted(c.glob("*.json")):
                yield c.name, f.name[: -len(".json")]
