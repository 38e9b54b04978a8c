"""CNI error codes and the error type every layer raises."""
from __future__ import annotations

import json

# Well-known codes of the CNI spec (0-99 are reserved by the spec).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
# Plugin-specific codes start at 100; the reference plugins use 999 for "internal".
DELEGATE_FAILED = 100
INTERNAL = 999


class CNIError(Exception):
    """An error that ends a CNI command and is printed as the spec's error structure."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str | None = None) -> dict[str, object]:
        out: dict[str, object] = {}
        if cni_version:
            out["cniVersion"] = cni_version
        out["code"] = self.code
        out["msg"] = self.msg
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str | None = None) -> str:
        return json.dumps(self.to_dict(cni_version), indent=4)

    def __repr__(self) -> str:
        return f"CNIError({self.code}, {self.msg!r}, {self.details!r})"
