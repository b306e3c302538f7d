#!/usr/bin/env bash
# e2e: DICOM query/retrieve (issue 18) with clients nobody here wrote:
# dcmtk findscu, getscu and movescu (to a dcmtk storescp), and pynetdicom.
# `tessera dev up` binds the calling AE titles VIEWER (clinician, a
# delegate of the owner), VIEWER2 (clinician2: no delegate, no grant),
# RESEARCH (researcher) and FARVIEWER (a network loopback is not in) to
# Tessera identities; C-MOVE may send only to MOVEDEST (a storescp here).
# Found; refused without a grant (naming how to ask); retrieved byte-
# identical with one; de-identified for a researcher; nothing about the
# study for an identity without standing; unknown AE and wrong address
# rejected and logged.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init
# dcmtk's tools by their directory: pynetdicom (in .venv/bin, first on
# PATH) installs scripts of the same names.
DCMDUMP=$(command -v dcmdump) || { echo "dcmtk missing: apt-get install -y dcmtk (./x e2e installs it)" >&2; exit 1; }
DCMTK=$(dirname "$DCMDUMP")
findscu() { "$DCMTK/findscu" "$@"; }
getscu() { "$DCMTK/getscu" "$@"; }
movescu() { "$DCMTK/movescu" "$@"; }
storescp() { "$DCMTK/storescp" "$@"; }

T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
PY="${PYTHON:-python3}"
TOOL="$(dirname "$0")/dicom_tool.py"
QR="$(dirname "$0")/dicom_qr_tool.py"

# The C-MOVE destination: dcmtk's storescp, writing data sets as received.
MPORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$E2E_TMP/moved"
storescp +B -aet MOVEDEST -od "$E2E_TMP/moved" "$MPORT" >"$E2E_TMP/storescp.log" 2>&1 &
E2E_PIDS+=("$!")

TESSERA_DEV_MOVE_DESTINATION="MOVEDEST=127.0.0.1:$MPORT" \
  dev_up "$DIR"
