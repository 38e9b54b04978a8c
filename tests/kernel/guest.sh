#!/bin/sh
# Runs inside the QEMU guest booted by test_full_kernel.py: loads the modules the host kernel lacks,
# serves the bundled Python files from RAM (see pybundle.py), then runs the guest tests.
#   guest.sh RESULTS_DIR PYTHON [PYTEST_ARG...]    RESULTS_DIR is shared read-write with the host (vng --rwdir)
set -u
out=$1
python=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
log() { echo "guest.sh: $*"; }

modprobe -a dummy ipvlan 8021q macvlan bridge veth || { log "modprobe failed"; exit 3; }

if [ -s "$out/py.tar" ]; then
    mkdir -p /run/mck-py
    tar -C /run/mck-py -xf "$out/py.tar" || { log "unpacking py.tar failed"; exit 4; }
    # read-only overlays: the bundled copy first, the 9p share below it for anything not bundled
    while read -r root; do
        [ -d "/run/mck-py$root" ] || continue
        mount -t overlay -o "lowerdir=/run/mck-py$root:$root" mck-py "$root" || { log "overlay on $root failed"; exit 5; }
    done < "$out/py.roots"
fi

export META_CNI_GUEST=1 PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp HYPOTHESIS_STORAGE_DIRECTORY=/tmp/mck-hypothesis
export PATH="$(dirname "$python"):$PATH"
cd "$repo" || exit 6
timeout 780 "$python" -m pytest -q --tb=short --durations=8 -o verbosity_assertions=2 -p no:cacheprovider -p no:hypothesispytest \
    --basetemp=/tmp/mck-guest-pytest --junitxml="$out/guest.xml" "$@" tests/kernel/guest
rc=$?
echo "$rc" > "$out/pytest.rc"
log "pytest rc $rc"
exit "$rc"
