#!/usr/bin/env bash
# e2e: docs/WALKTHROUGH.md ("Ten minutes with Tessera"), command by command,
# in an empty directory as a newcomer would (`tessera` on PATH, `dev up` in
# the background). Each command must appear in the doc exactly as run here
# (after "$ "), exit as the doc shows, and print every phrase checked below;
# each phrase must itself appear in the doc. So the doc cannot drift from
# what the commands do. `dev up` runs with --base-port 0 (free ports) where
# the doc shows the default ports.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

DOC="$E2E_DIR/../docs/WALKTHROUGH.md"
[ -f "$DOC" ] || { echo "missing $DOC" >&2; exit 1; }
mkdir -p "$E2E_TMP/bin" "$E2E_TMP/work"
ln -s "$TESSERA_BIN_DIR/tessera" "$E2E_TMP/bin/tessera"
export PATH="$E2E_TMP/bin:$PATH"
unset TESSERA_DIR TESSERA_AS TESSERA_GATEWAY TESSERA_KEYSERVER
cd "$E2E_TMP/work"

LAST=""
# step CMD RC PHRASE...: CMD is a doc line (after "$ "), run with bash here;
# its exit status must be RC and its output must hold every PHRASE, each of
# which the doc shows too.
step() {
  local cmd=$1 want=$2 rc=0 problem="" p
  shift 2
  grep -qxF -- "\$ $cmd" "$DOC" || problem="the doc has no line \"\$ $cmd\""
  LAST=$(eval "$cmd" 2>&1) || rc=$?
  [ -n "$problem" ] || [ "$rc" -eq "$want" ] || problem="exit status $rc, the doc shows $want"
  for p in "$@"; do
    [ -n "$problem" ] || grep -qF -- "$p" <<<"$LAST" || problem="output lacks: $p"
    [ -n "$problem" ] || grep -qF -- "$p" "$DOC" || problem="the doc lacks: $p"
  done
  if [ -z "$problem" ]; then
    E2E_PASSED=$((E2E_PASSED + 1))
    echo "ok   - \$ $cmd"
  else
    E2E_FAILED=$((E2E_FAILED + 1))
    echo "FAIL - \$ $cmd: $problem"
    printf '%s\n' "$LAST" | sed 's/^/       /' | head -n 20
  fi
}

# --- 1. an image ---
step "tessera image phantom -o slice.png" 0 \
  "wrote slice.png: 512x512 16-bit gray (12 bits used), the built-in CT-like head phantom (no patient data)"

# --- 2. dev up, in the background (the doc's first terminal) ---
grep -qxF '$ tessera dev up' "$DOC" || { echo "FAIL - the doc has no \$ tessera dev up"; exit 1; }
tessera dev up --base-port 0 >"$E2E_TMP/devup.out" 2>"$E2E_TMP/devup.log" &
DEV_PID=$!
E2E_PIDS+=("$DEV_PID")
for _ in $(seq 1 300); do
  grep -q "Ctrl-C stops" "$E2E_TMP/devup.out" 2>/dev/null && break
  kill -0 "$DEV_PID" 2>/dev/null || { cat "$E2E_TMP/devup.log" >&2; exit 1; }
  sleep 0.1
done
devup_says() {
  local p
  for p in "Tessera is up (mutual TLS on every port). Data in" "  storage-3     " "  storage-5     " \
    "Storage: 5 nodes, each its own zone; every object erasure-coded 3+2" \
    "DICOM: C-STORE SCP at" "AE title TESSERA, calling AE titles STORESCU, MODALITY, TESSERA-BENCH" \
    "DICOM TLS: " "Check: tessera doctor --dir .tessera" "Ctrl-C stops every service."; do
    grep -qF -- "$p" "$E2E_TMP/devup.out" || { echo "dev up lacks: $p"; return 1; }
    grep -qF -- "$p" "$DOC" || { echo "the doc lacks: $p"; return 1; }
  done
}
check "\$ tessera dev up: every service, the SCP, what to try" devup_says

# --- 3. doctor ---
step "tessera doctor" 0 "  ok    PKI CA          .tessera/pki/ca.crt: valid until " \
  "  ok    PKI identities  15 certificates issued by the CA, keys mode 0600" \
  "C-ECHO STORESCU -> TESSERA: success (the C-STORE SCP)" \
  "spiffe://tessera.local/service/gateway, serves tessera.gateway.v1.Gateway" \
  "spiffe://tessera.local/service/storage-2, serves tessera.storage.v1.StorageNode" \
  "spiffe://tessera.local/service/storage-5, serves tessera.storage.v1.StorageNode" \
  "DICOM TLS, client certificate required" \
  "doctor: 16 checks, 0 failed, 0 warning(s)"

# --- 4. store ---
step "tessera store slice.png --as owner --owner owner --attr patient_id=P-1 --attr patient_name='Doe^Jane' --roi 96,40,320,432" 0 \
  "stored: st-" "  share 1 as 5 fragments on storage-" "  share 2 as 5 fragments on storage-" ".s2 (311864 bytes)"
