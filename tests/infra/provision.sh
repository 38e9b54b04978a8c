#!/usr/bin/env bash
# Provision a Debian 12 (bookworm) machine, as root, for the meta-cni demo and tests.
#
#   provision.sh          full: all packages (podman, Go, etcd, ...) + cnitool and kube-apiserver built offline
#   provision.sh --demo   only what `make demo` needs (reference plugins + net tools)
#
# Idempotent: apt is skipped when every package is installed, and each build is skipped
# when its cached binary exists, so a second run takes well under a second.
# cnitool and kube-apiserver are cached in ${META_CNI_CACHE:-$HOME/.cache/meta-cni}/bin/.
# Recipes: /work/shared/reference/test-infrastructure.md sections 1, 2.1, 3, 4, 5.1-5.3.
set -euo pipefail

DEMO_PKGS=(containernetworking-plugins iproute2 iptables iputils-ping util-linux procps python3 python3-venv)
# The real API server lane (tests/kube, test-infrastructure.md §5): Debian etcd, the build deps of the
# `kubernetes` source package (make, rsync, jq), and the newer reflect2/json-iterator swapped into its
# vendor/ tree; openssl makes the service-account key pair.
KUBE_PKGS=(etcd-server etcd-client make rsync jq openssl
           golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
# kubectl is handy against the test cluster, but any kubectl will do: Debian's kubernetes-client would
# collide with one that is already there from elsewhere (e.g. the google-cloud-sdk `kubectl` package).
command -v kubectl >/dev/null 2>&1 || KUBE_PKGS+=(kubernetes-client)
# qemu-system-x86 + linux-image-amd64 (+ kmod for modprobe): the full-kernel lane (tests/kernel), which boots
# the Debian kernel under QEMU/TCG with virtme-ng for ipvlan, 802.1q vlan and dummy (test-infrastructure.md §4).
FULL_PKGS=("${DEMO_PKGS[@]}" podman runc busybox-static catatonit golang-go
           golang-github-appc-cni-dev dpkg-dev ca-certificates
           qemu-system-x86 linux-image-amd64 kmod nftables
           "${KUBE_PKGS[@]}")
CACHE_DIR=${META_CNI_CACHE:-${HOME:-/root}/.cache/meta-cni}
CNITOOL=$CACHE_DIR/bin/cnitool
KUBE_APISERVER=$CACHE_DIR/bin/kube-apiserver
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

# Make `apt-get source $1` possible: add a deb-src entry copied from the
# existing Debian entry (deb822 or one-line format), then apt-get update.
ensure_deb_src() {
    local pkg=$1
    if apt-cache showsrc "$pkg" 2>/dev/null | grep -q '^Package:'; then
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
    apt-cache showsrc "$pkg" 2>/dev/null | grep -q '^Package:' ||
        die "source package $pkg not available even with a deb-src entry"
}

# Fetch Debian source package $1 into directory $2 (apt-get source; quiet unless it fails).
fetch_source() {
    local pkg=$1 dir=$2
    log "$pkg: fetching source package"
    (cd "$dir" && apt-get source -qq "$pkg" >/dev/null 2>"$dir/source.log") ||
        { cat "$dir/source.log" >&2; die "apt-get source $pkg failed"; }
}

# Build cnitool offline (GOPATH mode) from the Debian source package (recipe section 2.1).
build_cnitool() {
    if [[ -x $CNITOOL ]]; then
        log "cnitool: cached at $CNITOOL"
        return
    fi
    local pkg=golang-github-appc-cni tmp srcdir
    ensure_deb_src "$pkg"
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    fetch_source "$pkg" "$tmp"
    srcdir=$(find "$tmp" -mindepth 2 -maxdepth 2 -type d -name cnitool -path "$tmp/$pkg-*" | head -n1)
    [[ -n $srcdir ]] || die "cnitool/ not found in the $pkg source package"
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

# rm -rf that also copes with the read-only directories Go leaves in its caches.
remove_tree() {
    chmod -R u+w "$1" 2>/dev/null || true
    rm -rf "$1"
}

# Since Go 1.16 reflect.Zero shares one buffer, so the vendored OpenAPI type validator's zero-value test
# (DeepEqual of two reflect.Values) is true for a decoded "" and an empty string in a custom resource is
# rejected as null ("spec.config in body must be of type string: \"null\"", kubernetes#99804). Apply
# the upstream fix (kube-openapi#230, in 1.21): only nil counts as null.
patch_zero_value_check() {
    local srcdir=$1 f patched=0
    local old='if data == nil || reflect\.DeepEqual(reflect\.Zero(reflect\.TypeOf(data)), reflect\.ValueOf(data)) {'
    for f in vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go vendor/github.com/go-openapi/validate/type.go; do
        [[ -f $srcdir/$f ]] && grep -q "$old" "$srcdir/$f" || continue
        sed -i "s/$old/if data == nil {/" "$srcdir/$f"
        ! grep -q 'reflect\.DeepEqual(reflect\.Zero' "$srcdir/$f" || die "could not patch $f"
        patched=$((patched + 1))
    done
    ((patched)) || die "OpenAPI zero-value check not found in the kubernetes sources (recipe out of date?)"
}

# Build kube-apiserver offline from Debian's `kubernetes` source package (recipe section 5.1).
# The whole tree, with its ~1 GB build cache (_output/local) and Go cache, lives in a temp dir
# that is removed afterwards; only the binary is kept.
build_kube_apiserver() {
    if [[ -x $KUBE_APISERVER ]]; then
        log "kube-apiserver: cached at $KUBE_APISERVER"
        return
    fi
    local pkg=kubernetes tmp srcdir d version gocode=/usr/share/gocode/src/github.com t0=$SECONDS
    ensure_deb_src "$pkg"
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "remove_tree '$tmp'" EXIT
    fetch_source "$pkg" "$tmp"
    srcdir=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name "$pkg-*" | head -n1)
    [[ -n $srcdir && -d $srcdir/vendor ]] || die "vendor/ not found in the $pkg source package"
    # The vendored reflect2 1.0.1 / json-iterator 1.1.10 panic under Go >= 1.18 on every request-body
    # decode (nil deref in reflect2.(*frozenConfig).Type2); Debian's newer copies are API compatible.
    for d in modern-go/reflect2 json-iterator/go; do
        [[ -d $gocode/$d ]] || die "$gocode/$d missing (golang-github-* -dev packages)"
        rm -rf "${srcdir:?}/vendor/github.com/$d"
        mkdir -p "$srcdir/vendor/github.com/$d"
        find "$gocode/$d" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
            -exec cp {} "$srcdir/vendor/github.com/$d/" \;
    done
    patch_zero_value_check "$srcdir"
    mkdir -p "$tmp/home" "$tmp/gotmp" "$CACHE_DIR/bin"
    log "kube-apiserver: building (GOPATH mode, GOPROXY=off; ~200 s on 2 idle cores)"
    # make's own GOPATH/codegen is needed: a plain `go build` lacks zz_generated.openapi.go.
    # HOME and GOTMPDIR point into $tmp so that Go's build cache and work dirs go away with it.
    (cd "$srcdir" && HOME="$tmp/home" GOTMPDIR="$tmp/gotmp" GOPROXY=off GOFLAGS='' make WHAT=cmd/kube-apiserver \
        >"$tmp/build.log" 2>&1) || { tail -n 40 "$tmp/build.log" >&2; die "kube-apiserver build failed"; }
    version=$("$srcdir/_output/bin/kube-apiserver" --version) && [[ $version == 'Kubernetes v'* ]] ||
        die "built kube-apiserver does not report a version"
    cp "$srcdir/_output/bin/kube-apiserver" "$KUBE_APISERVER.new"
    mv -f "$KUBE_APISERVER.new" "$KUBE_APISERVER"
    remove_tree "$tmp"
    trap - EXIT
    log "kube-apiserver: built $KUBE_APISERVER ($version, $((SECONDS - t0)) s)"
}

start=$SECONDS
if [[ $mode == demo ]]; then
    install_packages "${DEMO_PKGS[@]}"
else
    install_packages "${FULL_PKGS[@]}"
    build_cnitool
    build_kube_apiserver
fi
log "done ($mode, $((SECONDS - start)) s)"
