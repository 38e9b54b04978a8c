"""Validation of one CNI invocation: environment and stdin (meta/cni/request.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meta.cni import request
from meta.cni.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV, UNKNOWN_CONTAINER, CNIError

NETNS = "/proc/self/ns/net"  # exists in every test process, so ADD/CHECK pass the netns check
CONFIG: dict[str, Any] = {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni"}
STDIN = json.dumps(CONFIG).encode()


def env_for(command: str, **overrides: str) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "", "CNI_PATH": "/opt/cni/bin"}
    env.update(overrides)
    return env


def code_of(env: dict[str, str], stdin: bytes = STDIN) -> CNIError:
    with pytest.raises(CNIError) as ei:
        request.parse(env, stdin)
    return ei.value


# --- environment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL", "STATUS", "GC"])
def test_parse_accepts_full_env(command: str) -> None:
    req = request.parse(env_for(command, CNI_ARGS="K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns"), STDIN)
    assert req.command == command
    assert req.container_id == "c1"
    assert req.ifname == "eth0"
    assert req.netns == NETNS
    assert req.path == ("/opt/cni/bin",)
    assert req.pod_arg("K8S_POD_NAME") == "p"
    assert req.network_name == "meta"
    assert req.cni_version == "1.0.0"
    assert req.config_bytes == STDIN


@pytest.mark.parametrize("command,missing", [
    ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("CHECK", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
    ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME"]),
    ("GC", ["CNI_PATH"]),
])
def test_missing_vars_are_code_4_and_named(command: str, missing: list[str]) -> None:
    env = {"CNI_COMMAND": command}
    err = code_of(env)
    assert err.code == INVALID_ENV
    assert err.msg == f"required env variables [{','.join(missing)}] missing"


@pytest.mark.parametrize("command,var", [
    ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_NETNS"), ("ADD", "CNI_IFNAME"),
    ("CHECK", "CNI_NETNS"), ("DEL", "CNI_IFNAME"), ("GC", "CNI_PATH"),
])
def test_empty_value_counts_as_absent(command: str, var: str) -> None:
    # libcni always sets all six variables, possibly empty.
    err = code_of(env_for(command, **{var: ""}))
    assert err.code == INVALID_ENV
    assert err.msg == f"required env variables [{var}] missing"


def test_del_does_not_need_netns() -> None:
    req = request.parse(env_for("DEL", CNI_NETNS=""), STDIN)
    assert req.netns == ""


def test_del_with_gone_netns_is_accepted() -> None:
    # DEL must succeed when the namespace is already gone.
    req = request.parse(env_for("DEL", CNI_NETNS="/nonexistent/netns/x"), STDIN)
    assert req.netns == "/nonexistent/netns/x"


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_gc_ignore_empty_container_vars(command: str) -> None:
    req = request.parse(env_for(command, CNI_CONTAINERID="", CNI_NETNS="", CNI_IFNAME=""), STDIN)
    assert (req.container_id, req.netns, req.ifname) == ("", "", "")


def test_status_needs_no_path() -> None:
    req = request.parse({"CNI_COMMAND": "STATUS"}, STDIN)
    assert req.path == ()


@pytest.mark.parametrize("command", ["", "FOO", "add", "VERSION"])
def test_bad_command_is_code_4(command: str) -> None:
    err = code_of(env_for(command))
    assert err.code == INVALID_ENV
    assert ("CNI_COMMAND" in err.msg) or (command in err.msg)
    if command:
        assert err.msg == f"unknown CNI_COMMAND: {command}"


@pytest.mark.parametrize("cid", ["-abc", ".abc", "_a", "a b", "a/b", "a;b", "ä"])
def test_invalid_container_id_is_code_4(cid: str) -> None:
    err = code_of(env_for("ADD", CNI_CONTAINERID=cid))
    assert err.code == INVALID_ENV
    assert "CNI_CONTAINERID" in err.msg and repr(cid) in err.msg


def test_container_id_with_trailing_newline_is_code_4() -> None:
    # libcni's Go regexp anchors `$` at the very end of the text; a trailing newline must not slip through
    # (it would become part of the cache directory name).
    err = code_of(env_for("DEL", CNI_CONTAINERID="abc\n"))
    assert err.code == INVALID_ENV
    assert "CNI_CONTAINERID" in err.msg


@pytest.mark.parametrize("cid", ["a", "0", "A-b_c.d", "f" * 64])
def test_valid_container_ids(cid: str) -> None:
    assert request.parse(env_for("ADD", CNI_CONTAINERID=cid), STDIN).container_id == cid


@pytest.mark.parametrize("ifname,why", [
    ("a" * 16, "longer than 15"), (".", "'.' or '..'"), ("..", "'.' or '..'"),
    ("a/b", "contains"), ("a:b", "contains"), ("a b", "contains"), ("a\tb", "contains"),
])
def test_invalid_ifname_is_code_4(ifname: str, why: str) -> None:
    err = code_of(env_for("ADD", CNI_IFNAME=ifname))
    assert err.code == INVALID_ENV
    assert "CNI_IFNAME" in err.msg and why in err.msg


def test_ifname_of_15_chars_is_valid() -> None:
    assert request.parse(env_for("ADD", CNI_IFNAME="a" * 15), STDIN).ifname == "a" * 15


def test_validate_ifname() -> None:
    assert request.validate_ifname("eth0") is None
    assert request.validate_ifname("") == "is empty"
    assert request.validate_ifname("a" * 16) == "is longer than 15 characters"


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_nonexistent_netns_is_code_3(command: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "gone")
    err = code_of(env_for(command, CNI_NETNS=missing))
    assert err.code == UNKNOWN_CONTAINER
    assert repr(missing) in err.msg


def test_env_checked_before_stdin() -> None:
    # With both wrong, the missing variable is reported (the runtime's mistake comes first).
    err = code_of({"CNI_COMMAND": "ADD"}, b"not json")
    assert err.code == INVALID_ENV


def test_bad_cni_args_is_code_4() -> None:
    err = code_of(env_for("ADD", CNI_ARGS="K8S_POD_NAME"))
    assert err.code == INVALID_ENV


def test_path_split_and_empty_entries_dropped() -> None:
    req = request.parse(env_for("ADD", CNI_PATH="/a::/b:"), STDIN)
    assert req.path == ("/a", "/b")


def test_request_equality_ignores_config_bytes() -> None:
    a = request.parse(env_for("ADD"), STDIN)
    b = request.parse(env_for("ADD"), json.dumps(CONFIG, indent=2).encode())
    assert a == b


# --- stdin ----------------------------------------------------------------------------------------

def decode_error(stdin: bytes) -> CNIError:
    with pytest.raises(CNIError) as ei:
        request.decode_config(stdin)
    return ei.value


@pytest.mark.parametrize("stdin", [b"", b"{", b"not json", b"\xff\xfe\x00", b'{"name": "a",}'])
def test_bad_json_is_code_6(stdin: bytes) -> None:
    err = decode_error(stdin)
    assert err.code == DECODE_FAILURE
    assert "unmarshalling" in err.msg


@pytest.mark.parametrize("stdin", [b"[]", b"null", b"1", b'"s"', b"true"])
def test_non_object_is_code_6(stdin: bytes) -> None:
    err = decode_error(stdin)
    assert err.code == DECODE_FAILURE
    assert "not a JSON object" in err.msg


@pytest.mark.parametrize("config", [{}, {"name": ""}, {"name": None}, {"name": 5}, {"name": ["a"]}])
def test_missing_name_is_code_7(config: dict[str, Any]) -> None:
    err = decode_error(json.dumps(config).encode())
    assert err.code == INVALID_CONFIG
    assert "missing network name" in err.msg


@pytest.mark.parametrize("name", ["-a", "a b", "a/b", ".a", "net\n"])
def test_invalid_name_is_code_7(name: str) -> None:
    err = decode_error(json.dumps({"cniVersion": "1.0.0", "name": name}).encode())
    assert err.code == INVALID_CONFIG
    assert "'name'" in err.msg


@pytest.mark.parametrize("ver", ["0.1.0", "0.2.0", "9.9.9", "1.0", ""])
def test_unsupported_version_is_code_1(ver: str) -> None:
    err = decode_error(json.dumps({"cniVersion": ver, "name": "n"}).encode())
    assert err.code == INCOMPATIBLE_VERSION


@pytest.mark.parametrize("ver", [1, 1.0, ["1.0.0"], {"v": "1.0.0"}, True])
def test_non_string_version_is_code_7(ver: object) -> None:
    err = decode_error(json.dumps({"cniVersion": ver, "name": "n"}).encode())
    assert err.code == INVALID_CONFIG
    assert "cniVersion" in err.msg


@pytest.mark.parametrize("ver", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions_accepted(ver: str) -> None:
    assert request.decode_config(json.dumps({"cniVersion": ver, "name": "n"}).encode())["cniVersion"] == ver


def test_missing_version_uses_highest_of_cni_versions() -> None:
    cfg = request.decode_config(json.dumps({"name": "n", "cniVersions": ["0.4.0", "1.1.0", "1.0.0", "2.0.0"]}).encode())
    assert cfg["cniVersion"] == "1.1.0"
    assert cfg["cniVersions"] == ["0.4.0", "1.1.0", "1.0.0", "2.0.0"]


def test_missing_version_with_only_unsupported_cni_versions_is_code_1() -> None:
    err = decode_error(json.dumps({"name": "n", "cniVersions": ["0.2.0"]}).encode())
    assert err.code == INCOMPATIBLE_VERSION


def test_missing_both_versions_means_0_1_0_which_is_unsupported() -> None:
    err = decode_error(b'{"name": "n"}')
    assert err.code == INCOMPATIBLE_VERSION
    assert "'0.1.0'" in err.details


def test_explicit_version_wins_over_cni_versions_here() -> None:
    # On our own stdin `cniVersion` is what the runtime selected; `cniVersions` must not override it.
    cfg = request.decode_config(json.dumps({"name": "n", "cniVersion": "1.0.0", "cniVersions": ["1.1.0"]}).encode())
    assert cfg["cniVersion"] == "1.0.0"


def test_decode_does_not_mutate_other_keys() -> None:
    raw = {"name": "n", "cniVersions": ["1.0.0"], "x": {"y": [1, 2]}}
    cfg = request.decode_config(json.dumps(raw).encode())
    assert cfg == dict(raw, cniVersion="1.0.0")


def test_utf8_bom_or_utf16_input_decodes() -> None:
    # json.loads detects UTF-16/32 from bytes: such input is still a valid config, not a crash.
    cfg = request.decode_config(json.dumps({"name": "n", "cniVersion": "1.0.0"}).encode("utf-16"))
    assert cfg["name"] == "n"


def test_deeply_nested_stdin_is_code_6() -> None:
    # A hostile or broken stdin must give an error structure, not a RecursionError from the JSON parser.
    err = decode_error(b"[" * 100_000)
    assert err.code == DECODE_FAILURE
