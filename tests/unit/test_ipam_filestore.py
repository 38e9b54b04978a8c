"""The meta-ipam file store: the Store protocol's guarantees over files and a file lock."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from meta.ipam.filestore import FileStore
from meta.ipam.store import BLOCK, POOL, Conflict


def test_create_get_update_delete(tmp_path: Path) -> None:
    s = FileStore(tmp_path)
    assert s.get(BLOCK, "b-0a000000") is None
    v1 = s.create(BLOCK, "b-0a000000", {"pool": "b", "node": "n1", "allocations": {}})
    assert s.get(BLOCK, "b-0a000000") == v1 and s.get(BLOCK, "b-0a000000").data == v1.data  # type: ignore[union-attr]
    body = json.loads((tmp_path / "block" / "b-0a000000.json").read_text())
    assert body["version"] == 1 and body["data"]["node"] == "n1"
    with pytest.raises(Conflict):
        s.create(BLOCK, "b-0a000000", {"pool": "b"})
    v2 = s.update(v1, {"pool": "b", "node": "n2", "allocations": {}})
    assert json.loads((tmp_path / "block" / "b-0a000000.json").read_text())["version"] == 2
    with pytest.raises(Conflict):
        s.update(v1, {"pool": "b", "node": "stale"})  # written in between: the stale writer loses
    with pytest.raises(Conflict):
        s.delete(v1)
    s.delete(v2)
    assert s.get(BLOCK, "b-0a000000") is None
    s.delete(v2)  # gone already: nothing
    with pytest.raises(Conflict):
        s.update(v2, {"pool": "b"})  # gone: Conflict


def test_no_aba_after_delete_and_create(tmp_path: Path) -> None:
    s = FileStore(tmp_path)
    old = s.create(POOL, "p", {"pool": "p"})
    s.delete(old)
    s.create(POOL, "p", {"pool": "p", "ranges": ["new"]})
    with pytest.raises(Conflict):
        s.update(old, {"pool": "p", "ranges": ["stale"]})
    assert s.get(POOL, "p").data["ranges"] == ["new"]  # type: ignore[union-attr]


def test_list_by_pool_and_node(tmp_path: Path) -> None:
    s = FileStore(tmp_path)
    s.create(BLOCK, "a-1", {"pool": "a", "node": "n1"})
    s.create(BLOCK, "a-2", {"pool": "a", "node": "n2"})
    s.create(BLOCK, "a-3", {"pool": "a", "node": ""})
    s.create(BLOCK, "b-1", {"pool": "b", "node": "n1"})
    s.create(POOL, "a", {"pool": "a"})
    assert [o.name for o in s.list(BLOCK, "a")] == ["a-1", "a-2", "a-3"]
    assert [o.name for o in s.list(BLOCK, "a", node="n1")] == ["a-1"]
    assert [o.name for o in s.list(BLOCK, "a", node="")] == ["a-3"]
    assert [o.name for o in s.list(POOL, "a")] == ["a"]
    assert [o.name for o in s.list_all(BLOCK)] == ["a-1", "a-2", "a-3", "b-1"]
    assert FileStore(tmp_path / "missing").list(BLOCK, "a") == []


def test_names_stay_inside_the_directory(tmp_path: Path) -> None:
    s = FileStore(tmp_path)
    for bad in ("../x", "A", "x/y", ""):
        with pytest.raises(ValueError):
            s.create(BLOCK, bad, {})
