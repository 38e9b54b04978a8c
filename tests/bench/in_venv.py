"""What lets a bench run as `python tests/bench/<script>.py` under any python: the bench needs the project's
dependencies and its packages (`meta`, `delegates`, `tests`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"


def ensure(script: str, needs: tuple[str, ...]) -> None:
    """Re-exec `script` (same arguments) under the repo's venv when this interpreter cannot import `needs`,
    else make the repo importable."""
    try:
        for name in needs:
            __import__(name)
    except ImportError:
        python = VENV / "bin" / "python"
        if Path(sys.prefix).resolve() != VENV.resolve() and python.is_file():
            os.execv(str(python), [str(python), script, *sys.argv[1:]])
        sys.exit(f"{', '.join(needs)} are needed: run under the project's venv (make provision)")
    sys.path.insert(0, str(REPO))
