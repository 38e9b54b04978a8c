"""NetworkAttachmentDefinitions and CNI config files into conflists (meta/nad.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meta import nad
from meta.cni.errors import INVALID_CONFIG, CNIError
from meta.nad import NetworkConfig

BRIDGE: dict[str, Any] = {"type": "bridge", "bridge": "br0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}


def parse(data: object, default_name: str | None = "nadname", default_version: str = "1.0.0") -> NetworkConfig:
    return nad.parse_config(data, "origin-x", default_name, default_version)


def parse_error(data: object, default_name: str | None = "nadname") -> CNIError:
    with pytest.raises(CNIError) as ei:
        parse(data, default_name)
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith("origin-x: "), ei.value.msg
    return ei.value


def nad_obj(config: str | None = None, name: str = "mynet", namespace: str = "ns1",
            annotations: dict[str, str] | None = None, **top: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations is not None:
        meta["annotations"] = annotations
    obj: dict[str, Any] = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition", "metadata": meta}
    if config is not None:
        obj["spec"] = {"config": config}
    obj.update(top)
    return obj


# --- parse_config ---------------------------------------------------------------------------------

def test_single_conf_is_wrapped() -> None:
    net = parse(dict(BRIDGE, cniVersion="0.4.0", name="br"))
    assert net.name == "br"
    assert net.cni_version == "0.4.0"
    assert net.plugins == (BRIDGE,)
    assert net.origin == "origin-x"
    assert net.to_dict() == {"cniVersion": "0.4.0", "name": "br", "plugins": [BRIDGE]}


def test_single_conf_keeps_plugin_keys_and_drops_list_keys() -> None:
    net = parse(dict(BRIDGE, cniVersion="1.1.0", cniVersions=["1.0.0", "1.1.0"], name="br", capabilities={"ips": True}))
    (plugin,) = net.plugins
    assert "cniVersion" not in plugin and "cniVersions" not in plugin and "name" not in plugin
    assert plugin["capabilities"] == {"ips": True}
    assert net.declares("ips") and not net.declares("mac")


def test_conflist_plugins_in_order() -> None:
    data = {"cniVersion": "1.0.0", "name": "chain", "plugins": [BRIDGE, {"type": "tuning", "capabilities": {"mac": True}}, {"type": "portmap"}]}
    net = parse(data)
    assert [p["type"] for p in net.plugins] == ["bridge", "tuning", "portmap"]
    assert net.declares("mac") and not net.declares("portMappings")


def test_parse_does_not_alias_input() -> None:
    data = {"cniVersion": "1.0.0", "name": "chain", "plugins": [{"type": "bridge", "ipam": {"type": "host-local"}}]}
    net = parse(data)
    net.plugins[0]["ipam"]["type"] = "changed"
    assert data["plugins"][0]["ipam"]["type"] == "host-local"  # type: ignore[index]


def test_declares_needs_literal_true() -> None:
    net = parse({"type": "x", "capabilities": {"ips": False}})
    assert not net.declares("ips")


def test_name_injected_from_default() -> None:
    assert parse(dict(BRIDGE, cniVersion="1.0.0")).name == "nadname"
    assert parse({"cniVersion": "1.0.0", "plugins": [BRIDGE]}).name == "nadname"


def test_own_name_wins_over_default() -> None:
    assert parse(dict(BRIDGE, name="own")).name == "own"


def test_missing_name_without_default_is_error() -> None:
    err = parse_error(dict(BRIDGE), default_name=None)
    assert "name" in err.msg


def test_default_version_when_none_given() -> None:
    assert parse(BRIDGE, default_version="0.3.1").cni_version == "0.3.1"


@pytest.mark.parametrize("data,expected", [
    ({"cniVersion": "0.3.1"}, "0.3.1"),
    ({"cniVersion": "0.2.0"}, "0.2.0"),  # old delegates stay readable
    ({"cniVersions": ["0.4.0", "1.0.0"]}, "1.0.0"),
    ({"cniVersion": "0.4.0", "cniVersions": ["1.1.0", "9.0.0"]}, "1.1.0"),
    ({"cniVersion": "1.0.0", "cniVersions": ["0.3.1"]}, "1.0.0"),
])
def test_version_selection(data: dict[str, Any], expected: str) -> None:
    assert parse(dict(BRIDGE, **data)).cni_version == expected
    assert parse(dict(data, plugins=[BRIDGE])).cni_version == expected


@pytest.mark.parametrize("data", [{"cniVersion": "9.9.9"}, {"cniVersion": "bogus"}, {"cniVersions": ["2.0.0"]},
                                  {"cniVersions": []}, {"cniVersion": ""}])
def test_unusable_version_is_error(data: dict[str, Any]) -> None:
    err = parse_error(dict(data, plugins=[BRIDGE]))
    assert "cniVersion" in err.msg


@pytest.mark.parametrize("value,expected", [(True, True), ("true", True), ("false", False), (False, False)])
def test_disable_check_and_gc_boolish(value: object, expected: bool) -> None:
    net = parse({"cniVersion": "1.1.0", "plugins": [BRIDGE], "disableCheck": value, "disableGC": value})
    assert net.disable_check is expected
    assert net.disable_gc is expected
    d = net.to_dict()
    assert d.get("disableCheck", False) is expected and d.get("disableGC", False) is expected


@pytest.mark.parametrize("value", ["yes", 1, "TRUE ", None])
def test_disable_check_rejects_non_boolish(value: object) -> None:
    err = parse_error({"cniVersion": "1.0.0", "plugins": [BRIDGE], "disableCheck": value})
    assert "disableCheck" in err.msg


@pytest.mark.parametrize("ptype", ["../x", "/bin/sh", ".hidden", "a/b", "", "-x", "x" * 256, 5])
def test_invalid_plugin_type_rejected(ptype: object) -> None:
    err = parse_error({"cniVersion": "1.0.0", "plugins": [BRIDGE, {"type": ptype}]})
    assert "plugins[1].type" in err.msg
    err = parse_error(dict(BRIDGE, type=ptype))
    assert "type" in err.msg


def test_plugin_type_with_trailing_newline_rejected() -> None:
    # JSON Schema's `$` is end of input; Python's re also matches it before a final "\n".
    err = parse_error({"cniVersion": "1.0.0", "type": "bridge\n"})
    assert "type" in err.msg


@pytest.mark.parametrize("ipam_type", ["../host-local", "/usr/bin/x", ".x"])
def test_invalid_ipam_type_rejected(ipam_type: str) -> None:
    err = parse_error({"cniVersion": "1.0.0", "type": "bridge", "ipam": {"type": ipam_type}})
    assert "ipam.type" in err.msg


def test_missing_type_rejected() -> None:
    err = parse_error({"cniVersion": "1.0.0", "plugins": [{"bridge": "br0"}]})
    assert "plugins[0]" in err.msg and "type" in err.msg


@pytest.mark.parametrize("data", [{"cniVersion": "1.0.0", "plugins": []}, {"cniVersion": "1.0.0", "plugins": {}},
                                  {"plugins": [BRIDGE], "type": "bridge"}, [], "x", None])
def test_malformed_shapes_rejected(data: object) -> None:
    parse_error(data)


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/x"])
@pytest.mark.parametrize("conflist", [False, True])
def test_cni_dev_keys_in_plugin_rejected(key: str, conflist: bool) -> None:
    plugin = dict(BRIDGE, **{key: []})
    err = parse_error({"cniVersion": "1.0.0", "plugins": [plugin]} if conflist else plugin)
    assert key in err.msg


@pytest.mark.parametrize("key", ["runtimeConfig", "prevResult"])
@pytest.mark.parametrize("conflist", [False, True])
def test_runtime_generated_keys_in_plugin_rejected(key: str, conflist: bool) -> None:
    plugin = dict(BRIDGE, **{key: {}})
    parse_error({"cniVersion": "1.0.0", "plugins": [plugin]} if conflist else plugin)


@pytest.mark.parametrize("key,conflist,where", [("runtimeConfig", False, "runtimeConfig"),
                                                ("prevResult", True, "plugins[0].prevResult")])
def test_runtime_generated_key_rejection_names_the_key(key: str, conflist: bool, where: str) -> None:
    # schema.py promises messages naming the field; "(top level): False schema does not allow {}" names none.
    plugin = dict(BRIDGE, **{key: {}})
    err = parse_error({"cniVersion": "1.0.0", "plugins": [plugin]} if conflist else plugin)
    assert f"origin-x: {where}" in err.msg, err.msg


def test_bad_network_name_rejected() -> None:
    err = parse_error(dict(BRIDGE, name="bad name"))
    assert "name" in err.msg


def test_network_config_dict_round_trip() -> None:
    net = parse({"cniVersion": "1.1.0", "name": "n", "plugins": [BRIDGE], "disableCheck": "true"})
    back = NetworkConfig.from_dict(net.to_dict(), net.origin, "res/x")
    assert back.to_dict() == net.to_dict()
    assert back.resource_name == "res/x"
    assert back.disable_check


# --- files ----------------------------------------------------------------------------------------

def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_load_file(tmp_path: Path) -> None:
    p = write(tmp_path / "10-br.conf", dict(BRIDGE, cniVersion="0.4.0", name="br"))
    net = nad.load_file(p, "1.0.0")
    assert (net.name, net.cni_version, net.origin) == ("br", "0.4.0", str(p))


def test_load_file_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.load_file(write(tmp_path / "a.conf", BRIDGE), "1.0.0")
    assert ei.value.code == INVALID_CONFIG


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.load_file(tmp_path / "missing.conf", "1.0.0")
    assert ei.value.code == INVALID_CONFIG and "missing.conf" in ei.value.msg
    with pytest.raises(CNIError) as ei:
        nad.load_file(write(tmp_path / "bad.conf", "{"), "1.0.0")
    assert ei.value.code == INVALID_CONFIG and "not valid JSON" in ei.value.msg


def test_find_in_dir_prefers_conflist(tmp_path: Path) -> None:
    write(tmp_path / "00-a.conf", dict(BRIDGE, name="net", cniVersion="0.4.0"))
    write(tmp_path / "99-z.conflist", {"name": "net", "cniVersion": "1.0.0", "plugins": [BRIDGE, {"type": "portmap"}]})
    net = nad.find_in_dir(tmp_path, "net", "1.0.0")
    assert net is not None
    assert net.origin.endswith("99-z.conflist")
    assert len(net.plugins) == 2


def test_find_in_dir_file_name_order_and_suffixes(tmp_path: Path) -> None:
    write(tmp_path / "20-b.json", dict(BRIDGE, name="net", cniVersion="1.0.0"))
    write(tmp_path / "10-a.conf", dict(BRIDGE, name="net", cniVersion="0.4.0"))
    write(tmp_path / "05-x.yaml", dict(BRIDGE, name="net", cniVersion="0.3.1"))
    net = nad.find_in_dir(tmp_path, "net", "1.0.0")
    assert net is not None and net.origin.endswith("10-a.conf")


def test_find_in_dir_skips_broken_and_other_names(tmp_path: Path) -> None:
    write(tmp_path / "00-broken.conflist", "{nope")
    write(tmp_path / "01-list.conflist", "[1, 2]")
    write(tmp_path / "02-other.conflist", {"name": "other", "cniVersion": "1.0.0", "plugins": [BRIDGE]})
    (tmp_path / "03-dir.conflist").mkdir()
    write(tmp_path / "04-mine.conf", dict(BRIDGE, name="mine", cniVersion="1.0.0"))
    net = nad.find_in_dir(tmp_path, "mine", "1.0.0")
    assert net is not None and net.origin.endswith("04-mine.conf")
    assert nad.find_in_dir(tmp_path, "absent", "1.0.0") is None


def test_find_in_missing_dir_is_none(tmp_path: Path) -> None:
    assert nad.find_in_dir(tmp_path / "nope", "x", "1.0.0") is None


def test_first_in_dir(tmp_path: Path) -> None:
    write(tmp_path / "20-b.conflist", {"name": "b", "cniVersion": "1.0.0", "plugins": [BRIDGE]})
    write(tmp_path / "10-a.conf", dict(BRIDGE, name="a", cniVersion="1.0.0"))
    write(tmp_path / "00-readme.txt", "x")
    assert nad.first_in_dir(tmp_path, "1.0.0").name == "a"


def test_first_in_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.first_in_dir(tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG and str(tmp_path) in ei.value.msg
    with pytest.raises(CNIError) as ei:
        nad.first_in_dir(tmp_path / "missing", "1.0.0")
    assert ei.value.code == INVALID_CONFIG and "missing" in ei.value.msg


# --- from_nad -------------------------------------------------------------------------------------

def test_from_nad_spec_config(tmp_path: Path) -> None:
    net = nad.from_nad(nad_obj(json.dumps(dict(BRIDGE, cniVersion="0.4.0"))), tmp_path, "1.0.0")
    assert net.name == "mynet"  # injected from the NAD name
    assert net.cni_version == "0.4.0"
    assert net.plugins == (BRIDGE,)
    assert net.origin == "NetworkAttachmentDefinition ns1/mynet spec.config"
    assert net.resource_name is None


def test_from_nad_conflist_keeps_own_name(tmp_path: Path) -> None:
    cfg = {"cniVersion": "1.1.0", "name": "inner", "plugins": [BRIDGE]}
    assert nad.from_nad(nad_obj(json.dumps(cfg)), tmp_path, "1.0.0").name == "inner"


def test_from_nad_default_version(tmp_path: Path) -> None:
    assert nad.from_nad(nad_obj(json.dumps(BRIDGE)), tmp_path, "0.3.1").cni_version == "0.3.1"


def test_from_nad_resource_name(tmp_path: Path) -> None:
    obj = nad_obj(json.dumps(BRIDGE), annotations={nad.RESOURCE_NAME: "intel.com/sriov", "other": "x"})
    assert nad.from_nad(obj, tmp_path, "1.0.0").resource_name == "intel.com/sriov"


def test_from_nad_empty_resource_name_is_none(tmp_path: Path) -> None:
    obj = nad_obj(json.dumps(BRIDGE), annotations={nad.RESOURCE_NAME: ""})
    assert nad.from_nad(obj, tmp_path, "1.0.0").resource_name is None


@pytest.mark.parametrize("config", [None, "", "   \n"])
def test_from_nad_empty_config_uses_conf_dir(tmp_path: Path, config: str | None) -> None:
    write(tmp_path / "10-mynet.conf", dict(BRIDGE, name="mynet", cniVersion="0.4.0"))
    write(tmp_path / "20-mynet.conflist", {"name": "mynet", "cniVersion": "1.0.0", "plugins": [BRIDGE, {"type": "tuning"}]})
    write(tmp_path / "05-other.conflist", {"name": "other", "cniVersion": "1.0.0", "plugins": [BRIDGE]})
    obj = nad_obj(config, annotations={nad.RESOURCE_NAME: "res/a"})
    net = nad.from_nad(obj, tmp_path, "1.0.0")
    assert net.name == "mynet"
    assert len(net.plugins) == 2  # the conflist, not the conf
    assert net.origin.startswith("NetworkAttachmentDefinition ns1/mynet (file ")
    assert net.origin.endswith("20-mynet.conflist)")
    assert net.resource_name == "res/a"


def test_from_nad_empty_config_without_file(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.from_nad(nad_obj(""), tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith("NetworkAttachmentDefinition ns1/mynet: ")
    assert "'mynet'" in ei.value.msg and str(tmp_path) in ei.value.msg


def test_from_nad_invalid_json_config(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.from_nad(nad_obj("{nope"), tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith("NetworkAttachmentDefinition ns1/mynet: spec.config is not valid JSON")


def test_from_nad_invalid_config_names_nad_and_field(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.from_nad(nad_obj(json.dumps({"type": "../../bin/sh"})), tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith("NetworkAttachmentDefinition ns1/mynet spec.config: type")


def test_from_nad_deeply_nested_config_is_code_7(tmp_path: Path) -> None:
    # spec.config is user input: a deeply nested value must be reported against the NAD, not crash.
    with pytest.raises(CNIError) as ei:
        nad.from_nad(nad_obj("[" * 100_000), tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG


@pytest.mark.parametrize("change,field", [
    ({"apiVersion": "k8s.cni.cncf.io/v2"}, "apiVersion"),
    ({"apiVersion": "v1"}, "apiVersion"),
    ({"kind": "Pod"}, "kind"),
    ({"spec": {"config": 5}}, "spec.config"),
    ({"spec": {"config": "{}", "extra": 1}}, "spec.extra"),
    ({"spec": []}, "spec"),
])
def test_invalid_nad_objects(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    obj = nad_obj(json.dumps(BRIDGE))
    obj.update(change)
    with pytest.raises(CNIError) as ei:
        nad.from_nad(obj, tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith(f"NetworkAttachmentDefinition ns1/mynet: {field}"), ei.value.msg


@pytest.mark.parametrize("name,namespace,field", [
    ("Bad_Name", "ns1", "metadata.name"), ("-x", "ns1", "metadata.name"), ("a.b", "ns1", "metadata.name"),
    ("x" * 254, "ns1", "metadata.name"), ("ok", "Bad", "metadata.namespace"), ("ok", "n" * 64, "metadata.namespace"),
])
def test_invalid_nad_names(tmp_path: Path, name: str, namespace: str, field: str) -> None:
    with pytest.raises(CNIError) as ei:
        nad.from_nad(nad_obj(json.dumps(BRIDGE), name=name, namespace=namespace), tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith(f"NetworkAttachmentDefinition {namespace}/{name}: {field}")


def test_nad_annotation_values_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(CNIError) as ei:
        nad.from_nad(nad_obj(json.dumps(BRIDGE), annotations={nad.RESOURCE_NAME: 5}), tmp_path, "1.0.0")  # type: ignore[dict-item]
    assert "metadata.annotations" in ei.value.msg


@pytest.mark.parametrize("obj", [None, [], "x", {}, {"metadata": []}, {"metadata": {"name": 5}}])
def test_non_nad_values_are_code_7(tmp_path: Path, obj: object) -> None:
    with pytest.raises(CNIError) as ei:
        nad.from_nad(obj, tmp_path, "1.0.0")
    assert ei.value.code == INVALID_CONFIG
    assert ei.value.msg.startswith("NetworkAttachmentDefinition ")
