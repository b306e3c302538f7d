#!/usr/bin/env bash
# A development PKI for the Tessera chart, with openssl.
#
#   helm/dev-pki.sh --dir pki [--storage-nodes 3] [--namespace tessera]
#                   [--trust-domain tessera.local] [--days 365] [--force]
#
# Writes the same layout as `tessera pki init --dir pki` (DIR/ca.crt and
# DIR/<name>.crt + DIR/<name>.key, keys mode 0600), plus DIR/ca.key, for:
#   services  gateway keyserver watermark segmentation storage-1..N
#             URI SAN spiffe://<trust-domain>/service/<name>
#             DNS SANs <name>, <name>.<ns>.svc, <name>.<ns>.svc.cluster.local
#             (with --namespace), localhost; IP SAN 127.0.0.1
#             serverAuth + clientAuth
#   users     owner clinician clinician2 researcher outsider
#             URI SAN spiffe://<trust-domain>/user/<name>, clientAuth
#
# Why not `tessera pki init` alone: its service certificates name only
# localhost and 127.0.0.1 (loopback development), but in the cluster clients
# dial `<service>:<port>` and check that the server certificate names
# <service>. Keep DIR/ca.key offline; production deployments use their own CA
# (e.g. cert-manager) with the same SANs, see helm/README.md.
set -euo pipefail

dir='' nodes=3 ns='' td=tessera.local days=365 force=0
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=${2:?}; shift 2 ;;
    --storage-nodes) nodes=${2:?}; shift 2 ;;
    --namespace) ns=${2:?}; shift 2 ;;
    --trust-domain) td=${2:?}; shift 2 ;;
    --days) days=${2:?}; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$dir" ] || usage
case "$nodes" in ''|*[!0-9]*) echo "--storage-nodes: a number 2..16" >&2; exit 2 ;; esac
if [ "$nodes" -lt 2 ] || [ "$nodes" -gt 16 ]; then echo "--storage-nodes: 2..16" >&2; exit 2; fi
[[ "$td" =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] || { echo "--trust-domain: [a-z0-9.-]" >&2; exit 2; }
[[ -z "$ns" || "$ns" =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || { echo "--namespace: not a namespace name" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
if [ -e "$dir/ca.crt" ] && [ "$force" -eq 0 ]; then
  echo "$dir/ca.crt exists; refusing to overwrite a PKI (use another --dir or --force)" >&2
  exit 1
fi
mkdir -p "$dir"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ECDSA P-256 keys in PKCS#8 (what rustls reads).
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

newkey "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
  -subj "/O=Tessera development/CN=Tessera dev CA ($td)" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
  -addext "subjectKeyIdentifier=hash" \
  -out "$work/ca.crt"

# issue NAME KIND: DIR/NAME.key + DIR/NAME.crt signed by the CA.
issue() {
  local name=$1 kind=$2 san eku
  san="URI:spiffe://$td/$kind/$name"
  eku=clientAuth
  if [ "$kind" = service ]; then
    san="$san,DNS:$name"
    [ -z "$ns" ] || san="$san,DNS:$name.$ns.svc,DNS:$name.$ns.svc.cluster.local"
    san="$san,DNS:localhost,IP:127.0.0.1"
    eku=serverAuth,clientAuth
  fi
  newkey "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "/O=Tessera development/CN=$name" -out "$work/$name.csr"
  cat >"$work/$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=$eku
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
  openssl x509 -req -in "$work/$name.csr" -CA "$work/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days" \
    -extfile "$work/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  chmod 644 "$dir/$name.crt"
  printf '%-8s %-13s %s\n' "$kind" "$name" "$san"
}

services=(gateway keyserver watermark segmentation)
for i in $(seq 1 "$nodes"); do services+=("storage-$i"); done
for s in "${services[@]}"; do issue "$s" service; done
for u in owner clinician clinician2 researcher outsider; do issue "$u" user; done
# The CA certificate last: its presence marks a complete PKI.
install -m 644 "$work/ca.crt" "$dir/ca.crt"
echo "CA       $dir/ca.crt (key $dir/ca.key: keep it offline)"
