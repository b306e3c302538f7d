#!/usr/bin/env bash
# e2e: DICOM end to end. `tessera dev up` (the whole suite on loopback,
# with the gateway's C-STORE SCP) as a real process; a 5-instance study
# (4 native CT + 1 JPEG 2000) sent by pynetdicom's storescu as a modality
# would; found, requested, approved and retrieved with grpcurl: data sets
# byte-identical for a clinician, de-identified for a researcher; AE title
# checks, duplicates and bad input; delete.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
PY="${PYTHON:-python3}"
TOOL="$(dirname "$0")/dicom_tool.py"
OWNER="spiffe://tessera.local/user/owner"

dev_up "$DIR"
PKI="$DIR/pki"
# The address from [endpoints] ([identities] has the same keys).
GW=$(ep gateway)
KS=$(ep keyserver)
DICOM=$(ep dicom)
check "endpoints.toml names the C-STORE SCP" test -n "$DICOM"
HOST=${DICOM%:*}
PORT=${DICOM##*:}

STUDY_DIR="$E2E_TMP/study"
STUDY_UID=$("$PY" "$TOOL" make-study "$STUDY_DIR")

scu() { "$PY" -m pynetdicom "$@" 2>&1; }
stores_ok() { # stores_ok N OUTPUT: N C-STORE responses with status 0x0000
  local n
  n=$(grep -c "Status: 0x0000" <<<"$2" || true)
  [ "$n" -eq "$1" ] || { echo "$n successful stores, expected $1: $2"; return 1; }
}
echo_ok() { local out; out=$(scu echoscu "$HOST" "$PORT" -aec TESSERA -aet STORESCU -v); grep -q "Status: 0x0000" <<<"$out" || { echo "$out"; return 1; }; }
check "C-ECHO answers success" echo_ok
send_study() { local out; out=$(scu storescu "$HOST" "$PORT" "$STUDY_DIR" -aec TESSERA -aet STORESCU -cx -v); stores_ok 5 "$out"; }
check "storescu sends a 5-instance study (native CT + JPEG 2000): 5 x 0x0000" send_study
unknown_ae() { local out; out=$(scu storescu "$HOST" "$PORT" "$STUDY_DIR/im1.dcm" -aec TESSERA -aet INTRUDER -v); grep -qi "rejected" <<<"$out" && ! grep -q "Status: 0x0000" <<<"$out" || { echo "$out"; return 1; }; }
check "an unknown calling AE title is rejected" unknown_ae
wrong_called() { local out; out=$(scu storescu "$HOST" "$PORT" "$STUDY_DIR/im1.dcm" -aec OTHERPACS -aet STORESCU -v); grep -qi "rejected" <<<"$out" || { echo "$out"; return 1; }; }
check "a wrong called AE title is rejected" wrong_called
resend() { local out; out=$(scu storescu "$HOST" "$PORT" "$STUDY_DIR/im2.dcm" -aec TESSERA -aet STORESCU -v); stores_ok 1 "$out"; }
check "the same instance sent again: success (a duplicate, nothing new)" resend

# --- find the study (clinician), not as a researcher ---
FIND="{\"owner\":\"$OWNER\",\"patient_id\":\"E2E-MRN-90417\",\"study_instance_uid\":\"$STUDY_UID\"}"
gc clinician "$GW" -d "$FIND" -- tessera.gateway.v1.Gateway/FindDicomStudy >"$E2E_TMP/find.json"
HANDLE=$(sed -n 's/.*"studyHandle": "\(.*\)".*/\1/p' "$E2E_TMP/find.json")
check "FindDicomStudy: one handle, 5 instances" grep -q '"instances": 5' "$E2E_TMP/find.json"
check "a researcher cannot look patients up" expect_code PermissionDenied \
  gc researcher "$GW" -d "$FIND" -- tessera.gateway.v1.Gateway/FindDicomStudy
check "a clinician who is no delegate of the owner cannot probe its patients" expect_code PermissionDenied \
  gc clinician2 "$GW" -d "$FIND" -- tessera.gateway.v1.Gateway/FindDicomStudy

# --- the same SOP instance over gRPC: the original file, whose meta differs
# from what the SCP wrote, is the same data set: a duplicate; another data
# set under the same UID: ALREADY_EXISTS naming the element ---
store_grpc() { "$PY" "$TOOL" store-json "$1" "$OWNER" | gc clinician "$GW" -d @ -- tessera.gateway.v1.Gateway/StoreDicom; }
dup_ok() { local out; out=$(store_grpc "$STUDY_DIR/im3.dcm") && grep -q '"duplicate": true' <<<"$out" || { echo "$out"; return 1; }; }
check "the same SOP instance over gRPC after C-STORE (other file meta): a duplicate" dup_ok
"$PY" -c 'import pydicom, sys; d = pydicom.dcmread(sys.argv[1]); d.StudyDescription = "another data set"; d.save_as(sys.argv[2])' \
  "$STUDY_DIR/im3.dcm" "$E2E_TMP/im3-changed.dcm"
changed_refused() {
  local out
  if out=$(store_grpc "$E2E_TMP/im3-changed.dcm" 2>&1); then echo "expected AlreadyExists, stored: $out"; return 1; fi
  grep -q "Code: AlreadyExists" <<<"$out" && grep -q "(0008,1030) StudyDescription" <<<"$out" || { echo "$out"; return 1; }
}
check "another data set under the same SOP Instance UID: AlreadyExists naming (0008,1030)" changed_refused
head -c 2000 "$STUDY_DIR/im1.dcm" >"$E2E_TMP/truncated.dcm"
check "a truncated file over gRPC: InvalidArgument" expect_code InvalidArgument store_grpc "$E2E_TMP/truncated.dcm"
printf 'hello, not dicom at all %.0s' $(seq 1 20) >"$E2E_TMP/text.dcm"
check "a text file over gRPC: InvalidArgument" expect_code InvalidArgument store_grpc "$E2E_TMP/text.dcm"
bad_scu() { local out; out=$(scu storescu "$HOST" "$PORT" "$E2E_TMP/truncated.dcm" -aec TESSERA -aet STORESCU -v); ! grep -q "Status: 0x0000" <<<"$out" || { echo "$out"; return 1; }; }
check "a truncated file over C-STORE is not stored" bad_scu
gc clinician "$GW" -d "$FIND" -- tessera.gateway.v1.Gateway/FindDicomStudy >"$E2E_TMP/find2.json"
check "still 5 instances after duplicates and bad input" grep -q '"instances": 5' "$E2E_TMP/find2.json"

# --- access: request, approve, retrieve ---
request() { # request WHO -> request id
  gc "$1" "$GW" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"e2e\"}" -- tessera.gateway.v1.Gateway/RequestAccess |
    sed -n 's/.*"requestId": "\(.*\)".*/\1/p' | head -n 1
}
approve() { gc owner "$KS" -d "{\"request_id\":\"$1\",\"ttl_seconds\":600,\"uses\":1}" -- tessera.keyserver.v1.KeyServer/ApproveRequest >/dev/null; }
RID=$(request clinician)
check "a pending request retrieves nothing" expect_code PermissionDenied \
  gc clinician "$GW" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- tessera.gateway.v1.Gateway/RetrieveDicom
approve "$RID"
retrieve() { gc "$1" "$GW" -max-msg-sz 8388608 -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$2\"}" -- tessera.gateway.v1.Gateway/RetrieveDicom >"$3"; }
check "clinician: RetrieveDicom streams the study" retrieve clinician "$RID" "$E2E_TMP/clin.json"
check "clinician: every data set byte-identical to what was sent, identity shown" \
  "$PY" "$TOOL" check-retrieve "$E2E_TMP/clin.json" "$STUDY_DIR" identical
check "the image Retrieve refuses a DICOM study: FailedPrecondition" expect_code FailedPrecondition \
  gc clinician "$GW" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- tessera.gateway.v1.Gateway/Retrieve
RRID=$(request researcher)
approve "$RRID"
check "researcher: RetrieveDicom streams the study" retrieve researcher "$RRID" "$E2E_TMP/res.json"
check "researcher: de-identified files, no identity, one mapped study UID" \
  "$PY" "$TOOL" check-retrieve "$E2E_TMP/res.json" "$STUDY_DIR" deidentified
check "an outsider is refused" expect_code PermissionDenied \
  gc outsider "$GW" -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RID\"}" -- tessera.gateway.v1.Gateway/RetrieveDicom

verify_all() {
  local out
  out=$(gc owner "$GW" -d "{\"study_handle\":\"$HANDLE\"}" -- tessera.gateway.v1.Gateway/Verify)
  "$PY" -c 'import json,sys; v=json.load(sys.stdin); i=v["instances"]; sys.exit(not (v["report"]["intact"] and len(i)==5 and all(x.get("intact") for x in i)))' <<<"$out" || { echo "$out"; return 1; }
}
check "Verify (no grant): the study and each of its 5 instances intact" verify_all

# --- nothing identifying on the storage nodes ---
no_identity() {
  local f scanned=0
  for f in $(find "$DIR" -name '*.redb' ! -name 'vault.redb' ! -name 'keyserver.redb'); do
    scanned=$((scanned + 1))
    if grep -qa -e "Tesserae" -e "E2E-MRN-90417" -e "$STUDY_UID" "$f"; then echo "identity in $f"; return 1; fi
  done
  # A scan of nothing proves nothing: every storage node's file must be there.
  [ "$scanned" -ge 3 ] || { echo "only $scanned storage redb files found under $DIR"; return 1; }
}
check "no patient name, ID or study UID in any storage node's redb file" no_identity

# --- delete ---
gc owner "$GW" -d "{\"study_handle\":\"$HANDLE\"}" -- tessera.gateway.v1.Gateway/Delete >"$E2E_TMP/del.json"
deleted_all() {
  python3 - "$E2E_TMP/del.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
removed = d.get("removed", [])
frags = [len(p.get("fragments", [])) for p in removed]
ok = len(removed) == 14 and all(n == 5 for n in frags) and d.get("keyDestroyed") is True
if not ok:
    print(f"removed {len(removed)} objects with fragments {frags}, keyDestroyed={d.get('keyDestroyed')}")
sys.exit(0 if ok else 1)
PY
}
check "delete removes every object (4 x 3 + 1 x 2), each as its 5 fragments (dev up: 3+2), and the keys" deleted_all
check "after delete: NotFound" expect_code NotFound \
  gc clinician "$GW" -d "$FIND" -- tessera.gateway.v1.Gateway/FindDicomStudy

kill -INT "$DEV_PID"
wait "$DEV_PID" 2>/dev/null || true
e2e_finish
