#!/bin/sh
# Make a private CA and a serving certificate for the meta-cni admission webhook (the path without
# cert-manager; see README.md in this directory).
#
#   webhook-certs.sh OUTDIR SAN [SAN...]
#   e.g. webhook-certs.sh ./certs DNS:meta-cni-webhook.meta-cni.svc
#
# Writes OUTDIR/ca.crt (the caBundle), OUTDIR/ca.key (keep it offline, or delete it and rerun to rotate),
# OUTDIR/tls.crt and OUTDIR/tls.key (the kubernetes.io/tls Secret). The API server verifies the webhook
# by subjectAltName only (Go ignores the CN), so every name it dials must be given as DNS:... or IP:....
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 OUTDIR SAN [SAN...]   (SAN: DNS:name or IP:address)" >&2
    exit 2
fi
out=$1
shift
sans=""
for san in "$@"; do
    case $san in
        DNS:?*|IP:?*) sans="${sans:+$sans,}$san" ;;
        *) echo "$0: SAN must be DNS:name or IP:address, got '$san'" >&2; exit 2 ;;
    esac
done
first=${1#*:}

# openssl chatters on stderr even when it succeeds: show its output only when it fails.
quiet() {
    if ! log=$("$@" 2>&1); then
        printf '%s\n' "$log" >&2
        exit 1
    fi
}

mkdir -p "$out"
cd "$out"
umask 077
# P-256 keys: accepted by the Go TLS stack of the API server, and generated in milliseconds.
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
# shellcheck disable=SC2086
quiet openssl req -x509 $ec -keyout ca.key -out ca.crt -days 3650 -subj "/CN=meta-cni-webhook-ca"
# shellcheck disable=SC2086
quiet openssl req -new $ec -keyout tls.key -out tls.csr -subj "/CN=$first"
cat > tls.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
quiet openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 365 \
    -extfile tls.ext
rm -f tls.csr tls.ext ca.srl
chmod 0644 ca.crt tls.crt
echo "wrote $out/ca.crt $out/ca.key $out/tls.crt $out/tls.key for $sans"
