"""meta-ipam over the file store from many processes at once: no address is handed out twice, every
allocation keeps its owner, and releasing everything leaves no allocation behind."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from meta.ipam.filestore import FileStore
from meta.ipam.store import BLOCK

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 8
EACH = 50
IPAM = {"type": "meta-ipam", "network_name": "conc", "range": "10.232.40.0/23", "gateway": "10.232.40.1",
        "ipRanges": [{"range": "fd00:232:40::/118"}]}

# One worker: waits for the start signal, so that all of them run together, then allocates (or releases)
# for its own owners. Nodes are shared by pairs of workers: same-node writers contend on the same blocks,
# and the four nodes race each other for leases.
WORKER = r"""
import json, os, sys, time
from meta.ipam import config
from meta.ipam.allocator import Allocator
from meta.ipam.filestore import FileStore

directory, node, prefix, count, command, ipam, go = sys.argv[1:8]
pool = config.parse(json.loads(ipam), "conc").pool
allocator = Allocator(FileStore(directory), node)
while not os.path.exists(go):
    time.sleep(0.005)
out = []
for k in range(int(count)):
    owner = config.Owner(f"{prefix}-{k}", "net1", "ns", f"pod-{prefix}-{k}", f"uid-{prefix}-{k}")
    if command == "add":
        out.append([str(x.address) for x in allocator.allocate(pool, owner)])
    else:
        out.append([str(a) for a in allocator.release(pool, owner)])
print(json.dumps(out))
"""


def run_all(directory: Path, command: str) -> list[list[list[str]]]:
    go = directory.parent / f"go-{command}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(directory), f"node-{i % 4}", f"p{i}", str(EACH),
                               command, json.dumps(IPAM), str(go)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    return outs


def allocations(directory: Path) -> dict[str, dict[str, Any]]:
    return {ip: e for b in FileStore(directory).list(BLOCK, "conc") for ip, e in b.data["allocations"].items()}


def test_processes_never_share_an_address_and_release_everything(tmp_path: Path) -> None:
    directory = tmp_path / "ipam"
    results = run_all(directory, "add")
    flat = [a for worker in results for leases in worker for a in leases]
    assert len(flat) == PROCESSES * EACH * 2
    assert len(set(flat)) == len(flat), "an address was handed out twice"
    held = allocations(directory)
    assert sorted(held) == sorted(flat)
    for i, worker in enumerate(results):
        for k, leases in enumerate(worker):
            assert {held[a]["containerID"] for a in leases} == {f"p{i}-{k}"}
            assert [ipaddress.ip_address(a).version for a in leases] == [4, 6]
    assert "10.232.40.1" not in held and "10.232.40.0" not in held
    blocks = FileStore(directory).list(BLOCK, "conc")
    assert all(b.data["used"] == len(b.data["allocations"]) for b in blocks)
    assert {b.data["node"] for b in blocks} <= {f"node-{i}" for i in range(4)} | {""}

    released = run_all(directory, "del")
    assert sorted(a for worker in released for leases in worker for a in leases) == sorted(flat)
    assert allocations(directory) == {}
