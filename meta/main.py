"""`meta-cni`: the executable a container runtime runs (CNI skeleton).

Standard library only at import time: VERSION and argument errors are answered without loading the rest
of meta-cni. A config with `daemonSocket` is forwarded to the node daemon (meta/shim.py, standard library
only too); any other runs in this process (thin mode), and `execute` is also what the daemon runs per call,
so both modes produce the same output for the same request.
"""
from __future__ import annotations

import json
import os
import sys

from .cni import version as cniversion
from .cni.errors import DECODE_FAILURE, INTERNAL, CNIError

# The typing module costs the shim milliseconds per CNI call; annotations are never evaluated at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

ABOUT = "meta-cni: multi-network meta CNI plugin"


def stdin_config(stdin: bytes) -> Any:
    try:
        return json.loads(stdin)
    except (ValueError, RecursionError):
        return None


def _stdin_version(stdin: bytes) -> str | None:
    data = stdin_config(stdin)
    v = data.get("cniVersion") if isinstance(data, dict) else None
    return v if isinstance(v, str) else None


def version_info(stdin: bytes) -> str:
    """VERSION: echo the caller's version when we speak it (spec 1.0+), else our newest."""
    asked = _stdin_version(stdin)
    return json.dumps({"cniVersion": asked if asked in cniversion.SUPPORTED else cniversion.CURRENT,
                       "supportedVersions": list(cniversion.SUPPORTED)})


def daemon_socket(config: Any) -> str | None:
    """The config's `daemonSocket` when it selects thick mode; an invalid value is left to thin mode's
    validation, which names the field."""
    value = config.get("daemonSocket") if isinstance(config, dict) else None
    return value if isinstance(value, str) and value.startswith("/") else None


def execute(env: Mapping[str, str], stdin: bytes, **seams: Any) -> tuple[int, str, int | None]:
    """Run one CNI command in this process: (exit code, stdout, CNI error code or None). `seams` go to
    core.run (the daemon passes its long-lived invoker and source factory)."""
    try:
        from .core import run
    except ImportError as e:
        if (e.name or "").startswith("meta"):
            # The installed shim (a zipapp of the standard-library modules) has no core: say what to configure.
            msg = (f"meta-cni cannot run in-process here ({e}): this executable forwards to the node daemon only, "
                   "so the meta-cni config needs daemonSocket")
        else:
            msg = f"meta-cni cannot run in-process: {e} (an installation without its dependencies)"
        err = CNIError(INTERNAL, msg)
        return 1, err.to_json(_stdin_version(stdin)), err.code
    try:
        out = run(env, stdin, **seams)
    except CNIError as e:
        return 1, e.to_json(_stdin_version(stdin)), e.code
    except RecursionError:
        err = CNIError(DECODE_FAILURE, "network config is nested too deeply")
        return 1, err.to_json(_stdin_version(stdin)), err.code
    except Exception as e:  # never a traceback on stdout: the runtime must get an error structure
        import logging

        logging.getLogger("meta-cni").exception("internal error")
        err = CNIError(INTERNAL, f"internal error: {type(e).__name__}: {e}")
        return 1, err.to_json(_stdin_version(stdin)), err.code
    return 0, out if out is not None else "", None


def main(stdin: bytes | None = None) -> int:
    """The CNI entry point; `stdin` when the caller (the installed shim) has read it already."""
    env = os.environ
    command = env.get("CNI_COMMAND", "")
    if not command:
        sys.stderr.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(cniversion.SUPPORTED)}\n")
        return 0
    if stdin is None:
        try:
            stdin = sys.stdin.buffer.read()
        except OSError as e:
            sys.stdout.write(CNIError(5, f"cannot read stdin: {e}").to_json())
            return 1
    if command == "VERSION":
        sys.stdout.write(version_info(stdin))
        return 0
    config = stdin_config(stdin)
    socket_path = daemon_socket(config)
    if socket_path is not None:
        from . import shim  # sockets and the daemon protocol: only thick mode pays for them

        rc, out = shim.forward(socket_path, env, stdin, config)
    else:
        import logging  # thin mode only: the shim path stays as small as it can

        logging.basicConfig(stream=sys.stderr, level=env.get("META_CNI_LOG_LEVEL", "WARNING").upper(),
                            format="meta-cni %(levelname)s %(message)s")
        rc, out, _ = execute(env, stdin)
    sys.stdout.write(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
