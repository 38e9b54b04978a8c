"""Property-based robustness: every parser and the entry point answer a value or a CNIError, never crash.

A runtime gets either a result or the spec's error structure; any other exception would be a Python
traceback where the runtime expects JSON.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta import config as metaconfig
from meta import main as metamain
from meta import nad, schema, selection
from meta.cni import request
from meta.cni import result as cniresult
from meta.cni import version as cniversion
from meta.cni.errors import CNIError

# Derandomized and without the example database: reproducible in CI and no files written outside tmp.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
WHERE = "pod ns/p: annotation k8s.v1.cni.cncf.io/networks"

# --- strategies -----------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(scalars, _containers, max_leaves=20)


def keyed_objects(keys: list[str], values: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[dict[str, Any]]:
    """Objects over a vocabulary of meaningful keys (plus arbitrary ones), so inputs get past the first checks."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=len(keys) + 1)


versions = st.sampled_from([*cniversion.READABLE, "9.9.9", "", "1.0"]) | st.text(max_size=6)
ifnames = st.sampled_from(["eth0", "net1", "", ".", "a" * 16, "x/y", "eth1\n"]) | st.text(max_size=16)
ips = st.sampled_from(["10.0.0.1", "10.0.0.1/24", "fd00::1", "fd00::1/64", "bad", "10.0.0.1/33", ""]) | st.text(max_size=12)

selection_elements = st.fixed_dictionaries({"name": st.sampled_from(["a", "net-b", "A", ""]) | st.text(max_size=8)}, optional={
    "namespace": st.sampled_from(["ns", "Bad", ""]) | st.text(max_size=8),
    "interface": ifnames, "interfaceRequest": ifnames,
    "ips": st.lists(ips, max_size=3) | json_values,
    "mac": st.sampled_from(["02:00:00:00:00:01", "02-00-00-00-00-01", "zz"]) | json_values,
    "default-route": st.lists(ips, max_size=3) | json_values,
    "portMappings": st.lists(keyed_objects(["containerPort", "hostPort", "protocol", "hostIP"]), max_size=2) | json_values,
    "bandwidth": keyed_objects(["ingressRate", "ingressBurst", "egressRate", "egressBurst"]) | json_values,
    "cni-args": json_values,
    "infiniband-guid": st.sampled_from(["00:11:22:33:44:55:66:77", "00:11"]) | json_values,
    "deviceID": st.text(max_size=12) | json_values,
    "ipam-claim-reference": st.sampled_from(["claim", "Bad"]) | json_values,
})

plugin_objects = keyed_objects(["type", "capabilities", "ipam", "dns", "args", "runtimeConfig", "prevResult", "cni.dev/x",
                                "name", "cniVersion", "cniVersions", "disableCheck"])
delegate_objects = (
    plugin_objects
    | st.fixed_dictionaries({"type": st.sampled_from(["bridge", "../x", "a"]) | st.text(max_size=8)},
                            optional={"cniVersion": versions, "cniVersions": st.lists(versions, max_size=3) | json_values,
                                      "name": st.text(max_size=8), "capabilities": json_values, "ipam": json_values})
    | st.fixed_dictionaries({"plugins": st.lists(plugin_objects, max_size=3) | json_values},
                            optional={"cniVersion": versions, "cniVersions": st.lists(versions, max_size=3),
                                      "name": st.text(max_size=8), "disableCheck": json_values, "disableGC": json_values})
)

nad_objects = json_values | st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["k8s.cni.cncf.io/v1", "v1"]), "kind": st.sampled_from(["NetworkAttachmentDefinition", "Pod"]),
     "metadata": st.fixed_dictionaries({"name": st.sampled_from(["mynet", "Bad"]) | st.text(max_size=8)},
                                       optional={"namespace": st.text(max_size=8) | json_values,
                                                 "annotations": st.dictionaries(st.sampled_from([nad.RESOURCE_NAME, "x"]), st.text(max_size=8) | json_values, max_size=2)})
     | json_values},
    optional={"spec": st.fixed_dictionaries({}, optional={"config": delegate_objects.map(json.dumps) | st.text(max_size=30) | json_values})
              | json_values},
)

NETCONF_KEYS = ["cniVersion", "name", "type", "clusterNetwork", "defaultNetworks", "networksNamespace", "namespaceIsolation",
                "globalNamespaces", "systemNamespaces", "manifestsDir", "confDir", "cniDir", "binDir", "kubeletCheckpoint",
                "deviceInfoDir", "delegateTimeout", "logLevel", "capabilities", "runtimeConfig", "prevResult", "args",
                "disableCheck", "disableGC", "cni.dev/valid-attachments"]


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return base | extra


