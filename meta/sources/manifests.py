"""The embedded default source: ordinary Kubernetes YAML manifests in a directory, no cluster.

Pods and NetworkAttachmentDefinitions are read from every `*.yaml`, `*.yml` and `*.json` file under the
directory (multi-document files and `kind: List` included). The network-status of a pod is written to
`<dir>/network-status/<namespace>.<name>.json`, beside the manifests.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .. import atomicfile
from ..cni.errors import INVALID_CONFIG, CNIError
from . import Pod

STATUS_DIR = "network-status"
SUFFIXES = (".yaml", ".yml", ".json")
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
log = logging.getLogger("meta-cni")


def _load_yaml() -> Any:
    import yaml

    return yaml, getattr(yaml, "CSafeLoader", yaml.SafeLoader)


Index = dict[tuple[str, str, str], list[tuple[Path, dict[str, Any]]]]


class ManifestsSource:
    """Reads the manifests once per process; with `index_cache`, a parsed index is kept on disk and reused
    while no manifest file changed (same paths, sizes and mtimes), so most calls skip YAML entirely."""

    def __init__(self, directory: str, index_cache: Path | None = None) -> None:
        self.dir = Path(directory)
        self.index_cache = index_cache
        self._index: Index | None = None
        self._broken: list[str] = []

    def files(self) -> list[Path]:
        out = []
        for root, dirs, names in os.walk(self.dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(root) == self.dir and d == STATUS_DIR))
            out.extend(Path(root) / n for n in sorted(names) if n.endswith(SUFFIXES) and not n.startswith("."))
        return out

    def _signature(self, files: list[Path]) -> list[list[Any]]:
        sig: list[list[Any]] = [[str(self.dir)]]
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            sig.append([str(path), st.st_mtime_ns, st.st_size])
        return sig

    def _load(self) -> Index:
        if self._index is not None:
            return self._index
        index: Index = {}
        if not self.dir.exists():  # no manifests yet: a source with no pods and no NADs
            self._index = index
            return index
        files = self.files()
        signature = self._signature(files) if self.index_cache else []
        cached = self._read_index_cache(signature)
        if cached is not None:
            self._index, self._broken = cached
            return self._index
        self._index = self._parse(files)
        self._write_index_cache(signature)
        return self._index

    def _read_index_cache(self, signature: list[list[Any]]) -> tuple[Index, list[str]] | None:
        if self.index_cache is None:
            return None
        try:
            data = json.loads(self.index_cache.read_bytes())
            if data["signature"] != signature:
                return None
            index: Index = {}
            for kind, ns, name, path, obj in data["objects"]:
                index.setdefault((kind, ns, name), []).append((Path(path), obj))
            return index, list(data["broken"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_index_cache(self, signature: list[list[Any]]) -> None:
        if self.index_cache is None or self._index is None:
            return
        objects = [[*key, str(path), obj] for key, entries in self._index.items() for path, obj in entries]
        try:
            text = json.dumps({"signature": signature, "objects": objects, "broken": self._broken})
            self.index_cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomicfile.write(self.index_cache, text.encode())
        except (OSError, TypeError, ValueError):
            pass  # only an optimisation (TypeError: a manifest value JSON cannot hold, e.g. a YAML date)

    def _parse(self, files: list[Path]) -> Index:
        index: Index = {}
        yaml, loader = _load_yaml()
        for path in files:
            try:
                docs = list(yaml.load_all(path.read_bytes(), Loader=loader))
            except (OSError, yaml.YAMLError) as e:
                self._broken.append(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            for doc in docs:
                items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
                for obj in items:
                    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
                        continue
                    meta = obj["metadata"]
                    key = (str(obj.get("kind")), str(meta.get("namespace") or "default"), str(meta.get("name")))
                    index.setdefault(key, []).append((path, obj))
        return index

    def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self._load().get((kind, namespace, name), [])
        if len(found) > 1:
            where = ", ".join(str(p) for p, _ in found)
            raise CNIError(INVALID_CONFIG, f"{kind} {namespace}/{name} is defined more than once: {where}")
        if not found:
            if self._broken:
                raise CNIError(INVALID_CONFIG, f"{kind} {namespace}/{name} not found and some manifests are unreadable: "
                               + "; ".join(self._broken))
            return None
        obj = dict(found[0][1])
        obj["metadata"] = dict(obj["metadata"], namespace=namespace)
        return obj

    def get_pod(self, namespace: str, name: str, uid: str | None = None) -> Pod | None:
        # The manifests are read afresh by every process, so there is no stale copy for `uid` to refresh.
        obj = self._get("Pod", namespace, name)
        if obj is None:
            return None
        meta = obj["metadata"]
        annotations = meta.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise CNIError(INVALID_CONFIG, f"pod {namespace}/{name}: metadata.annotations must map names to strings")
        uid = meta.get("uid")
        return Pod(namespace=namespace, name=name, uid=str(uid) if uid else None, annotations=dict(annotations))

    def get_nad(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("NetworkAttachmentDefinition", namespace, name)

    def status_path(self, namespace: str, name: str) -> Path:
        return self.dir / STATUS_DIR / f"{namespace}.{name}.json"

    def publish_status(self, namespace: str, name: str, status: list[dict[str, Any]] | None,
                       uid: str | None = None) -> None:
        path = self.status_path(namespace, name)
        if status is None:
            try:
                path.unlink()
                path.parent.rmdir()
            except OSError:
                pass  # already gone, or other pods still have a status file
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomicfile.write(path, (json.dumps(status, indent=2) + "\n").encode(), mode=0o644)

    def record_event(self, pod: Pod, type_: str, reason: str, message: str) -> None:
        # Without a cluster there is no one to hand an Event to; the log is where an operator looks.
        log.log(logging.WARNING if type_ == "Warning" else logging.INFO, "pod %s: %s: %s", pod.ref, reason, message)

    def problem(self) -> str | None:
        if not self.dir.exists():
            return None
        if not self.dir.is_dir():
            return f"manifestsDir {self.dir} is not a directory"
        if not os.access(self.dir, os.R_OK | os.X_OK):
            return f"manifestsDir {self.dir} is not readable"
        return None
