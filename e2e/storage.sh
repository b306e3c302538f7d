#!/usr/bin/env bash
# e2e: a real storage node on loopback, called with grpcurl over mutual TLS.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

SVC=tessera.storage.v1.StorageNode
cat >"$E2E_TMP/node.toml" <<TOML
node_id = "storage-1"
data_dir = "$E2E_TMP/data"
capacity_bytes = 67108864
max_object_bytes = 16777216

[server]
listen = "127.0.0.1:0"

[server.tls]
ca = "$PKI/ca.crt"
cert = "$PKI/storage-1.crt"
key = "$PKI/storage-1.key"

[telemetry]
log = "info"

[admin]
listen = "127.0.0.1:0"
TOML

start_service storage-node "$E2E_TMP/node.toml"
ADDR=$SERVICE_ADDR
echo "storage-node on $ADDR"
wait_healthy "$ADDR" gateway "$SVC"

# --- reflection and health ---
lists_services() {
  local out
  out=$(gc gateway "$ADDR" list)
  printf '%s\n' "$out" | grep -qx "$SVC" &&
    printf '%s\n' "$out" | grep -qx grpc.health.v1.Health
}
check "reflection lists the storage and health services" lists_services
describes() { gc gateway "$ADDR" describe "$SVC" | grep -q 'rpc Put'; }
check "reflection describes StorageNode without proto files" describes
health_serving() {
  gc "$1" "$ADDR" "${@:2}" -d "{\"service\":\"$SVC\"}" -- grpc.health.v1.Health/Check | grep -q '"SERVING"'
}
check "health: SERVING" health_serving gateway
check "health needs no role (outsider)" health_serving outsider "${NO_REFLECTION[@]}"

# --- put and get an object ---
BODY="$E2E_TMP/body.bin"
head -c 300000 /dev/urandom >"$BODY"
SHA_HEX=$(sha256sum "$BODY" | cut -d' ' -f1)
SHA_B64=$(python3 -c 'import base64,sys; print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode())' "$SHA_HEX")
SIZE=$(stat -c %s "$BODY")
put_object() {
  local id=$1
  {
    printf '{"header":{"object_id":"%s","size":"%s","sha256":"%s"}}\n' "$id" "$SIZE" "$SHA_B64"
    # Two chunk messages.
    printf '{"chunk":"%s"}\n' "$(head -c 150000 "$BODY" | base64 -w0)"
    printf '{"chunk":"%s"}\n' "$(tail -c +150001 "$BODY" | base64 -w0)"
  } | gc gateway "$ADDR" -d @ -- "$SVC/Put"
}
put_created() { put_object e2e-object-1 | grep -q '"created": true'; }
check "put streams an object in two chunks" put_created
put_again() {
  local out
  out=$(put_object e2e-object-1)
  ! grep -q '"created": true' <<<"$out"
}
check "put is idempotent (same bytes: created=false)" put_again
get_matches() {
  gc gateway "$ADDR" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Get" >"$E2E_TMP/get.json"
  # First message: the info with the node's SHA-256; then the chunks.
  grep -q "\"sha256\": \"$SHA_B64\"" "$E2E_TMP/get.json"
  python3 - "$E2E_TMP/get.json" "$BODY" <<'PY'
import base64, json, sys
text = open(sys.argv[1]).read()
dec = json.JSONDecoder(); pos = 0; chunks = []
while pos < len(text):
    while pos < len(text) and text[pos].isspace(): pos += 1
    if pos >= len(text): break
    obj, pos = dec.raw_decode(text, pos)
    if "chunk" in obj: chunks.append(base64.b64decode(obj["chunk"]))
data = b"".join(chunks)
sys.exit(0 if data == open(sys.argv[2], "rb").read() else 1)
PY
}
check "get streams the same bytes back" get_matches
stat_ok() { gc gateway "$ADDR" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Stat" | grep -q "\"size\": \"$SIZE\""; }
check "stat reports the size" stat_ok
list_ok() { gc gateway "$ADDR" -d '{"prefix":"e2e-"}' -- "$SVC/List" | grep -q '"objectId": "e2e-object-1"'; }
check "list finds it" list_ok
info_ok() { gc admin "$ADDR" -d '{}' -- "$SVC/NodeInfo" | grep -q '"nodeId": "storage-1"'; }
check "node info names the node" info_ok