PKI="$DIR/pki"
GW=$(ep gateway)
KS=$(ep keyserver)
DICOM=$(ep dicom)
HOST=${DICOM%:*}
PORT=${DICOM##*:}

# A 4-instance CT study (uncompressed: C-GET sends files as stored, never
# transcoded), sent by a modality.
STUDY_DIR="$E2E_TMP/study"
STUDY_UID=$("$PY" "$TOOL" make-study "$STUDY_DIR")
rm "$STUDY_DIR/im5.dcm"
stored=$("$PY" -m pynetdicom storescu "$HOST" "$PORT" "$STUDY_DIR" -aec TESSERA -aet STORESCU -v 2>&1)
check "storescu stores the 4-instance study" test "$(grep -c 'Status: 0x0000' <<<"$stored")" -eq 4

find_study() { # find_study AET [extra -k keys]: findscu at STUDY level
  local aet=$1
  shift
  findscu -v -S -aet "$aet" -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=STUDY \
    -k PatientName -k PatientID -k StudyDate -k StudyInstanceUID -k ModalitiesInStudy \
    -k NumberOfStudyRelatedInstances "$@" 2>&1
}
found() { local out; out=$(find_study "$@"); grep -q "$STUDY_UID" <<<"$out" && grep -q "E2E-MRN-90417" <<<"$out" || { echo "$out"; return 1; }; }
check "findscu VIEWER (a delegate of the owner) finds the study by Patient ID" found VIEWER -k PatientID=E2E-MRN-90417
check "findscu VIEWER finds it by a Patient Name wildcard" found VIEWER -k "PatientName=TESSERAE*"
count4() { local out; out=$(find_study VIEWER -k "StudyInstanceUID=$STUDY_UID"); grep "(0020,1208)" <<<"$out" | grep -qF "[4" || { grep -E "1208|Response" <<<"$out"; return 1; }; }
check "the answer counts 4 instances" count4
nothing() { # nothing AET [keys]: an answer without any match
  local out
  out=$(find_study "$@")
  ! grep -q -e "$STUDY_UID" -e "E2E-MRN" -e "Tesserae" <<<"$out" && ! grep -q "Pending" <<<"$out" || { echo "$out"; return 1; }
}
check "a Patient ID that is not there: no match" nothing VIEWER -k PatientID=NOBODY
check "a date range outside the study: no match" nothing VIEWER -k StudyDate=19000101-19000102
check "VIEWER2 (clinician2: no delegate, no grant) hears nothing of the study" nothing VIEWER2
check "RESEARCH without a grant hears nothing of the study" nothing RESEARCH

series_level() { local out; out=$(findscu -v -S -aet VIEWER -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=SERIES -k "StudyInstanceUID=$STUDY_UID" -k SeriesInstanceUID -k Modality=CT 2>&1); grep -q "(0008,0060) CS \[CT\]" <<<"$out" || { echo "$out"; return 1; }; }
check "SERIES level with Modality=CT answers the series" series_level
image_level() { local out n; out=$(findscu -v -S -aet VIEWER -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=IMAGE -k "StudyInstanceUID=$STUDY_UID" -k SOPInstanceUID 2>&1); n=$(grep -c "(0008,0018) UI" <<<"$out"); [ "$n" -ge 4 ] || { echo "$out"; return 1; }; }
check "IMAGE level answers the 4 instances" image_level

# --- retrieve without a grant: refused, naming how to ask; nothing spent ---
refused() {
  local out
  out=$("$PY" "$QR" cget-status "$HOST" "$PORT" VIEWER "$STUDY_UID")
  grep -q "^0x0124 0 .*request-key" <<<"$out" || { echo "$out"; return 1; }
}
check "C-GET without a grant: 0x0124 Not Authorized, naming tessera request-key" refused
mkdir -p "$E2E_TMP/get-none"
getscu -v -S -aet VIEWER -aec TESSERA -od "$E2E_TMP/get-none" "$HOST" "$PORT" \
  -k QueryRetrieveLevel=STUDY -k "StudyInstanceUID=$STUDY_UID" >"$E2E_TMP/getscu-none.log" 2>&1 || true
# getscu exits non-zero on a refusal; what is asserted is that it reached the
# SCP and was refused (status 0x0124 in its log) and that nothing arrived.
none_received() {
  grep -qiE "Status: 0x0?124\b" "$E2E_TMP/getscu-none.log" || { cat "$E2E_TMP/getscu-none.log"; return 1; }
  test -z "$(ls "$E2E_TMP/get-none")"
}
check "getscu without a grant is refused (0x0124) and receives nothing" none_received

# --- grants (RequestAccess, approved by the owner) ---
HANDLE=$(gc clinician "$GW" -d "{\"owner\":\"spiffe://tessera.local/user/owner\",\"patient_id\":\"E2E-MRN-90417\",\"study_instance_uid\":\"$STUDY_UID\"}" \
  -- tessera.gateway.v1.Gateway/FindDicomStudy | sed -n 's/.*"studyHandle": "\(.*\)".*/\1/p')
grant() { # grant WHO USES -> request id, approved
  local rid
  rid=$(gc "$1" "$GW" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"e2e qr\"}" -- tessera.gateway.v1.Gateway/RequestAccess |
    sed -n 's/.*"requestId": "\(.*\)".*/\1/p' | head -n 1)
  gc owner "$KS" -d "{\"request_id\":\"$rid\",\"ttl_seconds\":600,\"uses\":$2}" -- tessera.keyserver.v1.KeyServer/ApproveRequest >/dev/null
  echo "$rid"
}
RID=$(grant clinician 3)

mkdir -p "$E2E_TMP/get"
getscu_ok() {
  getscu -v -S -aet VIEWER -aec TESSERA -od "$E2E_TMP/get" "$HOST" "$PORT" \
    -k QueryRetrieveLevel=STUDY -k "StudyInstanceUID=$STUDY_UID" >"$E2E_TMP/getscu.log" 2>&1 || { cat "$E2E_TMP/getscu.log"; return 1; }
  [ "$(ls "$E2E_TMP/get" | wc -l)" -eq 4 ] || { ls "$E2E_TMP/get"; cat "$E2E_TMP/getscu.log"; return 1; }
}
check "getscu with a grant: 4 instances over the same association" getscu_ok
check "pynetdicom C-GET: 4 data sets byte-identical to the ones sent (0 failed)" \
  "$PY" "$QR" cget "$HOST" "$PORT" VIEWER "$STUDY_UID" "$STUDY_DIR" identical 4
moved() {
  movescu -v -S -aet VIEWER -aec TESSERA -aem MOVEDEST "$HOST" "$PORT" \
    -k QueryRetrieveLevel=STUDY -k "StudyInstanceUID=$STUDY_UID" >"$E2E_TMP/movescu.log" 2>&1 || { cat "$E2E_TMP/movescu.log"; return 1; }
  "$PY" "$QR" datasets-equal "$STUDY_DIR" "$E2E_TMP/moved"
}
check "movescu to MOVEDEST: storescp receives the 4 data sets byte for byte" moved
check "the grant's 3 uses are spent: a fourth C-GET is refused" refused
unknown_dest() { local out; out=$(movescu -v -S -aet VIEWER -aec TESSERA -aem ELSEWHERE "$HOST" "$PORT" -k QueryRetrieveLevel=STUDY -k "StudyInstanceUID=$STUDY_UID" 2>&1 || true); grep -qiE "a801|MoveDestinationUnknown|destination unknown" <<<"$out" || { echo "$out"; return 1; }; }
check "C-MOVE to a destination not in the config: 0xA801" unknown_dest

# --- a researcher: finds and reads the de-identified view only ---
grant researcher 1 >/dev/null
res_find() {
  local out
  out=$(find_study RESEARCH)
  grep -q "Pending" <<<"$out" && ! grep -q -e "$STUDY_UID" -e "E2E-MRN" -e "Tesserae" <<<"$out" && grep -q "UI \[2\.25\." <<<"$out" || { echo "$out"; return 1; }
}
check "findscu RESEARCH (with a grant): the study under a mapped UID, no name or ID" res_find
check "pynetdicom C-GET as RESEARCH by the mapped UID it found: 4 de-identified data sets" \
  "$PY" "$QR" cget "$HOST" "$PORT" RESEARCH FIND "$STUDY_DIR" deidentified 4
check "RESEARCH cannot retrieve by the original study UID (it matches nothing)" \
  out_has "^0x0000 0 " "$PY" "$QR" cget-status "$HOST" "$PORT" RESEARCH "$STUDY_UID"

# --- who may associate ---
rejected() { local out; out=$(findscu -v -S -aet "$1" -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=STUDY 2>&1 || true); grep -qi "rejected\|reject" <<<"$out" || { echo "$out"; return 1; }; }
check "an unknown calling AE title is rejected" rejected INTRUDER
check "FARVIEWER from an address outside its networks is rejected" rejected FARVIEWER

kill -INT "$DEV_PID"
wait "$DEV_PID" 2>/dev/null || true
e2e_finish
