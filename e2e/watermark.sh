#!/usr/bin/env bash
# e2e: a real keyserver and watermark service on loopback. The gateway
# registers a study at the keyserver, then protects a small image through the
# watermark service with grpcurl (streams as JSON, bytes as base64), verifies
# and restores it, and sees one changed share byte named. Other identities
# are refused.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

SVC=tessera.watermark.v1.Watermark
KS=tessera.keyserver.v1.KeyServer
OWNER=spiffe://tessera.local/user/owner
KEK="$E2E_TMP/keyserver.kek"
head -c 32 /dev/urandom >"$KEK"
chmod 600 "$KEK"

cat >"$E2E_TMP/keyserver.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[server.tls]
ca = "$PKI/ca.crt"
cert = "$PKI/keyserver.crt"
key = "$PKI/keyserver.key"
[keyserver]
db_path = "$E2E_TMP/keyserver.redb"
kek_file = "$KEK"
TOML
start_service keyserver "$E2E_TMP/keyserver.toml"
KS_ADDR=$SERVICE_ADDR
wait_healthy "$KS_ADDR" gateway "$KS"

cat >"$E2E_TMP/watermark.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[server.tls]
ca = "$PKI/ca.crt"
cert = "$PKI/watermark.crt"
key = "$PKI/watermark.key"
[keyserver]
address = "$KS_ADDR"
[keyserver.tls]
ca = "$PKI/ca.crt"
cert = "$PKI/watermark.crt"
key = "$PKI/watermark.key"
[telemetry]
log = "info"
TOML
start_service watermark "$E2E_TMP/watermark.toml"
ADDR=$SERVICE_ADDR
echo "keyserver on $KS_ADDR, watermark on $ADDR"
wait_healthy "$ADDR" gateway "$SVC"

# --- a bad config exits 64 ---
bad_config() {
  local rc=0
  TESSERA_WATERMARK__WATERMARK__ALLOWED_CALLERS='[]' \
    "$TESSERA_BIN_DIR/watermark" --config "$E2E_TMP/watermark.toml" >/dev/null 2>&1 || rc=$?
  [ "$rc" -eq 64 ]
}
check "an empty allowed_callers list is a config error (exit 64)" bad_config

# --- reflection and health ---
lists_services() {
  local out
  out=$(gc gateway "$ADDR" list)
  grep -qx "$SVC" <<<"$out" && grep -qx grpc.health.v1.Health <<<"$out"
}
check "reflection lists the watermark and health services" lists_services
describes() { gc gateway "$ADDR" describe "$SVC" | grep -q 'rpc Protect ( stream'; }
check "reflection describes the streaming Protect" describes
WM_NO_REFLECTION=(-import-path "$E2E_DIR/../proto" -import-path "$E2E_DIR/proto"
  -proto tessera/watermark/v1/watermark.proto -proto grpc/health/v1/health.proto)
health_serving() {
  gc "$1" "$ADDR" "${@:2}" -d "{\"service\":\"$SVC\"}" -- grpc.health.v1.Health/Check | grep -q '"SERVING"'
}
check "health: SERVING" health_serving gateway
check "health needs no role (outsider)" health_serving outsider "${WM_NO_REFLECTION[@]}"

# --- register a study, protect a 32x32 16-bit image ---
ATTRS='[{"name":"patient_id","value":"P-E2E"},{"name":"birth_date","value":"19700101"}]'
STUDY=$(gc gateway "$KS_ADDR" -d "{\"owner\":\"$OWNER\",\"attributes\":$ATTRS}" -- "$KS/RegisterStudy" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["studyId"])')
echo "study $STUDY"
head -c 2048 /dev/urandom | python3 -c '
import sys
b = bytearray(sys.stdin.buffer.read())
for i in range(1, len(b), 2): b[i] &= 0x0f   # 12 stored bits
sys.stdout.buffer.write(bytes(b))' >"$E2E_TMP/pixels.bin"
PIXELS_B64=$(base64 -w0 "$E2E_TMP/pixels.bin")
SPEC='{"width":32,"height":32,"bits_allocated":16,"bits_stored":12,"channels":1}'
protect_input() { # protect_input ATTRS
  printf '{"start":{"study":{"study_id":"%s","attributes":%s},"object_id":"e2e-1","spec":%s,"roi":{"x":4,"y":4,"width":20,"height":20}}}\n' \
    "$STUDY" "$1" "$SPEC"
  printf '{"pixels":"%s"}\n' "$PIXELS_B64"
}
# split_protect: grpcurl's JSON stream -> header.json, share1.b64, share2.b64
split_protect() {
  python3 -c '
import base64, json, sys
d = json.JSONDecoder(); t = sys.stdin.read(); i = 0; shares = {1: b"", 2: b""}
while True:
    while i < len(t) and t[i].isspace(): i += 1
    if i >= len(t): break
    m, i = d.raw_decode(t, i)
    if "header" in m: open(sys.argv[1] + "/header.json", "w").write(m["header"]["headerJson"])
    else: shares[m["share"]["share"]] += base64.b64decode(m["share"]["data"])
for k, v in shares.items(): open(sys.argv[1] + "/share%d.bin" % k, "wb").write(v)
' "$E2E_TMP"
}
protect_ok() {
  protect_input "$ATTRS" | gc gateway "$ADDR" -d @ -- "$SVC/Protect" | split_protect &&
    [ -s "$E2E_TMP/header.json" ] && [ -s "$E2E_TMP/share1.bin" ] && [ -s "$E2E_TMP/share2.bin" ]
}
check "gateway protects an image (header, then share 1 and share 2 chunks)" protect_ok

