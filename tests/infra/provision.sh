#!/usr/bin/env bash
# Provision a Debian 12 (bookworm) machine, as root, for the meta-cni demo and tests.
#
#   provision.sh          full: all packages (podman, Go, ...) + cnitool built offline
#   provision.sh --demo   only what `make demo` needs (reference plugins + net tools)
#
# Idempotent: apt is skipped when every package is installed, and the cnitool build
# is skipped when the cached binary exists, so a second run takes well under a second.
# cnitool is cached at ${META_CNI_CACHE:-$HOME/.cache/meta-cni}/bin/cnitool.
# Recipes: /work/shared/reference/test-infrastructure.md sections 1, 2.1, 3, 4.
set -euo pipefail

DEMO_PKGS=(containernetworking-plugins iproute2 iptables iputils-ping util-linux procps python3 python3-venv)
# qemu-system-x86 + linux-image-amd64 (+ kmod for modprobe): the full-kernel lane (tests/kernel), which boots
# the Debian kernel under QEMU/TCG with virtme-ng for ipvlan, 802.1q vlan and dummy (test-infrastructure.md §4).
FULL_PKGS=("${DEMO_PKGS[@]}" podman runc busybox-static catatonit golang-go
           golang-github-appc-cni-dev dpkg-dev ca-certificates
           qemu-system-x86 linux-image-amd64 kmod)
CACHE_DIR=${META_CNI_CACHE:-${HOME:-/root}/.cache/meta-cni}
CNITOOL=$CACHE_DIR/bin/cnitool
SRC_PKG=golang-github-appc-cni
SRC_LIST_BASE=/etc/apt/sources.list.d/meta-cni-src   # + .sources or .list

export DEBIAN_FRONTEND=noninteractive

log() { printf 'provision: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,5s/^# \{0,1\}//p' "$0" >&2
}

mode=full
for arg in "$@"; do
    case $arg in
        --demo) mode=demo ;;
        --full) mode=full ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $arg" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root"

# Print the packages among "$@" that are not fully installed (one dpkg-query call).
missing_packages() {
    local -A ok=()
    local name status
    while read -r name status; do
        [[ $status == ii ]] && ok[$name]=1
    done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "$@" 2>/dev/null || true)
    for name in "$@"; do
        [[ -n ${ok[$name]:-} ]] || printf '%s\n' "$name"
    done
}