STUDY=$(sed -n 's/^stored: \(st-[0-9a-f]*\)$/\1/p' <<<"$LAST")
NODE2=$(sed -n 's/^  share 2 as 5 fragments on \(storage-[0-9]*\), .*/\1/p' <<<"$LAST")
check "the doc sets STUDY and NODE2 as the reader copies them" \
  bash -c "grep -qE '^\\\$ STUDY=st-[0-9a-f]+\$' '$DOC' && grep -qE '^\\\$ NODE2=storage-[0-9]+\$' '$DOC' && [ -n '$STUDY' ] && [ -n '$NODE2' ]"

# --- 5. request, approve ---
step 'tessera request-key $STUDY --as clinician --why "tumour board"' 0 \
  "requested: rq-" "pending); the owner must approve it"
RQ=$(sed -n 's/^requested: \(rq-[0-9a-f]*\) .*/\1/p' <<<"$LAST")
check "the doc sets RQ as the reader copies it" \
  bash -c "grep -qE '^\\\$ RQ=rq-[0-9a-f]+\$' '$DOC' && [ -n '$RQ' ]"
step "tessera requests --as owner" 0 "REQUEST " "user/clinician  pixels   pending" "tumour board"
step 'tessera approve $RQ --as owner --ttl 1h --uses 3' 0 ": 3 use(s) left until 20" "approved  3/3 "

# --- 6. retrieve ---
step 'tessera retrieve $STUDY --request $RQ --as clinician -o back.png' 0 \
  ": 512x512x1 16-bit (16 stored) -> back.png (one use of rq-" \
  "  integrity: intact (540 ROI blocks, 1056 tiles verified)" \
  "  identity: patient_id = P-1" "  identity: patient_name = Doe^Jane"
step "cmp slice.png back.png && echo identical" 0 "identical"

# --- 7. a cloud cheats: a fragment changed, caught, the study intact, repaired ---
step 'tessera dev tamper --node $NODE2 --object $STUDY.s2.f0' 0 ".s2.f0 (104043 bytes), as a dishonest cloud would"
step 'tessera verify $STUDY --as owner' 0 \
  "integrity: intact (540 ROI blocks, 1056 tiles verified)" \
  "storage: 1 fragment(s) unusable; the study was rebuilt from the others" \
  ".s2 fragment 0 on storage-" ": corrupt (SHA-256 differs from the one recorded at store)"
step 'tessera retrieve $STUDY --request $RQ --as clinician -o back2.png' 0 \
  ": 512x512x1 16-bit (16 stored) -> back2.png (one use of rq-" \
  "  integrity: intact (540 ROI blocks, 1056 tiles verified)"
step "cmp slice.png back2.png && echo identical" 0 "identical"
step "tessera repair run --as admin" 0 "10 fragments checked: 0 missing, 1 corrupt, 0 unreachable" \
  "rebuilt 1 fragment(s), moved 0" ".s2 fragment 0 on storage-"
step "tessera requests --as owner --all" 0 "approved  1/3 "

# --- 8. the tamper map: the watermark's own check, offline ---
step "tessera image keygen -o study.key" 0 "wrote a new 256-bit key to study.key"
step "tessera image protect -i slice.png --key-file study.key --roi 96,40,320,432 -o shares" 0 \
  "ROI 96,40,320,432 (x,y,w,h)" "wrote shares/header.json, shares/share1.bin, shares/share2.bin"
step "printf 'XY' | dd of=shares/share2.bin bs=1 seek=155932 conv=notrunc status=none" 0
step "tessera image verify --dir shares --key-file study.key --map tamper-map.png" 1 \
  "integrity: TAMPERED: 1 of 540 ROI blocks, 1 of 1056 tiles" "(x,y,w,h): share(s) 2" \
  "wrote tamper map tamper-map.png"
map_ok() {
  python3 - <<'PY'
import struct
b = open("tamper-map.png", "rb").read()
assert b[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", b[16:24])
assert (w, h) == (512, 512), (w, h)
PY
}
check "tamper-map.png is a 512x512 PNG" bash -c "$(declare -f map_ok); map_ok"

# --- 9. audit, delete ---
step "tessera audit --as owner --verify" 0 "audit log OK: " "hash chain intact" \
  "checkpoints: none yet. A checkpoint is the hash of every checkpoint_every-th entry" "signing key (Ed25519): "
step 'tessera delete $STUDY --as owner' 0 ": 2 share(s) removed, key material destroyed: true"

# --- Ctrl-C in the first terminal ---
kill -INT "$DEV_PID"
DEV_RC=0
wait "$DEV_PID" || DEV_RC=$?
check "Ctrl-C: stopping..., stopped cleanly (as the doc says)" \
  bash -c "[ $DEV_RC -eq 0 ] && grep -q 'stopped cleanly' '$E2E_TMP/devup.out' && grep -qF '(\`stopping...\`, \`stopped cleanly\`)' '$DOC'"

e2e_finish
