"""CNI spec versions: what we speak and how versions compare."""
from __future__ import annotations

from .errors import INCOMPATIBLE_VERSION, CNIError

# The versions meta-cni accepts on its own stdin and answers in.
SUPPORTED: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
# The versions we can read in a delegate's result (old delegates may answer 0.1.0/0.2.0).
READABLE: tuple[str, ...] = ("0.1.0", "0.2.0") + SUPPORTED
CURRENT = "1.1.0"


def parse(version: str) -> tuple[int, int, int]:
    """Semver triple of a spec version; raises ValueError on anything else."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid CNI version {version!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    return parse(version) >= parse(minimum)


def require_supported(version: str, what: str = "config") -> str:
    """The version itself when meta-cni speaks it, else the spec's error 1."""
    if version not in SUPPORTED:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"{what} is {version!r}, plugin supports {list(SUPPORTED)}",
        )
    return version


def select(cni_version: str | None, cni_versions: object, ceiling: str = CURRENT) -> str | None:
    """Highest version of `cniVersion` ∪ `cniVersions` not above `ceiling` (spec 1.1 selection rule).

    Unparsable entries are ignored; None when nothing is usable.
    """
    candidates: list[str] = []
    if isinstance(cni_version, str):
        candidates.append(cni_version)
    if isinstance(cni_versions, list):
        candidates.extend(v for v in cni_versions if isinstance(v, str))
    best: tuple[tuple[int, int, int], str] | None = None
    top = parse(ceiling)
    for v in candidates:
        try:
            triple = parse(v)
        except ValueError:
            continue
        if triple <= top and (best is None or triple > best[0]):
            best = (triple, v)
    return best[1] if best else None
