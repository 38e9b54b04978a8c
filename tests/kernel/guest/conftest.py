"""Fixtures of the guest lane (run only inside the QEMU guest, see ../conftest.py): dummy masters."""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.kernel.guest.helpers")

from .helpers import ip  # noqa: E402


@pytest.fixture(scope="session")
def dummy() -> Iterator[Callable[..., str]]:
    """Create an up dummy link (on the guest's host side, or in `netns`); deleted at the end."""
    made: list[tuple[str, str | None]] = []

    def make(name: str, netns: str | None = None, mtu: int = 1500) -> str:
        pre = ["-n", Path(netns).name] if netns else []
        ip(*pre, "link", "add", name, "mtu", str(mtu), "type", "dummy")
        ip(*pre, "link", "set", name, "up")
        made.append((name, netns))
        return name

    yield make
    for name, netns in made:
        subprocess.run(["ip", *(["-n", Path(netns).name] if netns else []), "link", "del", name], capture_output=True)


@pytest.fixture(scope="session")
def ipvlan_master(dummy: Callable[..., str]) -> str:
    return dummy("mckipv0")


@pytest.fixture(scope="session")
def macvlan_master(dummy: Callable[..., str]) -> str:
    # a master cannot carry macvlan and ipvlan slaves at once
    return dummy("mckmv0")
