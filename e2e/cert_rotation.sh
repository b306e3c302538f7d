#!/usr/bin/env bash
# e2e: certificate renewal without a restart (issue 20). `tessera dev up` as
# a real process; a study stored and its key approved; then `tessera pki
# rotate` replaces the CA and every certificate under the running suite.
# Checked from outside with openssl s_client and grpcurl: every service
# presents a certificate of the new CA without having restarted, the study
# stored before is retrieved bit-identically afterwards, new stores work, and
# once `--finish` drops the old CA a certificate of the old CA is refused by
# every service.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
export TESSERA_DIR="$DIR"
P="$DIR/pki"

dev_up "$DIR"

# name=address for every gRPC service of the suite.
mapfile -t SERVICES < <(python3 - "$DIR/endpoints.toml" <<'PY'
import sys, tomllib
eps = tomllib.load(open(sys.argv[1], "rb"))["endpoints"]
for name in ("gateway", "keyserver", "watermark", "segmentation", "storage-1", "storage-2", "storage-3", "storage-4", "storage-5"):
    print(f"{name}={eps[name]}")
PY
)
[ "${#SERVICES[@]}" -eq 9 ] || { echo "expected 9 services in endpoints.toml, found ${#SERVICES[@]}" >&2; exit 1; }
GW=${SERVICES[0]#gateway=}

# presented ADDR: the SHA-256 fingerprint of the certificate ADDR shows a
# mutual-TLS client (as the clinician of the current PKI).
presented() {
  openssl s_client -connect "$1" -alpn h2 -servername localhost \
    -cert "$P/clinician.crt" -key "$P/clinician.key" -CAfile "$P/ca.crt" </dev/null 2>/dev/null |
    openssl x509 -noout -fingerprint -sha256 | cut -d= -f2
}

# issued_by_only CAFILE ADDR: ADDR's certificate verifies against CAFILE alone.
issued_by_only() {
  openssl s_client -connect "$2" -alpn h2 -servername localhost -verify_return_error \
    -cert "$P/clinician.crt" -key "$P/clinician.key" -CAfile "$1" </dev/null >/dev/null 2>&1
}

health_as() { # health_as DIR NAME ADDR: grpcurl health check with DIR/NAME's certificate
  local out
  out=$(grpcurl -max-time 10 -cacert "$1/ca.crt" -cert "$1/$2.crt" -key "$1/$2.key" \
    -d '{"service":""}' "$3" grpc.health.v1.Health/Check 2>&1) || { echo "$out"; return 1; }
  grep -q SERVING <<<"$out" || { echo "$out"; return 1; }
}

# --- before: a study stored and a key approved ---
python3 - "$E2E_TMP/slice.raw" <<'PY'
import struct, sys
open(sys.argv[1], "wb").write(b"".join(struct.pack("<H", (x * 37 + y * 11) % 4096) for y in range(80) for x in range(96)))
PY
STUDY=$("$T" store "$E2E_TMP/slice.raw" --raw 96,80,16,12 --roi 16,16,48,32 --as owner --owner owner \
  --attr patient_id=PID-ROT-1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["study"])')
check "a study is stored before the rotation" test "${STUDY:0:3}" = "st-"
RID=$("$T" request-key "$STUDY" --as clinician --why "rotation" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
check "the owner approves before the rotation" out_has "use(s) left" "$T" approve "$RID" --as owner --ttl 30m --uses 5

declare -A BEFORE
for s in "${SERVICES[@]}"; do
  BEFORE[${s%%=*}]=$(presented "${s#*=}")
done
every_fingerprint() {
  local name
  for name in "${!BEFORE[@]}"; do
    grep -qE '^([0-9A-F]{2}:){31}[0-9A-F]{2}$' <<<"${BEFORE[$name]}" || { echo "$name: '${BEFORE[$name]}'"; return 1; }
  done
  [ "${#BEFORE[@]}" -eq 9 ]
}
check "every service presents a certificate before the rotation" every_fingerprint
# A client that misses the rotation: it keeps the old CA's certificate
# (below it trusts both CAs, so a refusal is the server's).
OLD="$E2E_TMP/old"
mkdir -p "$OLD"
cp "$P/clinician.crt" "$P/clinician.key" "$OLD/"

# --- the rotation, under the running suite ---
check "tessera pki rotate trusts a new CA, then reissues every certificate" \
  out_has "certificates reissued by the new CA" "$T" pki rotate --dir "$P" --settle 7
check "ca.crt holds the old and the new CA" \
  bash -c "[ \"\$(grep -c 'BEGIN CERTIFICATE' '$P/ca.crt')\" -eq 2 ]"
awk '/BEGIN CERTIFICATE/{n++} n==2' "$P/ca.crt" >"$E2E_TMP/new-ca.crt"
cp "$P/ca.crt" "$OLD/ca.crt"

# Each service picks the new certificate up on its own (tls_reload_secs = 5).
all_new() {
  local s name
  for s in "${SERVICES[@]}"; do
    name=${s%%=*}
    issued_by_only "$E2E_TMP/new-ca.crt" "${s#*=}" || { echo "$name still presents the old CA's certificate"; return 1; }
    [ "$(presented "${s#*=}")" != "${BEFORE[$name]}" ] || { echo "$name presents the same certificate"; return 1; }
  done
}
for _ in $(seq 1 60); do all_new >/dev/null 2>&1 && break; sleep 0.5; done
check "every service presents a certificate of the new CA, without a restart" all_new
check "dev up (every service) is still the same process" kill -0 "$DEV_PID"
GW_ADMIN=$(sed -n 's/^  gateway .*admin (metrics, ready) \(http[^ ]*\).*/\1/p' "$E2E_TMP/devup.out")
tls_metrics_after_reload() {
  local body
  body=$(curl -sf "$GW_ADMIN/metrics") || { echo "no /metrics at '$GW_ADMIN'"; return 1; }
  grep -qE '^tessera_tls_generation [2-9]' <<<"$body" || { grep tessera_tls <<<"$body"; return 1; }
  grep -qE '^tessera_tls_cert_not_after_seconds [1-9][0-9]{9,}$' <<<"$body" || { grep tessera_tls <<<"$body"; return 1; }
}
check "the gateway's /metrics counts the reload and shows the new certificate's expiry" tls_metrics_after_reload
check "during the rotation the old CA's certificates are still accepted" \
  health_as "$OLD" clinician "$GW"

# --- after: the study from before, and a new one ---
check "the study stored before the rotation is retrieved bit-identically" \
  bash -c "'$T' retrieve '$STUDY' --request '$RID' --as clinician -o '$E2E_TMP/got.raw' >/dev/null && cmp '$E2E_TMP/got.raw' '$E2E_TMP/slice.raw'"
STUDY2=$("$T" store "$E2E_TMP/slice.raw" --raw 96,80,16,12 --roi 16,16,48,32 --as owner --owner owner \
  --attr patient_id=PID-ROT-2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["study"])')
check "a study is stored after the rotation" test "${STUDY2:0:3}" = "st-"
check "verify after the rotation: intact" out_has intact "$T" verify "$STUDY2" --as owner

# --- finish: the old CA is dropped ---
check "tessera pki rotate --finish drops the old CA" \
  out_has "the new CA alone is trusted now (1 old CA dropped)" "$T" pki rotate --dir "$P" --finish
old_refused_everywhere() {
  local s
  for s in "${SERVICES[@]}"; do
    if health_as "$OLD" clinician "${s#*=}" >/dev/null 2>&1; then
      echo "${s%%=*} still accepts the old CA's certificate"
      return 1
    fi
  done
}
for _ in $(seq 1 60); do old_refused_everywhere >/dev/null 2>&1 && break; sleep 0.5; done
check "after --finish every service refuses a certificate of the old CA" old_refused_everywhere
check "the new certificates still work at every service" \
  bash -c "$(declare -f health_as); for s in ${SERVICES[*]}; do health_as '$P' clinician \"\${s#*=}\" || exit 1; done"
check "retrieve after --finish: identical bytes" \
  bash -c "'$T' retrieve '$STUDY' --request '$RID' --as clinician -o '$E2E_TMP/got2.raw' >/dev/null && cmp '$E2E_TMP/got2.raw' '$E2E_TMP/slice.raw'"

e2e_finish
