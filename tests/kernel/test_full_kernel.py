"""The full-kernel lane: ipvlan, 802.1q vlan and dummy exist only in the Debian kernel, so one QEMU guest
(virtme-ng, TCG: this host's /dev/kvm cannot run ordinary guests) boots it and runs tests/kernel/guest
there; each guest test is reported here as one host test.

The guest sees the host root read-only over 9p; guest.sh gets its results out through a read-write
directory (vng --rwdir) as a JUnit XML file. Recipe: test-infrastructure.md §4.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from glob import glob
from pathlib import Path

import attrs
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GUEST_DIR = HERE / "guest"
GUEST_SH = HERE / "guest.sh"
PYBUNDLE = HERE / "pybundle.py"
VNG = Path(sys.prefix) / "bin" / "vng"
TIMEOUT = 900.0  # the whole boot + guest run; the guest lane normally takes about three minutes
COLLECTION_FAILED = "<guest collection failed>"
GUEST_ENV = {"META_CNI_GUEST": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def collect_guest_tests() -> tuple[list[str], str]:
    """Node ids of the guest tests (relative to the repo), collected on the host without running them."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:hypothesispytest", str(GUEST_DIR.relative_to(REPO))],
                          cwd=REPO, env=dict(os.environ, **GUEST_ENV), capture_output=True, text=True, timeout=300)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    return (ids, "") if proc.returncode == 0 and ids else ([], proc.stdout + proc.stderr)


GUEST_TESTS, COLLECTION_OUTPUT = collect_guest_tests()


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) of a node id in pytest's JUnit XML."""
    parts = nodeid.split("::")
    return ".".join([parts[0].removesuffix(".py").replace("/", "."), *parts[1:-1]]), parts[-1]


@attrs.frozen
class Outcome:
    status: str  # passed, failed, error, skipped
    message: str


@attrs.frozen
class GuestRun:
    outcomes: dict[tuple[str, str], Outcome] = attrs.field(repr=False)
    pytest_rc: str
    output: str = attrs.field(repr=False)
    seconds: float

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def parse_junit(path: Path) -> dict[tuple[str, str], Outcome]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed"}.get(child.tag, child.tag)
                message = "\n".join(filter(None, (child.get("message"), child.text)))
                break
        outcomes[(case.get("classname", ""), case.get("name", ""))] = Outcome(status, message)
    return outcomes


def newest_kernel() -> str:
    kernels = sorted(glob("/boot/vmlinuz-*"), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])
    assert kernels, "no /boot/vmlinuz-*: tests/infra/provision.sh installs linux-image-amd64 (make test runs it)"
    return kernels[-1]


@pytest.fixture(scope="session")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """Boot the guest once and run every guest test in it."""
    assert VNG.is_file(), f"{VNG} missing: virtme-ng is in the test extras (make test installs them)"
    kernel = newest_kernel()
    out = tmp_path_factory.mktemp("guest")
    env = dict(os.environ, PATH=f"{VNG.parent}:{os.environ.get('PATH', '')}")  # vng execs virtme-run
    bundle = subprocess.run([sys.executable, str(PYBUNDLE), str(out)], cwd=REPO, env=dict(env, **GUEST_ENV),
                            capture_output=True, text=True, timeout=300)
    assert bundle.returncode == 0, f"pybundle failed:\n{bundle.stdout}{bundle.stderr}"
    cmd = [str(VNG), "--disable-kvm", "-r", kernel, "--memory", "2G", "--cpus", "2", "--rwdir", str(out),
           "--exec", f"sh {GUEST_SH} {out} {sys.executable}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        print(output)
        pytest.fail(f"the guest lane did not finish within {TIMEOUT:g} s; guest output:\n{output}", pytrace=False)
    seconds = time.monotonic() - start
    print(f"guest lane: {seconds:.1f} s (vng rc {proc.returncode})\n{output}")
    xml = out / "guest.xml"
    if not xml.is_file():
        pytest.fail(f"the guest wrote no {xml.name} (vng rc {proc.returncode}); guest output:\n{output}", pytrace=False)
    rc_file = out / "pytest.rc"
    return GuestRun(parse_junit(xml), rc_file.read_text().strip() if rc_file.is_file() else "?", output, seconds)


@pytest.mark.parametrize("guest_test", GUEST_TESTS or [COLLECTION_FAILED])
def test_guest(guest_test: str, guest_run: GuestRun) -> None:
    if guest_test == COLLECTION_FAILED:
        pytest.fail(f"collecting {GUEST_DIR} failed:\n{COLLECTION_OUTPUT}", pytrace=False)
    outcome = guest_run.outcomes.get(junit_key(guest_test))
    if outcome is None:
        pytest.fail(f"{guest_test} did not run in the guest; guest output:\n{guest_run.tail()}", pytrace=False)
    if outcome.status != "passed":
        pytest.fail(f"{guest_test} {outcome.status} in the guest:\n{outcome.message}", pytrace=False)


def test_guest_session(guest_run: GuestRun) -> None:
    """The guest ran exactly the tests collected here, and its pytest failed only if one of them did (not on
    its own: a crash, an internal error, the guest's timeout)."""
    expected = {junit_key(t) for t in GUEST_TESTS}
    unexpected = sorted(set(guest_run.outcomes) - expected)
    assert not unexpected, f"guest ran tests not collected on the host: {unexpected}"
    if all(o.status == "passed" for o in guest_run.outcomes.values()):
        assert guest_run.pytest_rc == "0", f"guest pytest rc {guest_run.pytest_rc}; guest output:\n{guest_run.tail()}"
