#!/usr/bin/env bash
# e2e: the whole suite as separate processes on loopback (keyserver, three
# storage nodes, watermark, segmentation, gateway; mutual TLS everywhere),
# driven through the gateway with grpcurl as the outside client: store,
# request access, approve, retrieve bit-identical, verify, process, locate,
# delete. The outsider is refused at every RPC; the storage nodes' redb
# files hold no patient identity and no run of the image's bytes; stopped
# storage nodes give UNAVAILABLE naming the node and never a partial study.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

GW=tessera.gateway.v1.Gateway
KS=tessera.keyserver.v1.KeyServer
ST=tessera.storage.v1.StorageNode
OWNER=spiffe://tessera.local/user/owner
PY=python3

# expect_msg CODE PATTERN CMD...: CMD fails with CODE and a message matching PATTERN.
expect_msg() {
  local code=$1 pat=$2 out
  shift 2
  if out=$("$@" 2>&1); then echo "expected $code, the call succeeded: $out"; return 1; fi
  if grep -qE "Code: $code" <<<"$out" && grep -q -- "$pat" <<<"$out"; then return 0; fi
  echo "expected $code matching '$pat', got: $out"
  return 1
}

# --- the suite, one process per service ---
start_backends 3
{ gateway_base_config
  printf '[dicom]\ntemporal = "retain-modified"\n[dicom.scp]\nlisten = "127.0.0.1:0"\nae_title = "TESSERA"\nallowed_calling_aes = ["STORESCU"]\nowner = "spiffe://tessera.local/user/owner"\n'; } >"$E2E_TMP/gateway.toml"

# A C-STORE SCP open to every AE title is a configuration error (exit 64).
scp_without_allow_list() {
  local rc=0
  sed 's/^allowed_calling_aes = .*/allowed_calling_aes = []/' "$E2E_TMP/gateway.toml" >"$E2E_TMP/open-scp.toml"
  "$TESSERA_BIN_DIR/gateway" --config "$E2E_TMP/open-scp.toml" >/dev/null 2>"$E2E_TMP/open-scp.log" || rc=$?
  [ "$rc" -eq 64 ] && grep -q "allowed_calling_aes" "$E2E_TMP/open-scp.log"
}
check "a C-STORE SCP without an allow-list of AE titles is refused (exit 64)" scp_without_allow_list

# A vault key others can read is a configuration error (exit 64).
loose_vault_key() {
  local rc=0
  chmod 644 "$VKEY"
  "$TESSERA_BIN_DIR/gateway" --config "$E2E_TMP/gateway.toml" >/dev/null 2>"$E2E_TMP/loose.log" || rc=$?
  chmod 600 "$VKEY"
  [ "$rc" -eq 64 ] && grep -q "too open" "$E2E_TMP/loose.log"
}
check "a world-readable vault key is refused (exit 64)" loose_vault_key

start_service gateway "$E2E_TMP/gateway.toml"; ADDR=$SERVICE_ADDR
DICOM_ADDR=$(sed -n 's/^dicom_listening=//p' "$E2E_TMP"/gateway.*.out | tail -n 1)
scp_echo() {
  local out
  out=$($PY -m pynetdicom echoscu "${DICOM_ADDR%:*}" "${DICOM_ADDR##*:}" -aec TESSERA -aet STORESCU -v 2>&1)
  grep -q "Status: 0x0000" <<<"$out" || { echo "$out"; return 1; }
}
check "the gateway binary prints dicom_listening= and its SCP answers C-ECHO" scp_echo
echo "gateway on $ADDR (keyserver $KS_ADDR, watermark $WM_ADDR, segmentation $SEG_ADDR, storage ${NODE_ADDR[*]})"
wait_healthy "$ADDR" owner "$GW"

# --- reflection ---
check "reflection lists the gateway" out_has "$GW" gc owner "$ADDR" list
check "reflection describes every RPC" out_has 'rpc Delete' gc owner "$ADDR" describe "$GW"

