"""The on-disk per-attachment cache (meta/cache.py)."""
from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from meta.cache import KIND, Cache, Record
from meta.cni.errors import IO_FAILURE, CNIError
from meta.nad import NetworkConfig
from meta.plan import Attachment, PodIdentity

NET = NetworkConfig(name="br", cni_version="1.0.0", plugins=({"type": "bridge", "secret": "s3cr3t"},), origin="NAD ns/br",
                    resource_name="res/x")
RESULT: dict[str, Any] = {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.5/24"}]}


def record(container_id: str = "cid1", ifname: str = "eth0", results: tuple[dict[str, Any] | None, ...] = (RESULT, None)) -> Record:
    atts = (
        Attachment(name="cluster", ifname=ifname, network=NET, is_default=True, capability_args={"portMappings": []},
                   cni_args=(("IgnoreUnknown", "true"),)),
        Attachment(name="ns/a", ifname="net1", network=NET, device_id="D", device_info_file="/d/f", default_route=("10.0.0.1",),
                   args_cni={"k": "v"}),
    )
    return Record(container_id=container_id, ifname=ifname, netns="/var/run/netns/x", cni_version="1.0.0",
                  pod=PodIdentity(namespace="ns", name="p", uid="u", infra_container_id="i"), attachments=atts, results=results)


def test_save_and_load(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    rec = record()
    cache.save(rec)
    loaded = cache.load("cid1", "eth0")
    assert loaded is not None
    assert loaded == rec
    assert loaded.to_dict() == rec.to_dict()
    assert loaded.results == (RESULT, None)
    assert loaded.attachments[0].network.resource_name == "res/x"


def test_path_layout(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    assert cache.path("cid1", "eth0") == tmp_path / "meta" / "cid1" / "eth0.json"
    cache.save(record())
    data = json.loads((tmp_path / "meta" / "cid1" / "eth0.json").read_bytes())
    assert data["kind"] == KIND and data["containerId"] == "cid1" and data["ifName"] == "eth0"


def test_modes(tmp_path: Path) -> None:
    # Delegate configs can hold secrets.
    root = tmp_path / "cni"
    cache = Cache(str(root), "meta")
    cache.save(record())
    path = cache.path("cid1", "eth0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (root, root / "meta", root / "meta" / "cid1"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_save_creates_missing_parents(tmp_path: Path) -> None:
    # cniDir's parents may not exist on a fresh node (e.g. /var/lib/cni); ADD must not fail on that.
    cache = Cache(str(tmp_path / "var" / "lib" / "cni" / "meta-cni"), "meta")
    cache.save(record())
    assert cache.load("cid1", "eth0") is not None


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    cache.save(record(results=(None, None)))
    cache.save(record(results=(RESULT, RESULT)))
    loaded = cache.load("cid1", "eth0")
    assert loaded is not None and loaded.results == (RESULT, RESULT)
    assert sorted(p.name for p in cache.path("cid1", "eth0").parent.iterdir()) == ["eth0.json"], "no temporary files left"


def test_save_unwritable_is_code_5(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = Cache(str(blocker), "meta")
    with pytest.raises(CNIError) as ei:
        cache.save(record())
    assert ei.value.code == IO_FAILURE
    assert str(cache.path("cid1", "eth0")) in ei.value.msg


def test_load_missing_is_none(tmp_path: Path) -> None:
    assert Cache(str(tmp_path / "nothing"), "meta").load("cid1", "eth0") is None
    cache = Cache(str(tmp_path), "meta")
    cache.save(record())
    assert cache.load("cid1", "eth1") is None
    assert cache.load("cid2", "eth0") is None
    assert Cache(str(tmp_path), "other").load("cid1", "eth0") is None


@pytest.mark.parametrize("content", [
    b"", b"{", b"\xff\xfe", b"null", b"[]", b"5", b"{}", b'{"kind": "other"}',
    b'{"kind": "metaCacheV1"}',
    b'{"kind": "metaCacheV1", "containerId": "c", "ifName": "e", "cniVersion": "1.0.0", "attachments": [{}]}',
    b'{"kind": "metaCacheV1", "containerId": "c", "ifName": "e", "cniVersion": "1.0.0", "attachments": 5}',
    b'{"kind": "metaCacheV1", "containerId": "c", "ifName": "e", "cniVersion": "1.0.0", "pod": 5, "attachments": []}',
    b'{"kind": "metaCacheV1", "containerId": "c", "ifName": "e", "cniVersion": "1.0.0", "attachments": ['
    b'{"name": "n", "ifname": "x", "network": {"name": "n"}}]}',
])
def test_corrupt_is_code_5_naming_path(tmp_path: Path, content: bytes) -> None:
    cache = Cache(str(tmp_path), "meta")
    path = cache.path("cid1", "eth0")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(CNIError) as ei:
        cache.load("cid1", "eth0")
    assert ei.value.code == IO_FAILURE
    assert str(path) in ei.value.msg and "corrupt" in ei.value.msg


def test_load_directory_in_place_of_file_is_code_5(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    cache.path("cid1", "eth0").mkdir(parents=True)
    with pytest.raises(CNIError) as ei:
        cache.load("cid1", "eth0")
    assert ei.value.code == IO_FAILURE and str(cache.path("cid1", "eth0")) in ei.value.msg


def test_remove(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    cache.save(record(ifname="eth0"))
    cache.save(record(ifname="eth1"))
    cache.remove("cid1", "eth0")
    assert cache.load("cid1", "eth0") is None
    assert cache.load("cid1", "eth1") is not None, "other interfaces of the container stay"
    assert (tmp_path / "meta" / "cid1").is_dir()
    cache.remove("cid1", "eth1")
    assert not (tmp_path / "meta" / "cid1").exists(), "the container directory goes with its last entry"


def test_remove_missing_is_fine(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    cache.remove("cid1", "eth0")
    cache.save(record())
    cache.remove("cid1", "eth0")
    cache.remove("cid1", "eth0")
    assert list(cache.keys()) == []


def test_keys(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path), "meta")
    assert list(cache.keys()) == []
    for cid, ifname in [("c2", "eth0"), ("c1", "eth1"), ("c1", "eth0")]:
        cache.save(record(cid, ifname))
    Cache(str(tmp_path), "other").save(record("c9", "eth0"))
    (tmp_path / "meta" / "c1" / "notes.txt").write_text("x")
    (tmp_path / "meta" / "stray-file").write_text("x")
    assert list(cache.keys()) == [("c1", "eth0"), ("c1", "eth1"), ("c2", "eth0")]


def test_keys_missing_root(tmp_path: Path) -> None:
    assert list(Cache(str(tmp_path / "none"), "meta").keys()) == []


def test_record_from_dict_rejects_other_kind() -> None:
    d = record().to_dict()
    d["kind"] = "cniCacheV1"
    with pytest.raises(ValueError):
        Record.from_dict(d)
