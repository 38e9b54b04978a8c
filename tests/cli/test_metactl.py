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


META_IPAM = """\
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: bad-range, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": "macvlan", "master": "eth0",
            "ipam": {"type": "meta-ipam", "range": "10.232.0.0/24", "range_start": "10.233.0.5"}}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: bad-field, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge", "bridge": "br9",
            "ipam": {"type": "meta-ipam", "range": "10.232.1.0/24", "sticky": "yes", "colour": 1}}]}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: blue-a, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": "bridge", "bridge": "br9",
            "ipam": {"type": "meta-ipam", "range": "10.232.2.0/24", "network_name": "blue"}}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: blue-b, namespace: ns2}
spec:
  config: '{"cniVersion": "1.0.0", "type": "macvlan", "master": "eth0",
            "ipam": {"type": "meta-ipam", "range": "10.232.3.0/24", "network_name": "blue"}}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: blue-c, namespace: ns2}
spec:
  config: '{"cniVersion": "1.0.0", "type": "macvlan", "master": "eth0",
            "ipam": {"type": "meta-ipam", "range": "10.232.2.0/24", "network_name": "blue", "gateway": "10.232.2.1"}}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: fine, namespace: ns1}
spec:
  config: '{"cniVersion": "1.0.0", "type": "macvlan", "master": "eth0",
            "ipam": {"type": "meta-ipam", "range": "10.232.4.0/24", "ipRanges": [{"range": "fd00:232:4::/120"}],
                     "gateway": ["10.232.4.1", "fd00:232:4::1"], "block_size": {"4": 27}}}'
"""


def test_validate_reports_meta_ipam_config_errors(tmp_path: Path) -> None:
    """What meta-ipam's ADD would refuse (code 7), per NAD and field; and NADs sharing a pool (network_name)
    with other ranges, which the ADD of the later one would refuse."""
    f = tmp_path / "ipam.yaml"
    f.write_text(META_IPAM)
    p = metactl("validate", str(f))
    assert p.returncode == 1
    assert p.stdout.splitlines() == [
        f"{f}: NetworkAttachmentDefinition ns1/bad-range: macvlan: ipam.range_start: 10.233.0.5 is not in "
        "10.232.0.0/24",
        f"{f}: NetworkAttachmentDefinition ns1/bad-field: bridge: ipam.colour: unknown field",
        f"{f}: NetworkAttachmentDefinition ns1/bad-field: bridge: ipam.sticky: 'yes' is not of type "
        "'boolean'",
        f"{f}: NetworkAttachmentDefinition ns2/blue-b: macvlan: ipam.network_name: pool 'blue' is also used by "
        "NetworkAttachmentDefinition ns1/blue-a with ranges ['10.232.2.0/24']; this one has ['10.232.3.0/24']: "
        "NADs sharing a pool need the same ranges and block_size",
        f"{f}: NetworkAttachmentDefinition ns2/blue-c: macvlan: ipam.network_name: pool 'blue' is also used by "
        "NetworkAttachmentDefinition ns1/blue-a with ranges ['10.232.2.0/24']; this one has "
        "['10.232.2.0/24 exclude 10.232.2.1']: NADs sharing a pool need the same ranges and block_size",
    ]
    assert p.stderr.startswith("6 object(s) checked, 5 problem(s)")


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