# --- a 96x80 12-bit slice of random pixels, raw little-endian ---
IMG="$E2E_TMP/slice.raw"
$PY - "$IMG" <<'PY'
import os, sys, struct
w, h = 96, 80
vals = [int.from_bytes(os.urandom(2), 'little') & 0x0fff for _ in range(w * h)]
open(sys.argv[1], 'wb').write(b''.join(struct.pack('<H', v) for v in vals))
PY
SIZE=$(stat -c %s "$IMG")
store_json() { # store_json OWNER_URI -> the client-stream messages on stdout
  $PY - "$IMG" "$1" "$SIZE" <<'PY'
import base64, json, sys
data = open(sys.argv[1], 'rb').read()
hdr = {"owner": sys.argv[2], "format": "IMAGE_FORMAT_RAW", "size": sys.argv[3],
       "patient_attributes": [{"name": "patient_id", "value": "PID-E2E-5521"},
                              {"name": "patient_name", "value": "Roe^Richard^E2E"}],
       "raw_spec": {"width": 96, "height": 80, "frames": 1, "bits_allocated": 16, "bits_stored": 12, "channels": 1},
       "roi": {"x": 16, "y": 16, "width": 48, "height": 32}}
print(json.dumps({"header": hdr}))
for i in range(0, len(data), 4096):
    print(json.dumps({"chunk": base64.b64encode(data[i:i+4096]).decode()}))
PY
}
store_as() { store_json "$OWNER" | gc "$1" "$ADDR" -d @ -- "$GW/Store"; }
STORE_OUT=$(store_as owner)
HANDLE=$($PY -c 'import json,sys; print(json.load(sys.stdin)["studyHandle"])' <<<"$STORE_OUT")
echo "stored as $HANDLE"
distinct_nodes() {
  $PY -c 'import json,sys; p=json.load(sys.stdin)["placements"]; assert len(p)==2 and p[0]["node"]!=p[1]["node"], p' <<<"$STORE_OUT"
}
check "store: a pseudonymous handle, shares on two distinct nodes" distinct_nodes

# --- access: request, pending refusal, approval, retrieve ---
REQ_OUT=$(gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"e2e\"}" -- "$GW/RequestAccess")
RID=$($PY -c 'import json,sys; print(json.load(sys.stdin)["request"]["requestId"])' <<<"$REQ_OUT")
check "the request is pending" out_has 'REQUEST_STATE_PENDING' echo "$REQ_OUT"
check "the owner lists it" out_has "$RID" gc owner "$KS_ADDR" -d "{\"study_id\":\"$HANDLE\"}" -- "$KS/ListRequests"
check "retrieve while pending: PermissionDenied" expect_code PermissionDenied \
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- "$GW/Retrieve"
check "the clinician (no owner role) cannot approve its request" expect_code PermissionDenied \
  gc clinician "$KS_ADDR" -d "{\"request_id\":\"$RID\",\"ttl_seconds\":600,\"uses\":4}" -- "$KS/ApproveRequest"
# The self-approval rule itself: the owner asks for its own study, and may
# not approve that request (the role would allow it; the rule does not).
SELF_RID=$($PY -c 'import json,sys; print(json.load(sys.stdin)["request"]["requestId"])' <<<"$(gc owner "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"self\"}" -- "$GW/RequestAccess")")
check "nobody approves their own request (the owner, on its own study)" expect_msg PermissionDenied "own request" \
  gc owner "$KS_ADDR" -d "{\"request_id\":\"$SELF_RID\",\"ttl_seconds\":600,\"uses\":1}" -- "$KS/ApproveRequest"
check "the owner approves (4 uses)" out_has APPROVED \
  gc owner "$KS_ADDR" -d "{\"request_id\":\"$RID\",\"ttl_seconds\":600,\"uses\":4}" -- "$KS/ApproveRequest"

