"""Bundle the Python files the guest lane reads into one tar, so the guest can keep them in RAM.

Run on the host as `python tests/kernel/pybundle.py OUT_DIR` (with META_CNI_GUEST=1 so the guest tests
collect). In the QEMU/TCG guest the host root is shared over 9p without caching: every Python start
re-reads hundreds of files through the emulated virtio transport, which makes `import pyroute2` take
10-15 s. The guest script (guest.sh) instead unpacks OUT_DIR/py.tar into tmpfs and mounts it as the
top layer of a read-only overlay over each directory listed in OUT_DIR/py.roots, so the same
paths are served from RAM, and anything not bundled still falls through to the 9p share.

The file set is what this process loads while doing what the guest processes do: importing every
delegate and the standalone entry's modules, opening an IPRoute socket, and collecting the guest tests
with pytest. Sources come with a valid cached bytecode file (compiled into the tar when the host has
none, as PYTHONDONTWRITEBYTECODE may be set), so the guest never compiles.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
import pkgutil
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_TESTS = REPO / "tests" / "kernel" / "guest"

opened: set[str] = set()


def _audit(event: str, args: tuple) -> None:  # type: ignore[type-arg]
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        opened.add(os.fsdecode(args[0]))


def exercise() -> None:
    """Import and run (harmlessly) what the guest's plugin and pytest processes import and run. Best effort:
    a module that fails here fails its guest tests on its own; the bundle only makes the guest faster."""
    import delegates

    names = [f"delegates.{m.name}" for m in pkgutil.iter_modules(delegates.__path__)]
    names += ["meta.main", "meta.cni.request", "meta.cni.result", "meta.invoke.exec", "meta.netns"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            print(f"pybundle: importing {name} failed: {e!r}", file=sys.stderr)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.get_links()
        ipr.get_addr()
        ipr.get_routes()
    subprocess.run(["true"], check=True)
    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                          f"--junitxml={tmp}/x.xml", "--rootdir", str(REPO), str(GUEST_TESTS)])
    if rc != 0:
        print(f"pybundle: collecting {GUEST_TESTS} failed (rc {rc})", file=sys.stderr)


def roots() -> list[Path]:
    """Directories whose files are bundled (and overlaid in the guest): the repo (with its venv) and the
    base interpreter's installation; the venv too if it lives elsewhere."""
    found = [REPO, Path(sys.base_prefix).resolve()]
    prefix = Path(sys.prefix)
    if not prefix.resolve().is_relative_to(REPO):
        found.append(prefix)
    return found


def loaded_files() -> set[Path]:
    files = {Path(p) for p in opened}
    for m in list(sys.modules.values()):
        for attr in ("__file__",):
            f = getattr(m, attr, None)
            if isinstance(f, str):
                files.add(Path(f))
    with open("/proc/self/maps") as maps:  # shared objects: libpython and extension modules
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                files.add(Path(parts[5].strip()))
    files.update(Path(sys.prefix, "bin").glob("meta-*"))  # the console scripts the tests exec
    return {f for f in files if f.is_file()}


def pyc_valid(src: Path, pyc: Path) -> bool:
    """A timestamp-based pyc matching the source's mtime and size (what the import system checks)."""
    try:
        head = pyc.read_bytes()[:16]
    except OSError:
        return False
    st = src.stat()
    return (len(head) == 16 and head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == b"\0\0\0\0"
            and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


def build(out: Path) -> None:
    rts = roots()
    under = [f for f in loaded_files() if any(f.is_relative_to(r) for r in rts)]
    members: dict[Path, Path | bytes] = {}  # arc path (absolute) -> host file or content
    for f in under:
        if f.suffix == ".pyc" and f.parent.name == "__pycache__":
            src = f.parent.parent / (f.name.split(".")[0] + ".py")
            f = src if src.is_file() else f
        members[f] = f
        if f.suffix == ".py":
            pyc = Path(importlib.util.cache_from_source(str(f)))
            if pyc_valid(f, pyc):
                members[pyc] = pyc
            else:
                import py_compile

                with tempfile.TemporaryDirectory() as tmp:
                    py_compile.compile(str(f), cfile=f"{tmp}/x.pyc", dfile=str(f), doraise=True,
                                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
                    members[pyc] = Path(f"{tmp}/x.pyc").read_bytes()
    with tarfile.open(out / "py.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for arc, src in sorted(members.items()):
            name = str(arc).lstrip("/")
            if isinstance(src, bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(src), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(src))
            elif src.suffix == ".so" or ".so." in src.name:
                tar.add(stripped(src), arcname=name, recursive=False)
            else:
                tar.add(src, arcname=name, recursive=False)
    (out / "py.roots").write_text("".join(f"{r}\n" for r in rts))


_strip_dir = tempfile.mkdtemp(prefix="mck-pybundle-")


def stripped(so: Path) -> Path:
    """A copy of a shared object without debug sections (libpython carries ~18 MB of them)."""
    tool = shutil.which("objcopy")
    if tool is None:
        return so
    copy = Path(_strip_dir) / so.name
    proc = subprocess.run([tool, "--strip-debug", str(so), str(copy)], capture_output=True)
    if proc.returncode != 0:
        return so
    shutil.copystat(so, copy)
    return copy


def main() -> int:
    out = Path(sys.argv[1])
    sys.dont_write_bytecode = True
    sys.addaudithook(_audit)
    exercise()
    try:
        build(out)
    finally:
        shutil.rmtree(_strip_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
