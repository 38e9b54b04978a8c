"""Validation against the JSON Schemas in meta/schemas/, with messages that name the object and field."""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from . import atomicfile
from .cni.errors import INVALID_CONFIG, CNIError

SCHEMA_DIR = Path(__file__).parent / "schemas"


class Memo:
    """Digests of (schema, instance) pairs that passed validation, persisted in one small file.

    NAD and meta-cni configs rarely change between pods, so remembering what already validated lets
    most ADDs skip importing jsonschema (~80 ms) and compiling the schemas. Failures are never
    remembered; a digest covers the schema file's bytes, so a changed schema revalidates everything.
    """

    LIMIT = 2048

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, None] = {}
        self.dirty = False
        if path is not None:
            try:
                self.known = dict.fromkeys(json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError):
                self.known = {}

    def digest(self, name: str, instance: Any) -> str:
        h = hashlib.sha256(_schema_bytes(name))
        h.update(json.dumps(instance, sort_keys=True, separators=(",", ":")).encode())
        return h.hexdigest()

    def add(self, digest: str) -> None:
        self.known[digest] = None
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty or self.path is None:
            return
        keep = list(self.known)[-self.LIMIT:]
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomicfile.write(self.path, json.dumps(keep).encode())
        except OSError:
            pass  # only an optimisation
        self.dirty = False


memo = Memo(None)


def use_memo(path: Path | None) -> None:
    global memo
    memo = Memo(path)


@functools.cache
def _schema_bytes(name: str) -> bytes:
    return (SCHEMA_DIR / f"{name}.json").read_bytes()


@functools.cache
def _validator(name: str) -> Any:
    # jsonschema costs ~80 ms to import: only the paths that really validate pay for it.
    import jsonschema

    schema = json.loads(_schema_bytes(name))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def problems(name: str, instance: Any) -> list[str]:
    """Every violation of schema `name` by `instance`, as "field: message" lines (sorted by field)."""
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    out: list[str] = []
    for e in errors:
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            known = e.schema.get("properties", {})
            patterns = e.schema.get("patternProperties", {})
            for key in e.instance:
                if key not in known and not any(re.search(p, key) for p in patterns):
                    out.append(f"{_where([*e.absolute_path, key])}: unknown field")
        else:
            out.append(f"{_where(e.absolute_path)}: {_message(e)}")
    return out


def _message(error: Any) -> str:
    if error.validator == "not" and error.validator_value == {}:
        return "field not allowed here (reserved for the runtime, or not valid in this kind of config)"
    if error.validator in ("oneOf", "anyOf") and error.context:
        best = min(error.context, key=lambda e: len(list(e.absolute_path)))
        return best.message
    return str(error.message)


def check(name: str, instance: Any, what: str, code: int = INVALID_CONFIG) -> None:
    """Raise a CNIError naming `what` (e.g. "NAD ns/x spec.config") and the first bad field."""
    digest = memo.digest(name, instance) if memo.path is not None else ""
    if digest in memo.known:
        return
    found = problems(name, instance)
    if not found and digest:
        memo.add(digest)
    if found:
        extra = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CNIError(code, f"{what}: {found[0]}{extra}", "; ".join(found))


@functools.cache
def _plugin_validator(plugin_type: str) -> Any | None:
    import jsonschema

    defs = json.loads((SCHEMA_DIR / "plugins.json").read_text())["$defs"]
    if plugin_type not in defs:
        return None
    cls = jsonschema.validators.Draft202012Validator
    return cls({"$defs": defs, "$ref": f"#/$defs/{plugin_type}"})


def plugin_problems(plugin_type: str, instance: Any) -> list[str]:
    """Field problems of a well-known plugin's config (schemas/plugins.json); [] for unknown types."""
    validator = _plugin_validator(plugin_type)
    if validator is None:
        return []
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_where(e.absolute_path)}: {_message(e)}" for e in errors]