retrieve_identical() {
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- "$GW/Retrieve" >"$E2E_TMP/retrieve.json"
  $PY - "$IMG" "$E2E_TMP/retrieve.json" <<'PY'
import base64, json, sys
text = open(sys.argv[2]).read()
dec = json.JSONDecoder(); i = 0; msgs = []
while i < len(text):
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    m, i = dec.raw_decode(text, i); msgs.append(m)
hdr = msgs[0]["header"]
assert hdr["report"]["intact"], hdr["report"]
names = {a["name"]: a["value"] for a in hdr.get("patientAttributes", [])}
assert names.get("patient_name") == "Roe^Richard^E2E", names
data = b"".join(base64.b64decode(m["chunk"]) for m in msgs[1:])
assert data == open(sys.argv[1], "rb").read(), "pixels differ"
PY
}
check "retrieve: bit-identical, intact, identity for the clinician" retrieve_identical

# --- verify, locate, process ---
check "verify: intact" out_has '"intact": true' gc owner "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Verify"
check "locate: header and both placements" out_has '"headerJson"' \
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- "$GW/Locate"
process_regions() {
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\",\"operation\":\"OPERATION_GAUSSIAN\",\"block_size\":16,\"seed\":3}" -- "$GW/Process" >"$E2E_TMP/process.json"
  $PY - "$E2E_TMP/process.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
m, _ = json.JSONDecoder().raw_decode(text.lstrip())
work = m["header"]["work"]
nodes = [w["node"] for w in work]
assert len(nodes) == len(set(nodes)) and len(nodes) >= 1, work
PY
}
check "process: regions on distinct storage nodes" process_regions
check "process: unknown operation is InvalidArgument" expect_code InvalidArgument \
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\",\"operation\":\"OPERATION_UNSPECIFIED\"}" -- "$GW/Process"

# --- a researcher never sees identity ---
RRID=$($PY -c 'import json,sys; print(json.load(sys.stdin)["request"]["requestId"])' <<<"$(gc researcher "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/RequestAccess")")
gc owner "$KS_ADDR" -d "{\"request_id\":\"$RRID\",\"ttl_seconds\":600,\"uses\":1}" -- "$KS/ApproveRequest" >/dev/null
researcher_anonymous() {
  local out
  out=$(gc researcher "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RRID\"}" -- "$GW/Retrieve")
  grep -q '"intact": true' <<<"$out" && ! grep -q 'patientAttributes\|Roe^Richard' <<<"$out"
}
check "retrieve as researcher: pixels without identity" researcher_anonymous

# --- ownership, delegation, verify (docs/SECURITY.md) ---
C2=spiffe://tessera.local/user/clinician2
check "clinician2, no delegate of the owner, may not store for the owner" expect_msg PermissionDenied delegate store_as clinician2
check "clinician2 without a grant may not verify the study" expect_code PermissionDenied \
  gc clinician2 "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Verify"
check "the clinician verifies with its own grant (not spent)" out_has '"intact": true' \
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- "$GW/Verify"
check "another user's grant does not open Verify" expect_code PermissionDenied \
  gc clinician2 "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- "$GW/Verify"
check "the owner makes clinician2 a delegate" \
  gc owner "$KS_ADDR" -d "{\"delegate\":\"$C2\"}" -- "$KS/AddDelegate"
check "the owner lists its delegates" out_has "$C2" gc owner "$KS_ADDR" -d '{}' -- "$KS/ListDelegates"
DELEGATE_STORE=$(store_as clinician2)
check "the delegate stores for the owner" out_has studyHandle echo "$DELEGATE_STORE"
DHANDLE=$($PY -c 'import json,sys; print(json.load(sys.stdin)["studyHandle"])' <<<"$DELEGATE_STORE")
check "the delegate verifies the owner's study" out_has '"intact": true' \
  gc clinician2 "$ADDR" -d "{\"study_handle\":\"$DHANDLE\"}" -- "$GW/Verify"
