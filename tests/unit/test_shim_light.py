"""The forward path of `meta-cni` (a config with daemonSocket) imports the standard library only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from meta.daemon import protocol
from tests.unit.test_shim import FakeDaemon, echo_answer

# Our own modules the shim may load: everything else must be the standard library.
ALLOWED = {"meta", "meta.main", "meta.shim", "meta.atomicfile", "meta.cni", "meta.cni.errors", "meta.cni.version",
           "meta.daemon", "meta.daemon.protocol", "meta.daemon.spool"}

PROBE = """
import io, json, os, sys
before = set(sys.modules)
sys.stdin = io.TextIOWrapper(io.BytesIO(sys.argv[1].encode()))
out = io.StringIO()
sys.stdout = out
import meta.main
rc = meta.main.main()
sys.stdout = sys.__stdout__
new = sorted(set(sys.modules) - before)
print(json.dumps({"rc": rc, "out": out.getvalue(), "new": new, "stdlib": sorted(sys.stdlib_module_names)}))
"""


def probe(command: str, config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "", "CNI_PATH": "/opt/cni/bin", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config)], capture_output=True, text=True, env=env,
                       check=True, cwd=Path(__file__).resolve().parents[2])
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def assert_stdlib_only(result: dict[str, Any]) -> None:
    stdlib = set(result["stdlib"])
    foreign = [m for m in result["new"] if m.split(".")[0] not in stdlib and m not in ALLOWED]
    assert foreign == [], f"non-standard-library modules imported on the forward path: {foreign}"


def test_forward_to_a_daemon(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    cfg = {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "daemonSocket": str(sock), "cniDir": str(tmp_path)}
    with FakeDaemon(sock, echo_answer(0, '{"cniVersion": "1.0.0"}')):
        result = probe("ADD", cfg, tmp_path)
    assert result["rc"] == 0 and result["out"] == '{"cniVersion": "1.0.0"}'
    assert "meta.shim" in result["new"] and "meta.daemon.protocol" in result["new"]
    assert_stdlib_only(result)


def test_unreachable_and_spooled_del(tmp_path: Path) -> None:
    cfg = {"cniVersion": "1.0.0", "name": "meta", "type": "meta-cni", "daemonSocket": str(tmp_path / "none.sock"),
           "cniDir": str(tmp_path / "cni")}
    add = probe("ADD", cfg, tmp_path)
    assert add["rc"] == 1 and json.loads(str(add["out"]))["code"] == 11
    assert_stdlib_only(add)
    delete = probe("DEL", cfg, tmp_path)
    assert delete["rc"] == 0 and (tmp_path / "cni" / "pending-del").is_dir()
    assert_stdlib_only(delete)


def test_protocol_answer_is_the_exit_code_line_then_stdout() -> None:
    assert protocol.encode_answer(1, '{"code": 7}\n') == b'1\n{"code": 7}\n'
