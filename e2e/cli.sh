#!/usr/bin/env bash
# e2e: `tessera dev up` as a real process (the whole suite on loopback), then
# the `tessera` client commands as each user would run them: store,
# request-key, requests, approve, retrieve (through the gateway and --local),
# verify, process, deny, revoke, delete, audit. Exit statuses are checked
# (non-zero on every refusal); Ctrl-C stops the suite cleanly.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
export TESSERA_DIR="$DIR"

fails_with() { # fails_with PATTERN CMD...: CMD exits non-zero and says PATTERN
  local pat=$1 out
  shift
  if out=$("$@" 2>&1); then echo "expected a failure, got: $out"; return 1; fi
  grep -q -- "$pat" <<<"$out" || { echo "expected '$pat' in: $out"; return 1; }
}

# --- dev up: a real process, ports chosen by the OS ---
dev_up "$DIR"
check "dev up writes endpoints.toml for every service" \
  bash -c "for s in gateway keyserver watermark segmentation storage-1 storage-2 storage-3; do grep -q \"^\$s = \" '$DIR/endpoints.toml' || grep -q \"^\\\"\$s\\\" = \" '$DIR/endpoints.toml' || exit 1; done"
check "dev up made the PKI" test -f "$DIR/pki/ca.crt" -a -f "$DIR/pki/clinician.key"
check "dev up writes the identity every service must present" \
  grep -q '^keyserver = "spiffe://tessera.local/service/keyserver"' "$DIR/endpoints.toml"
# The address from [endpoints] ([identities] has the same keys).
GW_ADDR=$(sed -n '/^\[endpoints\]/,/^\[/s/^gateway = "\(.*\)"/\1/p' "$DIR/endpoints.toml")
check "the gateway answers grpcurl health" out_has SERVING \
  grpcurl -cacert "$DIR/pki/ca.crt" -cert "$DIR/pki/owner.crt" -key "$DIR/pki/owner.key" \
  -d '{"service":"tessera.gateway.v1.Gateway"}' "$GW_ADDR" grpc.health.v1.Health/Check

# --- a 64x48 RGB PNG and a 16-bit raw slice made by the CLI's own phantom ---
python3 - "$E2E_TMP" <<'PY'
import os, struct, sys, zlib
d = sys.argv[1]
w, h = 64, 48
rows = b"".join(b"\x00" + bytes((x * 4 + y) % 256 for x in range(w) for _ in range(3)) for y in range(h))
def chunk(t, data):
    return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(os.path.join(d, "slice.png"), "wb").write(png)
raw = b"".join(struct.pack("<H", (x * 37 + y * 11) % 4096) for y in range(80) for x in range(96))
open(os.path.join(d, "slice.raw"), "wb").write(raw)
PY

# --- store ---
STORE=$("$T" store "$E2E_TMP/slice.raw" --raw 96,80,16,12 --roi 16,16,48,32 --as owner --owner owner \
  --attr patient_id=PID-CLI-1 --attr patient_name='Poe^Edgar' --json)
STUDY=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["study"])' <<<"$STORE")
check "store prints a study handle" test "${STUDY:0:3}" = "st-"
check "store as the outsider fails (exit non-zero, refused)" fails_with refused \
  "$T" store "$E2E_TMP/slice.png" --as outsider --owner owner --attr patient_id=X
check "store without --as says who are you" fails_with "who are you" \
  env -u TESSERA_AS "$T" store "$E2E_TMP/slice.png" --owner owner --attr patient_id=X
check "store of a PNG" out_has "stored: st-" \
  "$T" store "$E2E_TMP/slice.png" --as clinician --owner owner --attr patient_id=PID-CLI-2