check "the owner removes the delegate" \
  gc owner "$KS_ADDR" -d "{\"delegate\":\"$C2\"}" -- "$KS/RemoveDelegate"
check "a removed delegate may not store" expect_code PermissionDenied store_as clinician2
gc owner "$ADDR" -d "{\"study_handle\":\"$DHANDLE\"}" -- "$GW/Delete" >/dev/null

# --- the outsider is refused at every RPC (no role: no reflection either) ---
GW_PROTO=(-import-path "$E2E_DIR/../proto" -proto tessera/gateway/v1/gateway.proto)
for m in "Store:{}" "RequestAccess:{\"study_handle\":\"$HANDLE\"}" \
         "Retrieve:{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" \
         "Verify:{\"study_handle\":\"$HANDLE\"}" "Locate:{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" \
         "Process:{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\",\"operation\":\"OPERATION_GAUSSIAN\"}" \
         "Delete:{\"study_handle\":\"$HANDLE\"}"; do
  check "outsider refused: ${m%%:*}" expect_code PermissionDenied gc outsider "$ADDR" "${GW_PROTO[@]}" -d "${m#*:}" -- "$GW/${m%%:*}"
done
check "a storage node's identity is refused at the gateway" expect_code PermissionDenied \
  gc storage-1 "$ADDR" "${GW_PROTO[@]}" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Verify"
check "no client certificate: refused" expect_refused \
  grpcurl -max-time 10 -cacert "$PKI/ca.crt" "${GW_PROTO[@]}" -d "{\"study_handle\":\"$HANDLE\"}" "$ADDR" "$GW/Verify"

# --- bad input: InvalidArgument naming the field, nothing stored ---
count_objects() { # total objects on the running nodes given as arguments; fails if a List fails
  local total=0 n out c
  for n in "$@"; do
    out=$(gc gateway "${NODE_ADDR[$n]}" -d '{"limit":1000}' -- "$ST/List") || { echo "List on storage-$n failed" >&2; return 1; }
    c=$($PY -c 'import json,sys; print(len(json.loads(sys.stdin.read() or "{}").get("objects", [])))' <<<"$out")
    total=$((total + c))
  done
  echo "$total"
}
BEFORE=$(count_objects 1 2 3)
check "bad owner: InvalidArgument naming header.owner" expect_msg InvalidArgument 'header.owner' \
  gc owner "$ADDR" -d '{"header":{"owner":"nobody","format":"IMAGE_FORMAT_PNG","size":"4","patient_attributes":[{"name":"patient_id","value":"x"}]}}' -- "$GW/Store"
check "a lying size: InvalidArgument" expect_code InvalidArgument \
  gc owner "$ADDR" -d "{\"header\":{\"owner\":\"$OWNER\",\"format\":\"IMAGE_FORMAT_PNG\",\"size\":\"100\",\"patient_attributes\":[{\"name\":\"patient_id\",\"value\":\"x\"}]}} {\"chunk\":\"AAAA\"}" -- "$GW/Store"
check "not a PNG: InvalidArgument" expect_code InvalidArgument \
  gc owner "$ADDR" -d "{\"header\":{\"owner\":\"$OWNER\",\"format\":\"IMAGE_FORMAT_PNG\",\"size\":\"3\",\"patient_attributes\":[{\"name\":\"patient_id\",\"value\":\"x\"}]}} {\"chunk\":\"AAAA\"}" -- "$GW/Store"
check "a malformed handle: InvalidArgument naming study_handle" expect_msg InvalidArgument study_handle \
  gc owner "$ADDR" -d '{"study_handle":"st-../../etc"}' -- "$GW/Verify"
check "an unknown study: NotFound" expect_code NotFound \
  gc owner "$ADDR" -d '{"study_handle":"st-00000000000000000000000000000000"}' -- "$GW/Verify"
