"""Isolated podman (4.3, CNI backend) set-up for integration tests.

Standard library only. Recipe: /work/shared/reference/test-infrastructure.md section 3.
Keep `workdir` short (under ~40 characters, e.g. a mkdtemp under /tmp, not pytest's tmp_path): conmon's
socket paths live below it, and past the unix-socket path limit every `podman run`/`stop` stalls for
20 s ("Exceeded conmon timeout").
Typical use::

    env = make_podman_env(workdir, [str(plugin_dir), "/usr/lib/cni"], net_dir)
    image = ensure_image(env)
    subprocess.run(["podman", "run", "--rm", *PODMAN_RUN_FLAGS,
                    "--network", "mynet", image, "ip", "addr"],
                   env={**os.environ, **env}, check=True)
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping

__all__ = ["IMAGE", "PODMAN_RUN_FLAGS", "ensure_image", "make_podman_env"]

#: Name of the local busybox image created by :func:`ensure_image`.
IMAGE: str = "localhost/metacni-bb:latest"

#: Flags every ``podman run`` needs on the test machine: root lacks
#: CAP_SYS_RESOURCE, so podman's default (large) rlimits make the runtime fail.
PODMAN_RUN_FLAGS: tuple[str, ...] = (
    "--ulimit", "nofile=10000:10000",
    "--ulimit", "nproc=4096:4096",
)

#: Applets linked into the image's /bin.
BUSYBOX_APPLETS: tuple[str, ...] = ("sh", "ip", "ls", "cat", "sleep", "ping", "ifconfig")


def _toml_str(value: str | os.PathLike[str]) -> str:
    """Quote a value as a TOML basic string (JSON escaping is a compatible subset)."""
    return json.dumps(os.fspath(value))


def make_podman_env(
    workdir: pathlib.Path, plugin_dirs: list[str], net_dir: pathlib.Path
) -> dict[str, str]:
    """Write containers.conf and storage.conf under *workdir* and return their env vars.

    Podman is configured for the CNI backend with *plugin_dirs* as ``cni_plugin_dirs``
    and *net_dir* as ``network_config_dir``, runc + cgroupfs + file events (PID 1 is not
    systemd, crun fails on hybrid cgroups), and graphroot/runroot/tmp_dir under *workdir*
    so nothing touches the host's podman state (except containers/image's blob-info
    cache in /var/lib/containers/cache). ``default_ulimits`` repeats
    :data:`PODMAN_RUN_FLAGS`, so a plain ``podman run`` works too. Returns
    ``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF``; merge them into
    ``os.environ`` for every podman call.
    """
    workdir = pathlib.Path(workdir).resolve()
    net_dir = pathlib.Path(net_dir).resolve()
    graphroot = workdir / "graphroot"
    runroot = workdir / "run"
    tmp_dir = workdir / "scratch"
    for d in (net_dir, graphroot, runroot, tmp_dir):
        d.mkdir(parents=True, exist_ok=True)

    plugin_list = ", ".join(_toml_str(p) for p in plugin_dirs)
    ulimits = ", ".join(_toml_str(v) for v in PODMAN_RUN_FLAGS[1::2])
    containers_conf = workdir / "containers.conf"
    containers_conf.write_text(
        "[containers]\n"
        'netns = "private"\n'
        f"default_ulimits = [{ulimits}]\n"
        "\n[network]\n"
        'network_backend = "cni"\n'
        f"cni_plugin_dirs = [{plugin_list}]\n"
        f"network_config_dir = {_toml_str(net_dir)}\n"
        "\n[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f"events_logfile_path = {_toml_str(tmp_dir / 'events.log')}\n"
        'runtime = "runc"\n'
        f"tmp_dir = {_toml_str(tmp_dir)}\n"
        f"static_dir = {_toml_str(graphroot / 'libpod')}\n"
        f"volume_path = {_toml_str(graphroot / 'volumes')}\n"
    )
    storage_conf = workdir / "storage.conf"
    storage_conf.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f"graphroot = {_toml_str(graphroot)}\n"
        f"runroot = {_toml_str(runroot)}\n"
    )
    return {
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
    }


def _is_static_elf(path: pathlib.Path) -> bool:
    """Return True if *path* is an ELF64 little-endian binary without a PT_INTERP header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def _find_busybox() -> pathlib.Path:
    """Locate a statically linked busybox (Debian package busybox-static)."""
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if cand and os.path.exists(cand) and _is_static_elf(pathlib.Path(cand)):
            return pathlib.Path(cand)
    raise FileNotFoundError(
        "no static busybox found; install busybox-static (tests/infra/provision.sh)"
    )


def _image_tar(busybox: pathlib.Path) -> bytes:
    """Build an uncompressed rootfs tarball: /bin/busybox plus applet symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size = busybox.stat().st_size
        info.mode = 0o755
        with open(busybox, "rb") as f:
            tar.addfile(info, f)
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            info.mode = 0o777
            tar.addfile(info)
    return buf.getvalue()


def ensure_image(env: Mapping[str, str]) -> str:
    """Import the local busybox image into the podman store of *env* if missing.

    *env* is the mapping returned by :func:`make_podman_env` (merged over
    ``os.environ``). No registry is needed. Returns the image name (:data:`IMAGE`).
    """
    full_env = {**os.environ, **env}
    exists = subprocess.run(
        ["podman", "image", "exists", IMAGE], env=full_env, capture_output=True
    )
    if exists.returncode == 0:
        return IMAGE
    data = _image_tar(_find_busybox())
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        tmp.write(data)
        tmp.flush()
        proc = subprocess.run(
            ["podman", "import", "--change", 'CMD ["/bin/sh"]', tmp.name, IMAGE],
            env=full_env, capture_output=True, text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"podman import failed ({proc.returncode}): {proc.stderr.strip()}")
    return IMAGE
