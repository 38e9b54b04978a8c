"""`metactl ipam` over a standalone store, run as an operator runs it (the installed console script)."""
from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from meta.ipam import config
from meta.ipam.allocator import Allocator
from meta.ipam.filestore import FileStore

METACTL = Path(sys.prefix) / "bin" / "metactl"


def metactl(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(METACTL), "ipam", "--data-dir", str(data), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "ipam"
    store = FileStore(d)
    blue = config.parse({"type": "meta-ipam", "range": "10.232.70.0/26", "gateway": "10.232.70.1",
                         "ipRanges": [{"range": "fd00:232:70::/122"}]}, "blue").pool
    red = config.parse({"type": "meta-ipam", "range": "10.232.71.0/28", "range_end": "10.232.71.5"}, "red").pool
    a, b = Allocator(store, "node-a"), Allocator(store, "node-b")
    a.allocate(blue, config.Owner("c1" + "0" * 20, "net1", "ns1", "web-0", "u1", "blue"), claim="ns1/web-0")
    b.allocate(blue, config.Owner("c2", "net1", "ns1", "api", "u2"))  # no network: written by an older meta-ipam
    a.allocate(red, config.Owner("c3", "net2", "ns2", "db", "u3"), static=[ipaddress.ip_address("10.232.71.9")])
    return d


def test_pools(data: Path) -> None:
    p = metactl(data, "pools")
    assert p.returncode == 0, p.stderr
    # blue: one /26 block per family, both leased by node-a (node-b borrowed); red: only the static
    # address's block exists, leased to nobody. SIZE counts every address that can be held (static zone too).
    assert p.stdout.splitlines() == [
        "POOL  RANGES                                                 SIZE  USED  FREE  BLOCKS  LEASES BY NODE",
        "blue  10.232.70.0/26 exclude 10.232.70.1; fd00:232:70::/122  124   4     120   2       node-a=2",
        "red   10.232.71.1-10.232.71.5/28                             14    1     13    1       (unleased)=1",
    ]
    assert metactl(data, "pools", "red").stdout.splitlines()[1].startswith("red ")


def test_allocations(data: Path) -> None:
    p = metactl(data, "allocations", "blue")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["POOL", "ADDRESS", "BLOCK", "NODE", "NETWORK", "POD", "UID", "CONTAINER", "IFNAME",
                                "KIND", "STATE"]
    rows = [ln.split() for ln in lines[1:]]
    assert rows == [
        ["blue", "10.232.70.2", "10.232.70.0/26", "node-a", "blue", "ns1/web-0", "u1", "c10000000000", "net1", "claim",
         "ns1/web-0", "held"],
        ["blue", "10.232.70.3", "10.232.70.0/26", "node-b", "-", "ns1/api", "u2", "c2", "net1", "dynamic", "held"],
        ["blue", "fd00:232:70::1", "fd00:232:70::/122", "node-a", "blue", "ns1/web-0", "u1", "c10000000000", "net1",
         "claim", "ns1/web-0", "held"],
        ["blue", "fd00:232:70::2", "fd00:232:70::/122", "node-b", "-", "ns1/api", "u2", "c2", "net1", "dynamic", "held"],
    ]
    everything = [ln.split()[:2] for ln in metactl(data, "allocations").stdout.splitlines()[1:]]
    assert everything[-1] == ["red", "10.232.71.9"]
    assert len(everything) == 5


def test_release(data: Path) -> None:
    p = metactl(data, "release", "blue", "10.232.70.9")
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "metactl ipam: 10.232.70.9 is not allocated in pool 'blue'\n")
    p = metactl(data, "release", "green", "10.232.70.2")
    assert (p.returncode, p.stderr) == (1, "metactl ipam: no pool 'green' in this store\n")
    p = metactl(data, "release", "blue", "not-an-ip")
    assert (p.returncode, p.stderr) == (1, "metactl ipam: 'not-an-ip' is not an IP address\n")
    p = metactl(data, "release", "blue", "10.232.70.2")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"released 10.232.70.2 from pool blue (pod ns1/web-0, container {'c1' + '0' * 20} net1)\n"
    addresses = [ln.split()[1] for ln in metactl(data, "allocations", "blue").stdout.splitlines()[1:]]
    assert addresses == ["10.232.70.3", "fd00:232:70::1", "fd00:232:70::2"]