install_packages() {
    local -a missing
    mapfile -t missing < <(missing_packages "$@")
    if ((${#missing[@]} == 0)); then
        log "packages: all ${#} installed"
        return
    fi
    log "packages: installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    mapfile -t missing < <(missing_packages "$@")
    ((${#missing[@]} == 0)) || die "still missing after apt-get install: ${missing[*]}"
}

codename() {
    local VERSION_CODENAME=
    # shellcheck disable=SC1091
    [[ -r /etc/os-release ]] && . /etc/os-release
    printf '%s\n' "${VERSION_CODENAME:-bookworm}"
}

# From the deb822 *.sources files, print "URI<TAB>SIGNED-BY" of the first enabled
# "deb" entry whose Suites contain exactly $1 (so not bookworm-security/-updates).
deb822_entry() {
    local suite=$1 f
    shopt -s nullglob
    local files=(/etc/apt/sources.list.d/*.sources)
    shopt -u nullglob
    ((${#files[@]})) || return 1
    for f in "${files[@]}"; do
        [[ $f == "$SRC_LIST_BASE.sources" ]] && continue
        awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") &&
                    tolower(enabled) != "no" && uris != "") {
                    split(uris, u, " "); print u[1] "\t" signed; found = 1; exit
                }
                types = suites = uris = signed = enabled = ""; key = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/   { next }                    # continuation line (e.g. inline key)
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val); gsub(/[ \t]+/, " ", val)
                if (key == "types") types = val
                else if (key == "suites") suites = val
                else if (key == "uris") uris = val
                else if (key == "signed-by") signed = val
                else if (key == "enabled") enabled = val
            }
            END { if (!found) flush(); exit !found }
        ' "$f" && return 0
    done
    return 1
}

# From the one-line *.list files, print "URI<TAB>[options]" of the first "deb" line for $1.
oneline_entry() {
    local suite=$1
    local f files=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f && $f != "$SRC_LIST_BASE.list" ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    awk -v suite="$suite" '
        $1 != "deb" { next }
        {
            i = 2; opts = ""
            if ($2 ~ /^\[/) {
                while (i <= NF) { opts = opts (opts == "" ? "" : " ") $i; if ($(i++) ~ /\]$/) break }
            }
            if ($(i + 1) == suite) { print $i "\t" opts; found = 1; exit }
        }
        END { exit !found }
    ' "${files[@]}" 2>/dev/null
}

# Make `apt-get source $SRC_PKG` possible: add a deb-src entry copied from the
# existing Debian entry (deb822 or one-line format), then apt-get update.
ensure_deb_src() {
    if apt-cache showsrc "$SRC_PKG" 2>/dev/null | grep -q '^Package:'; then
        return
    fi
    local suite entry uri extra
    suite=$(codename)
    if [[ ! -e $SRC_LIST_BASE.sources && ! -e $SRC_LIST_BASE.list ]]; then
        if entry=$(deb822_entry "$suite"); then
            uri=${entry%%$'\t'*}; extra=${entry#*$'\t'}
            [[ $extra == /* ]] || extra=/usr/share/keyrings/debian-archive-keyring.gpg
            log "deb-src: adding $SRC_LIST_BASE.sources ($uri $suite)"
            printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
                "$uri" "$suite" "$extra" > "$SRC_LIST_BASE.sources"
        elif entry=$(oneline_entry "$suite"); then
            uri=${entry%%$'\t'*}; extra=${entry#*$'\t'}
            log "deb-src: adding $SRC_LIST_BASE.list ($uri $suite)"
            printf 'deb-src %s%s %s main\n' "${extra:+$extra }" "$uri" "$suite" > "$SRC_LIST_BASE.list"
        else
            die "no Debian '$suite' apt entry found to derive a deb-src entry from"
        fi
    fi
    log "deb-src: apt-get update"
    apt-get update -qq
}

# Build cnitool offline (GOPATH mode) from the Debian source package (recipe section 2.1).
build_cnitool() {
    if [[ -x $CNITOOL ]]; then
        log "cnitool: cached at $CNITOOL"
        return
    fi
    ensure_deb_src
    local tmp srcdir
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    log "cnitool: fetching source package $SRC_PKG"
    (cd "$tmp" && apt-get source -qq "$SRC_PKG" >/dev/null 2>"$tmp/source.log") ||
        { cat "$tmp/source.log" >&2; die "apt-get source $SRC_PKG failed"; }
    srcdir=$(find "$tmp" -mindepth 2 -maxdepth 2 -type d -name cnitool -path "$tmp/$SRC_PKG-*" | head -n1)
    [[ -n $srcdir ]] || die "cnitool/ not found in the $SRC_PKG source package"
    mkdir -p "$tmp/gopath/src/cnitool" "$CACHE_DIR/bin"
    find "$srcdir" -maxdepth 1 -name '*.go' ! -name '*_test.go' -exec cp {} "$tmp/gopath/src/cnitool/" \;
    log "cnitool: building (GOPATH mode, GOPROXY=off)"
    (cd "$tmp/gopath/src/cnitool" &&
        GO111MODULE=off GOPROXY=off GOFLAGS='' GOPATH="$tmp/gopath:/usr/share/gocode" \
        GOCACHE="$tmp/gocache" go build -o "$CNITOOL.new" .)
    mv -f "$CNITOOL.new" "$CNITOOL"
    rm -rf "$tmp"
    trap - EXIT
    log "cnitool: built $CNITOOL"
}

start=$SECONDS
if [[ $mode == demo ]]; then
    install_packages "${DEMO_PKGS[@]}"
else
    install_packages "${FULL_PKGS[@]}"
    build_cnitool
fi
log "done ($mode, $((SECONDS - start)) s)"
