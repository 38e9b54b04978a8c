"""`metactl validate` and `metactl demo`, run as an operator runs them (the installed console script)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

METACTL = Path(sys.prefix) / "bin" / "metactl"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def metactl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(METACTL), *args], capture_output=True, text=True, timeout=300)


def test_every_sample_manifest_validates() -> None:
    # README and samples must match what the code accepts.
    p = metactl("validate", str(SAMPLES))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout == ""
    checked = int(p.stderr.split()[0])
    assert checked >= 8


BAD = """\
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: bad-mode, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": "macvlan", "mode": "sideways", "mtu": "big",
            "ipam": {"type": "host-local", "subnet": "10.9.0.0/24", "gateway": "10.8.0.1"}}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: evil, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": "../../bin/sh"}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: not-json, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": '
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: plain, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": "bridge", "bridge": "br9"}'
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: ns1
  annotations:
    k8s.v1.cni.cncf.io/networks: '[{"name": "plain", "ips": ["10.1.1.1/24"]}, {"name": "missing"}]'
---
apiVersion: v1
kind: Pod
metadata:
  name: broken
  namespace: ns1
  annotations:
    k8s.v1.cni.cncf.io/networks: 'plain@this-name-is-too-long'
"""


def test_validate_reports_one_line_per_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    p = metactl("validate", str(f))
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    expect = [
        ("NetworkAttachmentDefinition ns1/bad-mode", "mode"),
        ("NetworkAttachmentDefinition ns1/bad-mode", "mtu"),
        ("NetworkAttachmentDefinition ns1/bad-mode", "gateway: 10.8.0.1 is outside subnet 10.9.0.0/24"),
        ("NetworkAttachmentDefinition ns1/evil", "type"),
        ("NetworkAttachmentDefinition ns1/not-json", "not valid JSON"),
        ("Pod ns1/web", "[0].ips: network ns1/plain"),
        ("Pod ns1/web", "[1]: NetworkAttachmentDefinition ns1/missing is not among"),
        ("Pod ns1/broken", "is longer than 15 characters"),
    ]
    for obj, text in expect:
        assert any(line.startswith(f"{f}: {obj}: ") and text in line for line in lines), (obj, text, lines)
    assert len(lines) == len(expect), lines


def test_validate_unreadable_yaml(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("kind: [unclosed\n")
    p = metactl("validate", str(f))
    assert p.returncode == 1
    assert p.stdout.startswith(f"{f}: file: not valid YAML")


@pytest.mark.integration
def test_demo_end_to_end() -> None:
    """The main job: pods attached to primary + bridge + macvlan, traffic proven, nothing left behind."""
    p = metactl("demo")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert out.count("ADD demo/pod-") == 2
    assert "interfaces eth0, net1, data0" in out
    assert out.count(": ok") >= 4 + 2  # four pings and two DELs
    assert "left behind:" not in out
    assert not Path("/run/meta-cni-demo").exists()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "metademo" not in links
    assert "metademo" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("path", sorted(SAMPLES.rglob("*meta-cni.conflist")), ids=lambda p: p.name)
def test_sample_meta_cni_configs_load(path: Path) -> None:
    import json

    from meta import config

    lst = json.loads(path.read_text())
    conf = dict(lst["plugins"][0], name=lst["name"], cniVersion=lst["cniVersion"])
    cfg = config.load(conf)
    assert cfg.cluster_network