netconf_objects = st.builds(
    _merged,
    st.fixed_dictionaries({"cniVersion": st.sampled_from(cniversion.SUPPORTED), "name": st.just("meta"),
                           "type": st.just("meta-cni"), "clusterNetwork": st.text(min_size=1, max_size=8)}),
    st.dictionaries(st.sampled_from(NETCONF_KEYS[4:]) | st.text(max_size=6),
                    json_values | st.sampled_from(["/abs", "a,b", "rel", "true", "debug"]) | st.lists(st.sampled_from(["a", "Bad"])),
                    max_size=5),
)

IP_ENTRY = keyed_objects(["address", "gateway", "interface", "version"],
                         st.sampled_from(["10.0.0.2/24", "fd00::2/64", "4", "6"]) | st.integers(-1, 3) | json_values)
IP_BLOCK = st.fixed_dictionaries({"ip": st.sampled_from(["10.0.0.2/24", "fd00::2/64"]) | json_values},
                                  optional={"gateway": ips | json_values, "routes": st.lists(keyed_objects(["dst", "gw"])) | scalars})
result_objects = st.fixed_dictionaries({}, optional={
    "cniVersion": versions,
    "interfaces": st.lists(keyed_objects(["name", "mac", "sandbox", "mtu", "socketPath", "pciID"]), max_size=3) | scalars | json_values,
    "ips": st.lists(IP_ENTRY, max_size=3) | scalars | json_values,
    "routes": st.lists(keyed_objects(["dst", "gw", "mtu"]), max_size=3) | scalars | json_values,
    "dns": keyed_objects(["nameservers", "domain", "search", "options"]) | scalars | json_values,
    "ip4": IP_BLOCK | json_values,
    "ip6": IP_BLOCK | json_values,
}) | json_values


def value_or_cni_error(fn: Any, *args: Any) -> Any:
    """Run `fn`; a CNIError must carry an int code and a message. Anything else propagates (fails)."""
    try:
        return fn(*args)
    except CNIError as e:
        assert isinstance(e.code, int) and e.code > 0
        assert isinstance(e.msg, str) and e.msg
        json.loads(e.to_json("1.0.0"))
        return e


# --- selection ------------------------------------------------------------------------------------

@FUZZ
@given(st.text(max_size=80))
def test_selection_arbitrary_text(value: str) -> None:
    out = value_or_cni_error(selection.parse, value, "ns", WHERE)
    if isinstance(out, CNIError):
        assert out.msg.startswith(WHERE)
    else:
        assert all(isinstance(e, selection.SelectionElement) for e in out)


@FUZZ
@given(json_values | st.lists(selection_elements, max_size=3))
def test_selection_json_values(value: Any) -> None:
    out = value_or_cni_error(selection.parse, json.dumps(value), "ns", WHERE)
    if not isinstance(out, CNIError):
        assert len([e for e in out if e.default_route is not None]) <= 1
        assert all(e.namespace for e in out)


@FUZZ
@given(st.lists(selection_elements, max_size=3))
def test_default_network_json(elements: list[dict[str, Any]]) -> None:
    out = value_or_cni_error(selection.parse_default_network, json.dumps(elements), "kube-system", WHERE)
    assert isinstance(out, (CNIError, selection.SelectionElement))


# --- request --------------------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=200))
def test_decode_config_arbitrary_bytes(stdin: bytes) -> None:
    out = value_or_cni_error(request.decode_config, stdin)
    if not isinstance(out, CNIError):
        assert out["cniVersion"] in cniversion.SUPPORTED


@FUZZ
@given(keyed_objects(["cniVersion", "cniVersions", "name", "type"],
                     json_values | versions | st.lists(versions, max_size=3) | st.sampled_from(["meta", "a b"])))
def test_decode_config_json_objects(config: dict[str, Any]) -> None:
    out = value_or_cni_error(request.decode_config, json.dumps(config).encode())
    if not isinstance(out, CNIError):
        assert out["cniVersion"] in cniversion.SUPPORTED
        assert request.NAME_RE.match(out["name"])