# --- bad input ---
check "unknown object: NotFound" expect_code NotFound gc gateway "$ADDR" -d '{"object_id":"missing"}' -- "$SVC/Stat"
check "malformed id: InvalidArgument" expect_code InvalidArgument gc gateway "$ADDR" -d '{"object_id":"../etc/passwd"}' -- "$SVC/Get"
too_big() {
  printf '{"header":{"object_id":"too-big","size":"999999999"}}' | gc gateway "$ADDR" -d @ -- "$SVC/Put"
}
check "object over the node's limit: ResourceExhausted" expect_code ResourceExhausted too_big
conflict() {
  printf '{"header":{"object_id":"e2e-object-1","size":"1"}}{"chunk":"AA=="}' | gc gateway "$ADDR" -d @ -- "$SVC/Put"
}
check "different bytes under an existing id: AlreadyExists" expect_code AlreadyExists conflict
oversized_message() {
  # One 5 MiB message: over the 4 MiB limit.
  head -c $((5 * 1024 * 1024)) /dev/zero | base64 -w0 >"$E2E_TMP/big.b64"
  { printf '{"header":{"object_id":"big-msg","size":"5242880"}}{"chunk":"'; cat "$E2E_TMP/big.b64"; printf '"}'; } |
    gc gateway "$ADDR" -max-msg-sz 67108864 -d @ -- "$SVC/Put"
}
check "a message over 4 MiB: ResourceExhausted" expect_code ResourceExhausted oversized_message

# --- who may not call ---
check "outsider (no role): PermissionDenied" expect_code PermissionDenied gc outsider "$ADDR" "${NO_REFLECTION[@]}" -d '{}' -- "$SVC/NodeInfo"
check "outsider cannot read an object" expect_code PermissionDenied gc outsider "$ADDR" "${NO_REFLECTION[@]}" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Get"
check "a user (owner) may not write to a storage node" expect_code PermissionDenied gc owner "$ADDR" "${NO_REFLECTION[@]}" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Delete"
check "a user (clinician) may not list a storage node" expect_code PermissionDenied gc clinician "$ADDR" "${NO_REFLECTION[@]}" -d '{}' -- "$SVC/List"
check "a user (clinician) may not read a share (users fetch through the gateway)" expect_code PermissionDenied gc clinician "$ADDR" "${NO_REFLECTION[@]}" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Get"
check "a user (clinician) may not stat a share" expect_code PermissionDenied gc clinician "$ADDR" "${NO_REFLECTION[@]}" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Stat"
# No cloud acts on another: another node's identity may do nothing here.
for m in Delete Get Stat; do
  check "storage-2's identity may not call $m on storage-1" expect_code PermissionDenied gc storage-2 "$ADDR" "${NO_REFLECTION[@]}" -d '{"object_id":"e2e-object-1"}' -- "$SVC/$m"
done
for m in List NodeInfo; do
  check "storage-2's identity may not call $m on storage-1" expect_code PermissionDenied gc storage-2 "$ADDR" "${NO_REFLECTION[@]}" -d '{}' -- "$SVC/$m"
done
evil_put() { printf '{"header":{"object_id":"e2e-evil","size":"1"}}{"chunk":"AA=="}' | gc storage-2 "$ADDR" "${NO_REFLECTION[@]}" -d @ -- "$SVC/Put"; }
check "storage-2's identity may not Put on storage-1" expect_code PermissionDenied evil_put
check "outsider may not use reflection" expect_code PermissionDenied gc outsider "$ADDR" list
check "plaintext connection refused" expect_refused grpcurl -max-time 5 -plaintext -d "{\"service\":\"$SVC\"}" "$ADDR" grpc.health.v1.Health/Check
check "TLS without a client certificate refused" expect_refused grpcurl -max-time 5 -cacert "$PKI/ca.crt" -d "{\"service\":\"$SVC\"}" "$ADDR" grpc.health.v1.Health/Check
"$TESSERA_BIN_DIR/tessera" pki init --dir "$E2E_TMP/foreign" >/dev/null
check "certificate from another CA refused" expect_refused grpcurl -max-time 5 -cacert "$PKI/ca.crt" \
  -cert "$E2E_TMP/foreign/gateway.crt" -key "$E2E_TMP/foreign/gateway.key" \
  -d "{\"service\":\"$SVC\"}" "$ADDR" grpc.health.v1.Health/Check