check "refused stores left nothing on the nodes" test "$(count_objects 1 2 3)" = "$BEFORE"

# --- nothing identifying, no run of the pixels at rest on any node ---
scan_nodes() { # every node's redb file must be there: a scan of nothing proves nothing
  $PY - "$IMG" "$E2E_TMP"/storage-{1,2,3}/objects.redb <<'PY'
import os, sys
img = open(sys.argv[1], "rb").read()
for db in sys.argv[2:]:
    assert os.path.getsize(db) > 0, (db, "empty")
    raw = open(db, "rb").read()
    for bad in (b"PID-E2E-5521", b"Roe^Richard^E2E", b"patient_name"):
        assert bad not in raw, (db, bad)
    for start in range(0, len(img) - 32, 512):
        assert img[start:start + 32] not in raw, (db, start)
PY
}
check "storage redb files: no patient identity, no 32-byte run of the image" scan_nodes
check "the vault holds no identity in the clear" bash -c "test -s '$E2E_TMP/vault.redb' && ! grep -q 'Roe^Richard' '$E2E_TMP/vault.redb'"

# --- one storage node stopped ---
VICTIM=$($PY -c 'import json,sys; print(json.load(sys.stdin)["placements"][0]["node"])' <<<"$STORE_OUT")
VN=${VICTIM#storage-}
kill "${NODE_PID[$VN]}"; wait "${NODE_PID[$VN]}" 2>/dev/null || true
check "retrieve with $VICTIM stopped: Unavailable naming it" expect_msg Unavailable "$VICTIM" \
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- "$GW/Retrieve"
SECOND_OUT=$(store_as owner)
avoids_victim() { ! grep -q "\"$VICTIM\"" <<<"$SECOND_OUT" && grep -q studyHandle <<<"$SECOND_OUT"; }
check "store with one node stopped: placed on the two others" avoids_victim
# A second node stopped: fewer than two nodes, store fails cleanly.
OTHER=$($PY -c 'import json,sys; print(json.load(sys.stdin)["placements"][0]["node"])' <<<"$SECOND_OUT")
ON=${OTHER#storage-}
SURVIVOR=$((6 - VN - ON))
kill "${NODE_PID[$ON]}"; wait "${NODE_PID[$ON]}" 2>/dev/null || true
S_BEFORE=$(count_objects "$SURVIVOR")
check "store with two nodes stopped: Unavailable naming them" expect_msg Unavailable "$OTHER" store_as owner
check "no partial study left on storage-$SURVIVOR" test "$(count_objects "$SURVIVOR")" = "$S_BEFORE"

# Restarted nodes serve again; the tampered-free study verifies intact.
start_service storage-node "${NODE_CFG[$VN]}"
start_service storage-node "${NODE_CFG[$ON]}"
check "after restart: verify intact again" out_has '"intact": true' gc owner "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Verify"

# --- delete: owner only; shares gone, key destroyed ---
check "delete by the clinician: PermissionDenied" expect_code PermissionDenied \
  gc clinician "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Delete"
check "delete by the owner: key destroyed" out_has '"keyDestroyed": true' \
  gc owner "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Delete"
check "after delete: NotFound" expect_code NotFound gc owner "$ADDR" -d "{\"study_handle\":\"$HANDLE\"}" -- "$GW/Verify"
check "after delete: the keyserver no longer derives the key" expect_code NotFound \
  gc watermark "$KS_ADDR" -d "{\"study_id\":\"$HANDLE\",\"purpose\":\"pixels\",\"attributes\":[{\"name\":\"patient_id\",\"value\":\"PID-E2E-5521\"},{\"name\":\"patient_name\",\"value\":\"Roe^Richard^E2E\"}]}" -- "$KS/DeriveKey"
check "the audit chain verifies" out_has '"ok": true' gc owner "$KS_ADDR" -- "$KS/VerifyAudit"

e2e_finish
