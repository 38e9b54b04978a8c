"""`meta-cni`: the executable a container runtime runs (CNI skeleton).

Standard library only at import time: VERSION and argument errors are answered without loading the
rest of meta-cni. The other commands run in this process (thin mode).
"""
from __future__ import annotations

import json
import logging
import os
import sys

from .cni import version as cniversion
from .cni.errors import DECODE_FAILURE, INTERNAL, CNIError

ABOUT = "meta-cni: multi-network meta CNI plugin"


def _stdin_version(stdin: bytes) -> str | None:
    try:
        data = json.loads(stdin)
    except (ValueError, RecursionError):
        return None
    v = data.get("cniVersion") if isinstance(data, dict) else None
    return v if isinstance(v, str) else None


def version_info(stdin: bytes) -> str:
    """VERSION: echo the caller's version when we speak it (spec 1.0+), else our newest."""
    asked = _stdin_version(stdin)
    return json.dumps({"cniVersion": asked if asked in cniversion.SUPPORTED else cniversion.CURRENT,
                       "supportedVersions": list(cniversion.SUPPORTED)})


def main() -> int:
    env = os.environ
    command = env.get("CNI_COMMAND", "")
    if not command:
        sys.stderr.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(cniversion.SUPPORTED)}\n")
        return 0
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as e:
        sys.stdout.write(CNIError(5, f"cannot read stdin: {e}").to_json())
        return 1
    if command == "VERSION":
        sys.stdout.write(version_info(stdin))
        return 0
    logging.basicConfig(stream=sys.stderr, level=env.get("META_CNI_LOG_LEVEL", "WARNING").upper(),
                        format="meta-cni %(levelname)s %(message)s")
    try:
        from .core import run

        out = run(env, stdin)
    except CNIError as e:
        sys.stdout.write(e.to_json(_stdin_version(stdin)))
        return 1
    except RecursionError:
        sys.stdout.write(CNIError(DECODE_FAILURE, "network config is nested too deeply").to_json(_stdin_version(stdin)))
        return 1
    except Exception as e:  # never a traceback on stdout: the runtime must get an error structure
        logging.getLogger("meta-cni").exception("internal error")
        sys.stdout.write(CNIError(INTERNAL, f"internal error: {type(e).__name__}: {e}").to_json(_stdin_version(stdin)))
        return 1
    if out is not None:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
