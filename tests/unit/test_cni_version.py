"""Spec version handling (meta/cni/version.py)."""
from __future__ import annotations

import pytest

from meta.cni import version as cniversion
from meta.cni.errors import INCOMPATIBLE_VERSION, CNIError


def test_constants_are_consistent() -> None:
    assert cniversion.CURRENT == "1.1.0"
    assert cniversion.CURRENT in cniversion.SUPPORTED
    assert set(cniversion.SUPPORTED) < set(cniversion.READABLE)
    assert "0.1.0" not in cniversion.SUPPORTED and "0.1.0" in cniversion.READABLE


@pytest.mark.parametrize("v,triple", [("0.3.1", (0, 3, 1)), ("1.10.0", (1, 10, 0)), ("10.0.2", (10, 0, 2))])
def test_parse(v: str, triple: tuple[int, int, int]) -> None:
    assert cniversion.parse(v) == triple


@pytest.mark.parametrize("v", ["", "1", "1.0", "1.0.0.0", "v1.0.0", "1.0.x", "1..0", "-1.0.0"])
def test_parse_rejects(v: str) -> None:
    with pytest.raises(ValueError):
        cniversion.parse(v)


@pytest.mark.parametrize("v,minimum,expected", [
    ("0.4.0", "0.4.0", True), ("1.0.0", "0.4.0", True), ("0.3.1", "0.4.0", False),
    ("1.1.0", "1.1.0", True), ("1.0.0", "1.1.0", False),
    # Numeric, not lexical: "0.10.0" > "0.4.0".
    ("0.10.0", "0.4.0", True),
])
def test_at_least(v: str, minimum: str, expected: bool) -> None:
    assert cniversion.at_least(v, minimum) is expected


@pytest.mark.parametrize("v", cniversion.SUPPORTED)
def test_require_supported_returns_version(v: str) -> None:
    assert cniversion.require_supported(v) == v


@pytest.mark.parametrize("v", ["0.1.0", "0.2.0", "9.9.9", "", "1.0"])
def test_require_supported_rejects_with_code_1(v: str) -> None:
    with pytest.raises(CNIError) as ei:
        cniversion.require_supported(v, what="delegate result")
    assert ei.value.code == INCOMPATIBLE_VERSION
    assert ei.value.msg == "incompatible CNI versions"
    assert repr(v) in ei.value.details and "delegate result" in ei.value.details
    assert "1.1.0" in ei.value.details


def test_select_highest_of_union() -> None:
    assert cniversion.select("0.4.0", ["0.3.1", "1.0.0"]) == "1.0.0"
    assert cniversion.select("1.0.0", ["0.3.1"]) == "1.0.0"
    assert cniversion.select(None, ["0.3.1", "1.1.0", "1.0.0"]) == "1.1.0"


def test_select_respects_ceiling() -> None:
    assert cniversion.select(None, ["1.0.0", "1.1.0", "2.0.0"]) == "1.1.0"
    assert cniversion.select("1.1.0", None, ceiling="1.0.0") is None
    assert cniversion.select(None, ["0.4.0", "1.1.0"], ceiling="1.0.0") == "0.4.0"


def test_select_numeric_ordering() -> None:
    assert cniversion.select(None, ["0.9.0", "0.10.0"], ceiling="1.0.0") == "0.10.0"


def test_select_ignores_junk() -> None:
    assert cniversion.select(None, ["x", 5, None, "1.0", "0.3.1"]) == "0.3.1"
    assert cniversion.select(5, "1.0.0") is None  # type: ignore[arg-type]
    assert cniversion.select("garbage", None) is None
    assert cniversion.select(None, None) is None
    assert cniversion.select(None, []) is None