open_input() { # open_input SHARE2_FILE: start + both shares as JSON messages
  python3 -c '
import base64, json, sys
h = open(sys.argv[1] + "/header.json").read()
print(json.dumps({"start": {"study": {"study_id": sys.argv[2], "attributes": json.loads(sys.argv[3])}, "header_json": h}}))
for n, f in ((1, sys.argv[1] + "/share1.bin"), (2, sys.argv[4])):
    print(json.dumps({"share": {"share": n, "data": base64.b64encode(open(f, "rb").read()).decode()}}))
' "$E2E_TMP" "$STUDY" "$ATTRS" "$1"
}
verify_intact() {
  open_input "$E2E_TMP/share2.bin" | gc gateway "$ADDR" -d @ -- "$SVC/Verify" | grep -q '"intact": true'
}
check "Verify: intact" verify_intact
restore_identical() {
  open_input "$E2E_TMP/share2.bin" | gc gateway "$ADDR" -d @ -- "$SVC/Restore" | python3 -c '
import base64, json, sys
d = json.JSONDecoder(); t = sys.stdin.read(); i = 0; px = b""; intact = False
while True:
    while i < len(t) and t[i].isspace(): i += 1
    if i >= len(t): break
    m, i = d.raw_decode(t, i)
    if "restored" in m: intact = m["restored"]["report"].get("intact", False)
    else: px += base64.b64decode(m["pixels"])
sys.exit(0 if intact and px == open(sys.argv[1], "rb").read() else 1)' "$E2E_TMP/pixels.bin"
}
check "Restore: bit-identical pixels" restore_identical
python3 -c '
import sys
b = bytearray(open(sys.argv[1], "rb").read()); b[len(b) // 2] ^= 1
open(sys.argv[2], "wb").write(bytes(b))' "$E2E_TMP/share2.bin" "$E2E_TMP/share2.bad"
verify_tampered() {
  local out
  out=$(open_input "$E2E_TMP/share2.bad" | gc gateway "$ADDR" -d @ -- "$SVC/Verify")
  grep -q '"tamperedTileCount": "1"' <<<"$out"
}
check "Verify: one changed byte of share 2 names one tile" verify_tampered

# --- refusals ---
protect_wrong_attrs() {
  protect_input '[{"name":"patient_id","value":"P-OTHER"},{"name":"birth_date","value":"19700101"}]' |
    gc gateway "$ADDR" -d @ -- "$SVC/Protect"
}
check "wrong attributes: PermissionDenied (from the keyserver)" expect_code PermissionDenied protect_wrong_attrs
refused_as() { # refused_as WHO [flags]
  local who=$1
  shift
  open_input "$E2E_TMP/share2.bin" | gc "$who" "$ADDR" "$@" -d @ -- "$SVC/Verify"
}
check "outsider (no role) is refused" expect_code PermissionDenied refused_as outsider "${WM_NO_REFLECTION[@]}"
check "storage-1 (service role, not an allowed caller) is refused" \
  expect_code PermissionDenied refused_as storage-1 "${WM_NO_REFLECTION[@]}"
check "the owner (a user) is refused" expect_code PermissionDenied refused_as owner "${WM_NO_REFLECTION[@]}"

e2e_finish
