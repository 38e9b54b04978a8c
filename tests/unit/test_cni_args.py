"""CNI_ARGS parsing and rendering (meta/cni/args.py)."""
from __future__ import annotations

import pytest

from meta.cni import args as cniargs
from meta.cni.errors import INVALID_ENV, CNIError


@pytest.mark.parametrize("raw", [None, ""])
def test_parse_absent_is_empty(raw: str | None) -> None:
    assert cniargs.parse(raw) == ()


def test_parse_keeps_order_and_duplicates() -> None:
    raw = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_NAME=q"
    assert cniargs.parse(raw) == (
        ("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", "ns"), ("K8S_POD_NAME", "p"), ("K8S_POD_NAME", "q"),
    )


def test_parse_skips_empty_items() -> None:
    # Runtimes build the string by joining, so stray separators must not be fatal.
    assert cniargs.parse(";A=1;;B=2;") == (("A", "1"), ("B", "2"))


def test_parse_value_may_be_empty_or_contain_equals() -> None:
    assert cniargs.parse("A=;B=x=y") == (("A", ""), ("B", "x=y"))


@pytest.mark.parametrize("raw,bad", [("A", "A"), ("A=1;B", "B"), ("=v", "=v"), ("A=1;=2", "=2")])
def test_parse_invalid_pair_is_code_4(raw: str, bad: str) -> None:
    with pytest.raises(CNIError) as ei:
        cniargs.parse(raw)
    assert ei.value.code == INVALID_ENV
    assert repr(bad) in ei.value.msg
    assert "CNI_ARGS" in ei.value.msg


def test_get_last_value_wins() -> None:
    pairs = cniargs.parse("K8S_POD_NAME=a;X=1;K8S_POD_NAME=b")
    assert cniargs.get(pairs, "K8S_POD_NAME") == "b"
    assert cniargs.get(pairs, "X") == "1"
    assert cniargs.get(pairs, "missing") is None


def test_get_is_case_sensitive() -> None:
    # Reference plugins match Go struct field names exactly.
    assert cniargs.get((("IP", "1.2.3.4"),), "ip") is None


def test_get_empty_value_is_not_none() -> None:
    assert cniargs.get((("A", ""),), "A") == ""


def test_render() -> None:
    assert cniargs.render(()) == ""
    assert cniargs.render((("A", "1"), ("B", ""))) == "A=1;B="


@pytest.mark.parametrize("raw", ["A=1", "IgnoreUnknown=true;K8S_POD_NAME=p;IP=10.0.0.2/24", "A=b=c;D="])
def test_render_parse_round_trip(raw: str) -> None:
    assert cniargs.render(cniargs.parse(raw)) == raw
    assert cniargs.parse(cniargs.render(cniargs.parse(raw))) == cniargs.parse(raw)