# --- nad ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("confdir")
    (d / "10-mynet.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "mynet", "plugins": [{"type": "bridge"}]}))
    (d / "20-broken.conf").write_text("{")
    return d


@FUZZ
@given(json_values | delegate_objects, st.sampled_from(cniversion.SUPPORTED), st.none() | st.sampled_from(["nadname", ""]))
def test_parse_config(data: Any, default_version: str, default_name: str | None) -> None:
    out = value_or_cni_error(nad.parse_config, data, "origin", default_name, default_version)
    if not isinstance(out, CNIError):
        assert out.plugins and all(isinstance(p.get("type"), str) for p in out.plugins)
        assert out.cni_version in cniversion.READABLE
        json.dumps(out.to_dict())


@FUZZ
@given(nad_objects)
def test_from_nad(conf_dir: Path, obj: Any) -> None:
    out = value_or_cni_error(nad.from_nad, obj, conf_dir, "1.0.0")
    if isinstance(out, CNIError):
        assert out.msg.startswith("NetworkAttachmentDefinition ")
    else:
        assert out.plugins


# --- config ---------------------------------------------------------------------------------------

@FUZZ
@given(netconf_objects)
def test_config_load(config: dict[str, Any]) -> None:
    # decode_config always sets cniVersion before load() runs; the missing case is covered in test_config.py.
    out = value_or_cni_error(metaconfig.load, config)
    if not isinstance(out, CNIError):
        assert out.delegate_timeout > 0
        assert all(isinstance(n, str) for n in out.global_namespaces)


@FUZZ
@given(keyed_objects(NETCONF_KEYS, json_values | versions))
def test_config_load_after_decode(config: dict[str, Any]) -> None:
    decoded = value_or_cni_error(request.decode_config, json.dumps(config).encode())
    if not isinstance(decoded, CNIError):
        value_or_cni_error(metaconfig.load, decoded)


# --- result ---------------------------------------------------------------------------------------

@FUZZ
@given(result_objects, st.none() | versions)
def test_result_to_current(raw: Any, version: str | None) -> None:
    out = value_or_cni_error(cniresult.to_current, raw, version)
    if not isinstance(out, CNIError):
        assert out["cniVersion"] == cniversion.CURRENT
        # Whatever to_current accepts must be writable in every supported version.
        for v in cniversion.SUPPORTED:
            json.dumps(cniresult.from_current(out, v))


# --- the entry point ------------------------------------------------------------------------------

class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


@pytest.fixture(scope="module")
def main_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("main")
    (root / "conf").mkdir()
    (root / "bin").mkdir()
    return {"cniDir": root / "nonexistent-cni", "confDir": root / "conf", "manifestsDir": root / "manifests",
            "bin": root / "bin"}


def run_main(stdin: bytes, cni_path: Path) -> tuple[int, str]:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "fuzz1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "", "CNI_PATH": str(cni_path)}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        # core.run points the module-global schema memo at its cniDir; restore it afterwards.
        mp.setattr(schema, "memo", schema.memo)
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr(sys, "stdin", _Stdin(stdin))
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", io.StringIO())
        rc = metamain.main()
    return rc, out.getvalue()


def assert_error_structure(rc: int, stdout: str) -> dict[str, Any]:
    assert rc == 1
    data = json.loads(stdout)
    assert isinstance(data, dict)
    assert isinstance(data["code"], int) and not isinstance(data["code"], bool)
    assert isinstance(data["msg"], str) and data["msg"]
    assert "Traceback" not in stdout
    return data


@FUZZ
@given(st.binary(max_size=200))
def test_main_add_arbitrary_stdin(main_dirs: dict[str, Path], stdin: bytes) -> None:
    assert_error_structure(*run_main(stdin, main_dirs["bin"]))


@FUZZ
@given(st.dictionaries(st.sampled_from(NETCONF_KEYS) | st.text(max_size=6), json_values | versions, max_size=6))
def test_main_add_config_objects(main_dirs: dict[str, Path], extra: dict[str, Any]) -> None:
    # Paths stay inside tmp and clusterNetwork never resolves, so every ADD ends in an error structure.
    config: dict[str, Any] = {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "clusterNetwork": "no-such-network",
                              "cniDir": str(main_dirs["cniDir"]), "confDir": str(main_dirs["confDir"]),
                              "manifestsDir": str(main_dirs["manifestsDir"])}
    config.update({k: v for k, v in extra.items() if k not in ("clusterNetwork", "cniDir", "confDir", "manifestsDir", "binDir",
                                                               "kubeletCheckpoint", "deviceInfoDir")})
    assert_error_structure(*run_main(json.dumps(config).encode(), main_dirs["bin"]))
