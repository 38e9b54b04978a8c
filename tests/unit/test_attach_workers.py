"""The daemon's attachment workers (meta/invoke/workers.py): real processes from a fork server.

A network whose only plugin is the built-in host-local makes an attachment without a network namespace, so
these tests need no root; holding host-local's own flock makes a worker wait for as long as a test needs.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from meta.cni.errors import INTERNAL, CNIError
from meta.invoke import Invocation, chain
from meta.invoke.builtin import BuiltinInvoker
from meta.invoke.exec import ExecInvoker
from meta.invoke.timed import Observation
from meta.invoke.workers import Spread, Workers
from meta.nad import parse_config
from meta.plan import Attachment

BASE = Invocation(command="ADD", container_id="c1", netns="", ifname="", cni_args="", path=(), where="")


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(2)
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


def attachment(tmp_path: Path, name: str = "ipam-only", **ipam: Any) -> Attachment:
    plugin = {"cniVersion": "1.0.0", "name": name, "type": "meta-host-local",
              "ipam": {"type": "meta-host-local", "subnet": "10.99.0.0/24", "dataDir": str(tmp_path), **ipam}}
    return Attachment(name=name, ifname="net1", network=parse_config(plugin, "test", None, "1.0.0"))


def spread(workers: Workers, seen: list[Observation]) -> Spread:
    return Spread(workers, 10.0, True, seen.append)


def test_a_worker_makes_the_attachment_and_reports_its_delegate_calls(workers: Workers, tmp_path: Path) -> None:
    seen: list[Observation] = []
    s = spread(workers, seen)
    (w,) = s.lease(1)
    try:
        assert w.process.pid != os.getpid()
        s.send(w, attachment(tmp_path), BASE)
        result = s.receive(w, attachment(tmp_path))
    finally:
        s.give_back(w)
    assert result["ips"][0]["address"] == "10.99.0.2/24"
    assert (tmp_path / "ipam-only" / "10.99.0.2").read_text().startswith("c1"), "the worker wrote the store"
    assert [(p, c, code) for p, c, code, _ in seen] == [("meta-host-local", "ADD", None)]


def test_errors_come_back_as_the_same_cni_error(workers: Workers, tmp_path: Path) -> None:
    seen: list[Observation] = []
    s = spread(workers, seen)
    (w,) = s.lease(1)
    try:
        s.send(w, attachment(tmp_path, subnet="not-a-subnet"), BASE)
        with pytest.raises(CNIError) as e:
            s.receive(w, attachment(tmp_path))
    finally:
        s.give_back(w)
    with pytest.raises(CNIError) as here:  # the same attachment made in this process
        chain.add(attachment(tmp_path, subnet="not-a-subnet"), BuiltinInvoker(ExecInvoker(10.0), True), BASE)
    assert (e.value.code, e.value.msg, e.value.details) == (here.value.code, here.value.msg, here.value.details)
    assert "not-a-subnet" in e.value.msg
    assert [(p, code) for p, _, code, _ in seen] == [("meta-host-local", e.value.code)]


def test_lease_takes_only_idle_workers(workers: Workers) -> None:
    taken = workers.lease(5)
    try:
        assert len(taken) == 2 and workers.lease(1) == [], "a busy pool leases nothing: the caller works itself"
    finally:
        for w in taken:
            workers.give_back(w)
    again = workers.lease(2)
    assert len(again) == 2
    for w in again:
        workers.give_back(w)


def _hold_lock(tmp_path: Path, network: str) -> int:
    (tmp_path / network).mkdir(exist_ok=True)
    fd = os.open(tmp_path / network / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_worker_that_dies_mid_attachment_is_an_error_and_is_replaced(workers: Workers, tmp_path: Path) -> None:
    fd = _hold_lock(tmp_path, "stuck")  # the worker blocks in host-local's flock, mid-attachment
    s = spread(workers, [])
    try:
        (w,) = s.lease(1)
        s.send(w, attachment(tmp_path, "stuck"), BASE)
        pid = w.process.pid
        os.kill(pid, 9)
        with pytest.raises(CNIError) as e:
            s.receive(w, attachment(tmp_path, "stuck"))
        assert e.value.code == INTERNAL and "died" in e.value.msg and "stuck" in e.value.msg
        s.give_back(w)
        assert pid not in workers.pids()
        deadline = time.monotonic() + 30
        while len(workers.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers.pids()) == 2, "a fresh worker took its place"
    finally:
        os.close(fd)
    fresh = s.lease(2)
    try:
        for n, w in enumerate(fresh):
            s.send(w, attachment(tmp_path, "after"), attrs.evolve(BASE, container_id=f"c{n}"))
        addresses = sorted(s.receive(w, attachment(tmp_path, "after"))["ips"][0]["address"] for w in fresh)
    finally:
        for w in fresh:
            s.give_back(w)
    assert addresses == ["10.99.0.2/24", "10.99.0.3/24"], "both workers serve after the replacement"


def test_a_silent_worker_is_killed_after_the_wait(workers: Workers, tmp_path: Path) -> None:
    fd = _hold_lock(tmp_path, "silent")
    try:
        (w,) = workers.lease(1)
        w.send(attachment(tmp_path, "silent"), BASE, 10.0, True)
        with pytest.raises(CNIError, match=r"no answer in 0.5s; killed"):
            w.receive(0.5)
        assert not w.alive
        workers.give_back(w)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 30
    while len(workers.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers.pids()) == 2


def test_closed_pool_ends_its_workers(tmp_path: Path) -> None:
    pool = Workers(1)
    pool.start()
    (pid,) = pool.pids()
    pool.close()
    assert pool.pids() == [] and pool.lease(1) == []
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the worker exited"


def test_the_primarys_result_is_saved_while_the_others_are_made_and_a_failed_save_undoes_all(
        workers: Workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """core's _Attacher: the primary's cache save comes once a worker has the next attachment (so the write
    overlaps it), before this thread starts its own; when that save fails, every attachment still finishes,
    the ADD reports the save's error, and rollback frees all three."""
    from meta import core
    from meta.cache import Cache, Record
    from meta.cni import request as cnirequest
    from meta.cni.errors import IO_FAILURE
    from meta.config import MetaConfig
    from meta.plan import PodIdentity

    conf = {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "clusterNetwork": "n0"}
    req = cnirequest.parse({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": str(tmp_path),
                            "CNI_IFNAME": "eth0", "CNI_PATH": ""}, json.dumps(conf).encode())
    cfg = MetaConfig(name="meta", cni_version="1.0.0", cluster_network="n0", cni_dir=str(tmp_path / "cache"))
    ctx = core.Context(req=req, cfg=cfg, invoker=BuiltinInvoker(ExecInvoker(10.0), True), spread=spread(workers, []))
    atts = tuple(attrs.evolve(attachment(tmp_path, f"n{i}"), ifname=f"net{i}") for i in range(3))
    record = Record(container_id="c1", ifname="eth0", netns=str(tmp_path), cni_version="1.0.0", pod=PodIdentity(),
                    attachments=atts, results=(None,) * 3)
    run = core._Attacher(ctx, record)
    saves: list[tuple[list[int], list[bool]]] = []

    def save(self: Cache, rec: Record, durable: bool = True) -> None:
        saves.append((sorted(run.started), [r is not None for r in rec.results]))
        if len(saves) == 1:
            raise CNIError(IO_FAILURE, "cannot write meta-cni cache: disk full")

    monkeypatch.setattr(Cache, "save", save)
    with pytest.raises(CNIError, match="disk full"):
        run.attach_all(parallel=True)
    assert saves[0] == ([0, 1], [True, False, False]), "saved once net1 went to a worker, before net2 started"
    assert all(r is not None for r in run.results[1:]), "the other attachments finished"
    leased = workers.lease(2)
    try:
        assert len(leased) == 2, "the worker was given back"
    finally:
        for w in leased:
            workers.give_back(w)
    held = sorted(p.name for n in range(3) for p in (tmp_path / f"n{n}").glob("10.99.0.*"))
    assert held == ["10.99.0.2"] * 3
    monkeypatch.undo()
    run.rollback(CNIError(IO_FAILURE, "disk full"))
    assert sorted(p.name for n in range(3) for p in (tmp_path / f"n{n}").glob("10.99.0.*")) == []
