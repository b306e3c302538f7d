#!/usr/bin/env bash
# e2e: the real segmentation service on loopback. The gateway segments a
# small 8-bit image with grpcurl (streams as JSON, bytes as base64) and gets
# the summary (N, region map) and the fragments, whose block lists cover every
# block exactly once. Other identities are refused.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

SVC=tessera.segmentation.v1.Segmentation

cat >"$E2E_TMP/segmentation.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[server.tls]
ca = "$PKI/ca.crt"
cert = "$PKI/segmentation.crt"
key = "$PKI/segmentation.key"
[segmentation]
max_image_bytes = 1048576
[telemetry]
log = "info"
TOML

# --- a bad config exits 64 ---
bad_config() {
  local rc=0
  TESSERA_SEGMENTATION__SEGMENTATION__ALLOWED_CALLERS='[]' \
    "$TESSERA_BIN_DIR/segmentation" --config "$E2E_TMP/segmentation.toml" >/dev/null 2>&1 || rc=$?
  [ "$rc" -eq 64 ]
}
check "an empty allowed_callers list is a config error (exit 64)" bad_config

start_service segmentation "$E2E_TMP/segmentation.toml"
ADDR=$SERVICE_ADDR
echo "segmentation on $ADDR"
wait_healthy "$ADDR" gateway "$SVC"

# --- reflection and health ---
lists_services() {
  local out
  out=$(gc gateway "$ADDR" list)
  grep -qx "$SVC" <<<"$out" && grep -qx grpc.health.v1.Health <<<"$out"
}
check "reflection lists the segmentation and health services" lists_services
describes() { gc gateway "$ADDR" describe "$SVC" | grep -q 'rpc Segment ( stream'; }
check "reflection describes the streaming Segment" describes
SEG_NO_REFLECTION=(-import-path "$E2E_DIR/../proto" -import-path "$E2E_DIR/proto"
  -proto tessera/segmentation/v1/segmentation.proto -proto grpc/health/v1/health.proto)
health_serving() {
  gc "$1" "$ADDR" "${@:2}" -d "{\"service\":\"$SVC\"}" -- grpc.health.v1.Health/Check | grep -q '"SERVING"'
}
check "health: SERVING" health_serving gateway
check "health needs no role (outsider)" health_serving outsider "${SEG_NO_REFLECTION[@]}"

# --- segment a 64x64 8-bit image (a bright disc with noise on a dark ramp) ---
python3 -c '
import random, sys
random.seed(7)
px = bytearray()
for y in range(64):
    for x in range(64):
        v = x // 2 + random.randint(0, 3)
        if (x - 32) ** 2 + (y - 30) ** 2 < 300: v = 120 + random.randint(0, 120)
        px.append(min(v, 255))
sys.stdout.buffer.write(bytes(px))' >"$E2E_TMP/pixels.bin"
segment_input() { # segment_input BLOCK_SIZE
  printf '{"start":{"spec":{"width":64,"height":64,"bits_allocated":8,"bits_stored":8,"channels":1},"block_size":%s,"max_regions":3,"operation":"OPERATION_GAUSSIAN","seed":"1"}}\n' "$1"
  printf '{"pixels":"%s"}\n' "$(base64 -w0 "$E2E_TMP/pixels.bin")"
}
segment_ok() {
  segment_input 8 | gc gateway "$ADDR" -d @ -- "$SVC/Segment" >"$E2E_TMP/segment.json"
  python3 -c '
import base64, json, sys
d = json.JSONDecoder(); t = open(sys.argv[1]).read(); i = 0; msgs = []
while True:
    while i < len(t) and t[i].isspace(): i += 1
    if i >= len(t): break
    m, i = d.raw_decode(t, i); msgs.append(m)
s = msgs[0]["summary"]
n = s["regions"]; rm = s["regionMap"]; ids = base64.b64decode(rm["assignment"])
assert 1 <= n <= 3, n
assert (rm["cols"], rm["rows"]) == (8, 8) and len(ids) == 64 and max(ids) < n
frags = [m["fragment"] for m in msgs if "fragment" in m]
assert len(frags) == s["fragments"] == len(set(ids)), (len(frags), s["fragments"])
blocks = [b for m in msgs if "blocks" in m for b in m["blocks"].get("blocks", [])]
assert sorted(blocks) == list(range(64)), "each block exactly once"
samples = sum(len(base64.b64decode(m["samples"])) for m in msgs if "samples" in m)
assert samples == sum(int(f["sampleCount"]) for f in frags) >= 64 * 64
print("N=%d fragments=%d samples=%d" % (n, len(frags), samples))
' "$E2E_TMP/segment.json"
}
check "gateway segments a 64x64 image (summary, region map, fragments)" segment_ok

# --- refusals ---
segment_block_size() { segment_input "$1" | gc gateway "$ADDR" -d @ -- "$SVC/Segment"; }
check "block size 0: InvalidArgument" expect_code InvalidArgument segment_block_size 0
refused_as() { # refused_as WHO [flags]
  local who=$1
  shift
  segment_input 8 | gc "$who" "$ADDR" "$@" -d @ -- "$SVC/Segment"
}
check "outsider (no role) is refused" expect_code PermissionDenied refused_as outsider "${SEG_NO_REFLECTION[@]}"
check "storage-1 (service role, not an allowed caller) is refused" \
  expect_code PermissionDenied refused_as storage-1 "${SEG_NO_REFLECTION[@]}"
check "the owner (a user) is refused" expect_code PermissionDenied refused_as owner "${SEG_NO_REFLECTION[@]}"

e2e_finish
