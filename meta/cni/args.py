"""CNI_ARGS: `K=V;K2=V2` pairs, parsed and written as libcni and the reference plugins do."""
from __future__ import annotations

from .errors import INVALID_ENV, CNIError

Pairs = tuple[tuple[str, str], ...]

# The pod identity keys that kubelet runtimes (containerd, CRI-O) and Multus pass.
POD_NAMESPACE = "K8S_POD_NAMESPACE"
POD_NAME = "K8S_POD_NAME"
POD_INFRA_CONTAINER_ID = "K8S_POD_INFRA_CONTAINER_ID"
POD_UID = "K8S_POD_UID"
IGNORE_UNKNOWN = "IgnoreUnknown"


def parse(raw: str | None) -> Pairs:
    """Parse CNI_ARGS; a pair without `=` or with an empty key is an error (code 4)."""
    if not raw:
        return ()
    pairs: list[tuple[str, str]] = []
    for item in raw.split(";"):
        if item == "":
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENV, f"CNI_ARGS: invalid pair {item!r}, expected KEY=VALUE")
        pairs.append((key, value))
    return tuple(pairs)


def get(pairs: Pairs, key: str) -> str | None:
    """The last value of `key` (later pairs override earlier ones, as in libcni)."""
    found = None
    for k, v in pairs:
        if k == key:
            found = v
    return found


def render(pairs: Pairs) -> str:
    return ";".join(f"{k}={v}" for k, v in pairs)