# --- region-wise processing (Process): one 4x4 8-bit fragment, median ---
process_input() {
  printf '{"start":{"operation":"OPERATION_MEDIAN","fragment":{"region":0,"spec":{"width":4,"height":4,"bits_allocated":8,"bits_stored":8,"channels":1},"block_size":4,"halo":1,"block_count":1,"tile_count":1,"sample_count":"16"}}}\n'
  printf '{"blocks":{"blocks":[0]}}\n'
  printf '{"tile":{"core":{"width":4,"height":4},"rect":{"width":4,"height":4}}}\n'
  # A 4x4 ramp 0, 10, ..., 150.
  printf '{"samples":"%s"}\n' "$(python3 -c 'import base64; print(base64.b64encode(bytes(range(0, 160, 10))).decode())')"
}
describes_process() { gc gateway "$ADDR" describe "$SVC" | grep -q 'rpc Process ( stream .tessera.storage.v1.ProcessRequest ) returns ( stream .tessera.storage.v1.ProcessResponse )'; }
check "reflection describes the streaming Process" describes_process
processes() {
  process_input | gc gateway "$ADDR" -d @ -- "$SVC/Process" >"$E2E_TMP/process.json"
  grep -q '"tileCount": 1' "$E2E_TMP/process.json"
  # Replicate-border 3x3 median of the ramp, row-major.
  python3 - "$E2E_TMP/process.json" <<'PY'
import base64, json, sys
text = open(sys.argv[1]).read()
dec = json.JSONDecoder(); pos = 0; out = b""
while pos < len(text):
    while pos < len(text) and text[pos].isspace(): pos += 1
    if pos >= len(text): break
    obj, pos = dec.raw_decode(text, pos)
    if "samples" in obj: out += base64.b64decode(obj["samples"])
v = lambda x, y: 10 * (4 * min(max(y, 0), 3) + min(max(x, 0), 3))
want = bytes(sorted(v(x + i, y + j) for j in (-1, 0, 1) for i in (-1, 0, 1))[4] for y in range(4) for x in range(4))
sys.exit(0 if out == want else 1)
PY
}
check "the gateway has a fragment processed (median of a 4x4 ramp)" processes
start_only() { process_input | head -n 1 | gc gateway "$ADDR" -d @ -- "$SVC/Process"; }
check "Process with a start only: InvalidArgument" expect_code InvalidArgument start_only
process_as() { process_input | gc "$1" "$ADDR" -d @ -- "$SVC/Process"; }
check "another service (keyserver) may not Process: PermissionDenied" expect_code PermissionDenied process_as keyserver
no_objects_from_process() { gc admin "$ADDR" -d '{}' -- "$SVC/NodeInfo" | grep -q '"objectCount": "1"'; }
check "the object count is unchanged by Process" no_objects_from_process

# --- the admin listener (plain HTTP): metrics, liveness, readiness ---
ADMIN=$(sed -n 's/^admin=//p' "$E2E_TMP"/storage-node.0.out | head -n 1)
check "prints admin=ADDR after listening=ADDR ($ADMIN)" \
  bash -c '[ -n "$1" ] && head -n 1 "$2" | grep -q "^listening=" && sed -n 2p "$2" | grep -q "^admin="' _ "$ADMIN" "$E2E_TMP/storage-node.0.out"
check "/live: 200" curl -fsS -o /dev/null "http://$ADMIN/live"
check "/ready: 200 (database readable)" curl -fsS -o /dev/null "http://$ADMIN/ready"
metrics_counted() {
  local m
  m=$(curl -fsS "http://$ADMIN/metrics")
  printf '%s\n' "$m" | grep -q '^tessera_rpc_requests_total{method="tessera.storage.v1.StorageNode/Put",code="0"} [1-9]' &&
    printf '%s\n' "$m" | grep -q '^tessera_authz_denials_total{reason="no role of the caller is admitted",caller_kind="service"} [1-9]' &&
    printf '%s\n' "$m" | grep -q '^tessera_rpc_duration_seconds_bucket{le="+Inf",method="tessera.storage.v1.StorageNode/Put"} [1-9]' &&
    printf '%s\n' "$m" | grep -q '^tessera_storage_objects 1$'
}
check "/metrics: Put counted by code, the keyserver's refusal by reason, 1 object" metrics_counted
no_tls_on_admin() { ! curl -fsS -o /dev/null --max-time 5 "http://$ADDR/metrics"; }
check "the mTLS port serves no plain-HTTP metrics" no_tls_on_admin

# --- durability across a restart, delete ---
kill "$SERVICE_PID"; wait "$SERVICE_PID" 2>/dev/null || true
start_service storage-node "$E2E_TMP/node.toml"
ADDR=$SERVICE_ADDR
wait_healthy "$ADDR" gateway "$SVC"
check "object survives a restart" get_matches
deletes() { gc gateway "$ADDR" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Delete" | grep -q '"size"'; }
check "delete" deletes
check "deleted object: NotFound" expect_code NotFound gc gateway "$ADDR" -d '{"object_id":"e2e-object-1"}' -- "$SVC/Stat"

# --- bad config exits 64 ---
bad_config() {
  local rc=0
  TESSERA_STORAGE__NODE_ID="Not Valid" "$TESSERA_BIN_DIR/storage-node" --config "$E2E_TMP/node.toml" >/dev/null 2>&1 || rc=$?
  [ "$rc" -eq 64 ]
}
check "invalid config: exit code 64" bad_config

e2e_finish