# --- request, approve, retrieve ---
RID=$("$T" request-key "$STUDY" --as clinician --why "e2e" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
check "the owner's requests list shows it" out_has "$RID" "$T" requests --as owner
check "retrieve before approval fails: refused" fails_with "refused" \
  "$T" retrieve "$STUDY" --request "$RID" --as clinician -o "$E2E_TMP/early.raw"
check "the clinician cannot approve" fails_with "refused" "$T" approve "$RID" --as clinician --uses 3
check "the owner approves: 3 uses until a date (not a Unix time)" out_has ": 3 use(s) left until 20" "$T" approve "$RID" --as owner --ttl 10m --uses 3
check "retrieve through the gateway: identical bytes, identity shown" \
  bash -c "'$T' retrieve '$STUDY' --request '$RID' --as clinician -o '$E2E_TMP/got.raw' | grep -q 'Poe^Edgar' && cmp '$E2E_TMP/got.raw' '$E2E_TMP/slice.raw'"
check "retrieve --local (user-side restore): identical bytes, says why no identity" \
  bash -c "'$T' retrieve '$STUDY' --request '$RID' --as clinician --local -o '$E2E_TMP/local.raw' | grep -q 'identity: not fetched with --local' && cmp '$E2E_TMP/local.raw' '$E2E_TMP/slice.raw'"
check "verify: intact" out_has intact "$T" verify "$STUDY" --as owner
check "process gaussian writes a PNG and says it spent a use" bash -c "'$T' process '$STUDY' --request '$RID' --as clinician --op gaussian -o '$E2E_TMP/smooth.png' | grep -q 'one use of $RID spent' && test -s '$E2E_TMP/smooth.png'"
check "the grant is used up after 3 uses" fails_with "used up" \
  "$T" retrieve "$STUDY" --request "$RID" --as clinician -o "$E2E_TMP/again.raw"

# --- deny and revoke ---
R2=$("$T" request-key "$STUDY" --as clinician2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
check "the owner denies" out_has denied "$T" deny "$R2" --as owner --reason "not on the care team"
check "a denied request cannot retrieve" fails_with refused \
  "$T" retrieve "$STUDY" --request "$R2" --as clinician2 -o "$E2E_TMP/x.raw"
R3=$("$T" request-key "$STUDY" --as researcher --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
"$T" approve "$R3" --as owner --uses 2 >/dev/null
check "a researcher retrieves without identity" out_has "not shown to your role" \
  "$T" retrieve "$STUDY" --request "$R3" --as researcher -o "$E2E_TMP/r.raw"
check "the owner revokes" out_has revoked "$T" revoke "$R3" --as owner
check "a revoked grant cannot retrieve" fails_with refused \
  "$T" retrieve "$STUDY" --request "$R3" --as researcher -o "$E2E_TMP/r2.raw"

# --- delete and audit ---
check "repair status (admin): every object scrubbed on its node, nothing missing" \
  out_has " 0 missing, 0 corrupt, 0 unreachable" "$T" repair status --as admin
check "repair by an owner is refused" fails_with refused "$T" repair status --as owner
check "delete by a clinician fails" fails_with refused "$T" delete "$STUDY" --as clinician
check "delete by the owner" out_has "key material destroyed: true" "$T" delete "$STUDY" --as owner
check "verify after delete: not found" fails_with "not found" "$T" verify "$STUDY" --as owner
check "audit --verify" "$T" audit --as owner --verify
check "an unreachable gateway is a clear error" fails_with "cannot reach the gateway" \
  "$T" verify "$STUDY" --as owner --gateway 127.0.0.1:1
once() { # each ": "-separated part of the error line once
  local line
  line=$("$T" verify "$STUDY" --as owner --gateway 127.0.0.1:1 2>&1 | grep '^error: ')
  [ "$(tr -s ' ' <<<"${line//: /$'\n'}" | sort | uniq -d | wc -l)" -eq 0 ] || { echo "$line"; return 1; }
}
check "  ... each cause said once" once
check "doctor: every endpoint with its identity" out_has "0 failed" "$T" doctor
check "--json into a closed pipe: quiet, exit 141" bash -c \
  "set +o pipefail; '$T' requests --as owner --all --json 2>'$E2E_TMP/pipe.err' | head -c 1 >/dev/null; ! grep -q panicked '$E2E_TMP/pipe.err'"

# --- Ctrl-C stops every service cleanly ---
# (wait must run in this shell, not in check's subshell)
kill -INT "$DEV_PID"
DEV_RC=0
wait "$DEV_PID" || DEV_RC=$?
check "SIGINT: dev up stops cleanly (exit 0)" \
  bash -c "[ $DEV_RC -eq 0 ] && grep -q 'stopped cleanly' '$E2E_TMP/devup.out'"

e2e_finish
