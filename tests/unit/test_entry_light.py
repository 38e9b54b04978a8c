"""The executable a runtime runs must start on the standard library alone (heavy imports are lazy)."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("attr", "attrs", "yaml", "jsonschema", "pyroute2", "kubernetes")

PROBE = """
import io, os, sys
os.environ["CNI_COMMAND"] = "VERSION"
sys.stdin = io.TextIOWrapper(io.BytesIO(b'{"cniVersion": "0.4.0"}'))
out = io.StringIO()
sys.stdout = out
import meta.main
rc = meta.main.main()
sys.stdout = sys.__stdout__
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(rc, out.getvalue(), heavy)
"""


def test_version_answers_without_third_party_imports() -> None:
    p = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,)], capture_output=True, text=True, check=True)
    rc, rest = p.stdout.split(" ", 1)
    assert rc == "0"
    assert '"cniVersion": "0.4.0"' in rest and '"1.1.0"' in rest
    assert rest.rstrip().endswith("[]"), f"heavy modules imported: {rest}"
