"""`metactl install`: what the DaemonSet's init container runs to put meta-cni on the node.

- The shim: `<bin-dir>/meta-cni`, a five-line script run by the node's python3 (`-I -S`: no user site, no
  site-packages .pth files, ~3 ms less per call), and beside it `<bin-dir>/meta-cni-shim.zip`, the
  standard-library-only modules it imports (entry point, shim, CNI errors and versions, the daemon protocol
  and the DEL spool), so the node needs python3 and nothing else. Not a zipapp: running one costs ~5 ms of
  runpy and importlib.util imports per call. It forwards every call to the daemon, which is why the config
  must name `daemonSocket`.
- The config: copied into `<conf-dir>` under its own file name, after the shim (a runtime that sees the
  config must find the executable).
- Optionally a kubeconfig built from the pod's service account (server from KUBERNETES_SERVICE_HOST/PORT,
  the CA and the token embedded, as Multus's thin entrypoint does), for a meta-cni that reads the API itself.
  The token is the one mounted now: a bound token expires, so rerun install (restart the pod) to refresh it.

Every file is written to a temporary name beside its target and renamed over it: the runtime never sees a
half-written file, and replacing a running shim never fails with "text file busy".
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import marshal
import os
import zipfile
from pathlib import Path
from typing import Any

from .. import atomicfile

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the `meta` package directory
SHIM_MODULES = (
    "__init__.py", "main.py", "shim.py", "atomicfile.py",
    "cni/__init__.py", "cni/errors.py", "cni/version.py",
    "daemon/__init__.py", "daemon/protocol.py", "daemon/spool.py",
)
SHIM = "meta-cni"
LIBRARY = "meta-cni-shim.zip"
# The library is found beside the script as the runtime named it (CNI_PATH + type): `os.path` would cost an
# import on every call, so the shim and its library are installed as regular files, side by side.
LAUNCHER = f"""import sys
sys.path.insert(0, __file__ + "{LIBRARY[len(SHIM):]}")
from meta.shim import installed_main
sys.exit(installed_main())
"""
# The node's interpreter. -I: isolated from the environment and the user's site; -S: no site module (on
# Debian it runs every dist-packages .pth file even under -I). One option word: a shebang passes one argument.
DEFAULT_PYTHON = "/usr/bin/python3"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A fixed timestamp makes the archive reproducible: reinstalling the same release rewrites identical bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class InstallError(Exception):
    """Something the operator must fix; the message says what."""


def shim_script(python: str = DEFAULT_PYTHON) -> bytes:
    """The executable the runtime runs (`<bin-dir>/meta-cni`)."""
    return f"#!{python} -IS\n{LAUNCHER}".encode()


def bytecode(source: bytes, filename: str) -> bytes:
    """A PEP 552 unchecked-hash .pyc of `source` for this interpreter. zipimport cannot write bytecode, so
    without it every call would compile the shim's modules again (~4 ms); a node whose python3 is another
    version sees a foreign magic number and zipimport compiles the source beside it instead."""
    code = compile(source, filename, "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little") + importlib.util.source_hash(source) + marshal.dumps(code)


def shim_library() -> bytes:
    """The zip archive of the shim's modules and their bytecode (`<bin-dir>/meta-cni-shim.zip`), imported
    through zipimport."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel in SHIM_MODULES:
            source = (PACKAGE_ROOT / rel).read_bytes()
            zf.writestr(zipfile.ZipInfo(f"meta/{rel}", ZIP_TIME), source)
            zf.writestr(zipfile.ZipInfo(f"meta/{rel[:-3]}.pyc", ZIP_TIME), bytecode(source, f"meta/{rel}"))
    return buf.getvalue()


def meta_plugin(config: Any) -> dict[str, Any] | None:
    """The meta-cni plugin of a CNI config file (a conflist or a single config)."""
    if not isinstance(config, dict):
        return None
    plugins = config.get("plugins") if "plugins" in config else [config]
    if not isinstance(plugins, list):
        return None
    return next((p for p in plugins if isinstance(p, dict) and p.get("type") == "meta-cni"), None)


def check_config(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InstallError(f"--config {path}: {e.strerror}") from None
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise InstallError(f"--config {path}: not JSON: {e}") from None
    plugin = meta_plugin(config)
    if plugin is None:
        raise InstallError(f"--config {path}: no plugin of type meta-cni in it")
    socket = plugin.get("daemonSocket")
    if not isinstance(socket, str) or not socket.startswith("/"):
        raise InstallError(f"--config {path}: the meta-cni plugin needs daemonSocket (an absolute path): the installed "
                           "meta-cni only forwards to the node daemon, so without it every pod would fail")
    return raw


def serviceaccount_kubeconfig(sa_dir: Path, host: str | None, port: str | None) -> dict[str, Any]:
    if not host or not port:
        raise InstallError("--kubeconfig-from-serviceaccount: KUBERNETES_SERVICE_HOST/PORT are not set (not in a pod?)")
    try:
        token = (sa_dir / "token").read_text().strip()
        ca = (sa_dir / "ca.crt").read_bytes()
    except OSError as e:
        raise InstallError(f"--kubeconfig-from-serviceaccount: {e.filename}: {e.strerror}") from None
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "meta-cni",
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca).decode()}}],
        "users": [{"name": "meta-cni", "user": {"token": token}}],
        "contexts": [{"name": "meta-cni", "context": {"cluster": "local", "user": "meta-cni"}}],
    }


def install(bin_dir: Path, conf_dir: Path, config: Path, kubeconfig: Path | None = None,
            sa_dir: Path = SERVICE_ACCOUNT, python: str = DEFAULT_PYTHON) -> list[Path]:
    """Install the shim, the kubeconfig (when `kubeconfig` is given) and the config; the paths written."""
    raw = check_config(config)
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise InstallError(f"--python {python!r}: must be an absolute path without spaces (a shebang line)")
    written = []
    bin_dir.mkdir(parents=True, exist_ok=True)
    # The library first: a runtime calling the new script must find what it imports.
    library = bin_dir / LIBRARY
    atomicfile.write(library, shim_library(), mode=0o644, durable=True)
    shim = bin_dir / SHIM
    atomicfile.write(shim, shim_script(python), mode=0o755, durable=True)
    written += [shim, library]
    if kubeconfig is not None:
        doc = serviceaccount_kubeconfig(sa_dir, os.environ.get("KUBERNETES_SERVICE_HOST"),
                                        os.environ.get("KUBERNETES_SERVICE_PORT"))
        kubeconfig.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomicfile.write(kubeconfig, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600, durable=True)
        written.append(kubeconfig)
    conf_dir.mkdir(parents=True, exist_ok=True)
    target = conf_dir / config.name
    atomicfile.write(target, raw, mode=0o600, durable=True)
    written.append(target)
    return written
