"""The daemon's request dispatcher: admission bound, per-attachment ordering, start-up gate, spooled DELs."""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta.cni.errors import CNIError
from meta.daemon import dispatch, spool
from meta.daemon.dispatch import Dispatcher, Peek
from meta.daemon.metrics import Metrics
from meta.daemon.replay import Replayer
from tests.daemon.conftest import metric


class FakeCore:
    """Stands in for meta.main.execute: records calls, can block a command until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()

    def block(self, command: str) -> threading.Event:
        self.gates[command] = threading.Event()
        self.entered[command] = threading.Event()
        return self.gates[command]

    def __call__(self, env: dict[str, str], stdin: bytes, **seams: Any) -> tuple[int, str, int | None]:
        command = env["CNI_COMMAND"]
        with self.lock:
            self.calls.append((command, env))
        if command in self.entered:
            self.entered[command].set()
        if command in self.gates:
            assert self.gates[command].wait(60)
        if command in self.fail:
            code = self.fail[command]
            return 1, CNIError(code, f"{command} failed").to_json(), code
        return 0, "", None


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    fake = FakeCore()
    monkeypatch.setattr(dispatch, "execute", fake)
    return fake


@pytest.fixture
def cni_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cni")


def make(max_concurrent: int = 8, max_wait: float = 30.0, replayed: bool = True) -> Dispatcher:
    d = Dispatcher(lambda cfg: None, Metrics(), max_concurrent, max_wait)  # type: ignore[arg-type,return-value]
    if replayed:
        d.replayed.set()
    return d


def config(cni_dir: str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "clusterNetwork": "primary", "cniDir": cni_dir,
            **extra}


def env(command: str, container: str = "c1", **extra: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
            "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", "CNI_PATH": "/opt/cni/bin", **extra}


def request(d: Dispatcher, command: str, cni_dir: str, container: str = "c1", **cfg: Any) -> tuple[int, dict[str, Any] | None]:
    rc, out = d.handle(env(command, container), json.dumps(config(cni_dir, **cfg)).encode())
    return rc, (json.loads(out) if out else None)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    return t, box


def test_the_requests_environment_not_the_daemons(core: FakeCore, cni_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNI_COMMAND", "GC")
    monkeypatch.setenv("CNI_CONTAINERID", "daemon's own")
    assert request(make(), "ADD", cni_dir) == (0, None)
    ((command, seen),) = core.calls
    assert command == "ADD" and seen == env("ADD") and seen is not os.environ


def test_version_is_answered_without_core(core: FakeCore) -> None:
    rc, out = make().handle({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert rc == 0 and json.loads(out)["cniVersion"] == "0.4.0" and core.calls == []


def test_beyond_the_bound_gets_11_and_status_is_exempt(core: FakeCore, cni_dir: str) -> None:
    d = make(max_concurrent=1, max_wait=0)
    release = core.block("ADD")
    t, box = in_thread(lambda: request(d, "ADD", cni_dir, "c1"))
    assert core.entered["ADD"].wait(60)
    assert metric(d.metrics.render().decode(), "meta_cni_requests_in_flight") == 1
    rc, err = request(d, "DEL", cni_dir, "c2")
    assert rc == 1 and err is not None and err["code"] == 11 and "busy" in err["msg"] and err["cniVersion"] == "1.0.0"
    assert request(d, "STATUS", cni_dir, "") == (0, None), "STATUS never waits for a slot"
    release.set()
    t.join()
    assert box == [(0, None)]
    text = d.metrics.render().decode()
    assert metric(text, "meta_cni_requests_total", command="DEL", result="11") == 1
    assert metric(text, "meta_cni_requests_total", command="ADD", result="ok") == 1
    assert metric(text, "meta_cni_requests_in_flight") == 0


def test_a_request_waits_for_a_slot_within_the_bound(core: FakeCore, cni_dir: str) -> None:
    d = make(max_concurrent=1, max_wait=600)
    release = core.block("ADD")
    t1, box1 = in_thread(lambda: request(d, "ADD", cni_dir, "c1"))
    assert core.entered["ADD"].wait(60)
    t2, box2 = in_thread(lambda: request(d, "CHECK", cni_dir, "c2"))
    while metric(d.metrics.render().decode(), "meta_cni_requests_waiting") != 1:
        t2.join(0.01)
    release.set()
    t1.join()
    t2.join()
    assert box1 == box2 == [(0, None)]


def test_requests_for_one_attachment_run_one_after_the_other(core: FakeCore, cni_dir: str) -> None:
    d = make()
    release = core.block("ADD")
    t1, _ = in_thread(lambda: request(d, "ADD", cni_dir, "c1"))
    assert core.entered["ADD"].wait(60)
    t2, _ = in_thread(lambda: request(d, "DEL", cni_dir, "c1"))
    key = (cni_dir, "meta", "c1", "eth0")
    while d.keys.locks.get(key, (None, 0))[1] < 2:  # the DEL is queued behind the ADD's lock
        t2.join(0.01)
    assert [c for c, _ in core.calls] == ["ADD"], "the DEL of the same attachment waits for its ADD"
    assert request(d, "CHECK", cni_dir, "c2") == (0, None), "other attachments are not held up"
    release.set()
    t1.join()
    t2.join()
    assert [c for c, _ in core.calls] == ["ADD", "CHECK", "DEL"]
    assert d.keys.locks == {}


def test_gated_until_spooled_dels_were_replayed(core: FakeCore, cni_dir: str) -> None:
    d = make(max_wait=0, replayed=False)
    for command in ("ADD", "CHECK", "GC"):
        rc, err = request(d, command, cni_dir)
        assert rc == 1 and err is not None and err["code"] == 11 and "starting" in err["msg"]
    assert request(d, "DEL", cni_dir) == (0, None)
    assert request(d, "STATUS", cni_dir) == (0, None)
    d.replayed.set()
    assert request(d, "ADD", cni_dir) == (0, None)
    assert [c for c, _ in core.calls] == ["DEL", "STATUS", "ADD"]


def spool_del(cni_dir: str, container: str = "c1") -> Path:
    cfg = config(cni_dir)
    return spool.write(env("DEL", container), json.dumps(cfg).encode(), cfg)


def test_spooled_del_of_the_same_attachment_runs_before_add(core: FakeCore, cni_dir: str) -> None:
    d = make()
    path = spool_del(cni_dir)
    other = spool_del(cni_dir, "c9")
    assert request(d, "ADD", cni_dir) == (0, None)
    assert [c for c, _ in core.calls] == ["DEL", "ADD"]
    assert core.calls[0][1] == env("DEL")
    assert not path.exists() and other.exists(), "only that attachment's DEL"


def test_add_goes_ahead_over_a_spooled_del_that_can_never_run(core: FakeCore, cni_dir: str) -> None:
    d = make()
    path = spool_del(cni_dir)
    path.chmod(0o666)  # not ours alone: never replayed
    assert request(d, "ADD", cni_dir) == (0, None)
    assert [c for c, _ in core.calls] == ["ADD"] and not path.exists()
    assert (path.parent / f".untrusted-{path.name}").exists()


def test_add_refused_while_its_spooled_del_fails(core: FakeCore, cni_dir: str) -> None:
    d = make()
    path = spool_del(cni_dir)
    core.fail["DEL"] = 5
    rc, err = request(d, "ADD", cni_dir)
    assert rc == 1 and err is not None and err["code"] == 11 and "DEL failed" in err["msg"]
    assert [c for c, _ in core.calls] == ["DEL"] and path.exists()


def test_a_live_del_settles_the_spooled_one(core: FakeCore, cni_dir: str) -> None:
    d = make()
    path = spool_del(cni_dir)
    assert request(d, "DEL", cni_dir) == (0, None)
    assert not path.exists()


def test_replay(cni_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make(replayed=False)
    good, failing = spool_del(cni_dir, "c1"), spool_del(cni_dir, "c2")
    corrupt = spool.directory(cni_dir) / "bad.del"
    corrupt.write_bytes(b"CNI_COMMAND=DEL")
    corrupt.chmod(0o600)
    loose = spool_del(cni_dir, "c3")
    loose.chmod(0o666)
    not_del = spool.directory(cni_dir) / "add.del"
    not_del.write_bytes(good.read_bytes().replace(b"CNI_COMMAND=DEL", b"CNI_COMMAND=ADD"))
    not_del.chmod(0o600)

    def fail_c2(env_: dict[str, str], stdin: bytes, **seams: Any) -> tuple[int, str, int | None]:
        if env_["CNI_CONTAINERID"] == "c2":
            return 1, CNIError(5, "no").to_json(), 5
        return 0, "", None

    monkeypatch.setattr(dispatch, "execute", fail_c2)
    replayer = Replayer(d, [cni_dir])
    assert replayer.count() == 5
    assert replayer.replay_all() == 1, "only the failing DEL is still pending"
    assert not good.exists() and failing.exists()
    assert sorted(p.name for p in spool.directory(cni_dir).iterdir() if p.name.startswith(".")) == sorted(
        [".corrupt-bad.del", ".corrupt-add.del", f".untrusted-{loose.name}"])
    assert replayer.pending() == [failing]
    text = d.metrics.render().decode()
    assert metric(text, "meta_cni_pending_del_replays_total", result="ok") == 1
    assert metric(text, "meta_cni_pending_del_replays_total", result="5") == 1
    assert metric(text, "meta_cni_pending_del_replays_total", result="rejected") == 3


def test_replayer_remembers_cni_dirs_seen_in_requests(core: FakeCore, tmp_path: Path) -> None:
    configured, seen = str(tmp_path / "configured"), str(tmp_path / "seen")
    d = make()
    replayer = Replayer(d, [configured])
    request(d, "DEL", seen)
    request(d, "DEL", configured)
    assert replayer.cni_dirs() == [configured, seen]
    # A restarted daemon still looks there, before any request names that cniDir again.
    assert Replayer(make(), [configured]).cni_dirs() == [configured, seen]
    assert json.loads((tmp_path / "configured" / ".daemon-cni-dirs.json").read_text()) == [seen]


def test_invokers_are_shared_per_delegate_setting(cni_dir: str) -> None:
    d = make()
    peek = Peek.of(env("ADD"), json.dumps(config(cni_dir)).encode())
    assert d.invoker(peek) is d.invoker(Peek.of(env("DEL", "c2"), json.dumps(config(cni_dir)).encode()))
    other = Peek.of(env("ADD"), json.dumps(config(cni_dir, builtinStandardTypes=True)).encode())
    assert other.builtin_standard_types and d.invoker(other) is not d.invoker(peek)
    slow = Peek.of(env("ADD"), json.dumps(config(cni_dir, delegateTimeout=5)).encode())
    assert slow.delegate_timeout == 5.0 and d.invoker(slow) is not d.invoker(peek)


def test_peek_of_bad_input() -> None:
    p = Peek.of({"CNI_COMMAND": "ADD", "CNI_ARGS": "garbage"}, b"[" * 10000)
    assert (p.network, p.cni_dir, p.pod, p.cni_version) == ("", spool.DEFAULT_CNI_DIR, None, None)
    assert p.key is None, "no container: nothing to serialize on"
    invalid = Peek.of({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c"}, json.dumps({"name": "n", "cniVersion": "1.0.0",
                                                                                   "builtinStandardTypes": True}).encode())
    assert invalid.builtin_standard_types is False, "an invalid config gets thin mode's DEL defaults"


@pytest.fixture(autouse=True)
def _never_the_hosts_cni_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setattr(spool, "DEFAULT_CNI_DIR", str(tmp_path / "default-cni"))
    yield


def test_timed_invoker_keeps_in_process_scheduling() -> None:
    """core makes in-process attachments in its own thread (or a worker) and exec'd ones side by side: the
    timing wrapper must still say which is which."""
    from meta.invoke.builtin import BuiltinInvoker
    from meta.invoke.exec import ExecInvoker
    from meta.invoke.timed import TimedInvoker

    builtin = TimedInvoker(BuiltinInvoker(ExecInvoker(5.0), standard_types=False), Metrics().delegate_done)
    assert builtin.in_process("meta-bridge") and builtin.in_process("meta-host-local")
    assert not builtin.in_process("bridge") and not builtin.in_process("calico")
    assert not TimedInvoker(ExecInvoker(5.0), Metrics().delegate_done).in_process("meta-bridge")
