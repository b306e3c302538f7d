#!/usr/bin/env bash
# e2e: DICOMweb on the gateway (issue 18) with a client nobody here wrote:
# dicomweb-client (PyPI) over mutual TLS with the dev PKI's certificates.
# STOW-RS as the owner; QIDO-RS finds the study for a delegate (clinician)
# and nothing for clinician2; WADO-RS refused (403, naming tessera
# request-key) without a grant, byte-identical with one, de-identified for
# a researcher; a client without a certificate refused at the handshake.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init
T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
PY="${PYTHON:-python3}"
TOOL="$(dirname "$0")/dicom_tool.py"
WEB="$(dirname "$0")/dicomweb_tool.py"

"$T" dev up --dir "$DIR" --base-port 0 >"$E2E_TMP/devup.out" 2>"$E2E_TMP/devup.log" &
DEV_PID=$!
E2E_PIDS+=("$DEV_PID")
for _ in $(seq 1 300); do
  grep -q "Ctrl-C stops" "$E2E_TMP/devup.out" 2>/dev/null && break
  kill -0 "$DEV_PID" 2>/dev/null || { cat "$E2E_TMP/devup.log" >&2; exit 1; }
  sleep 0.1
done
PKI="$DIR/pki"
ep() { sed -n "/^\[endpoints\]/,/^\[/s/^$1 = \"\(.*\)\"/\1/p" "$DIR/endpoints.toml"; }
GW=$(ep gateway)
KS=$(ep keyserver)
URL="https://$(ep dicomweb)"
check "dev up records the DICOMweb endpoint" test "$URL" != "https://"

# A 4-instance CT study (uncompressed), stored over STOW-RS by the owner.
STUDY_DIR="$E2E_TMP/study"
STUDY_UID=$("$PY" "$TOOL" make-study "$STUDY_DIR")
rm "$STUDY_DIR/im5.dcm"
check "STOW-RS as the owner: 4 instances in ReferencedSOPSequence" \
  out_has "^4$" "$PY" "$WEB" stow "$URL" "$PKI" owner "$STUDY_DIR"
check "STOW-RS as a researcher: refused (403)" \
  out_has "403" "$PY" "$WEB" stow "$URL" "$PKI" researcher "$STUDY_DIR"

check "QIDO-RS as clinician (a delegate) finds the study by PatientID" \
  out_has "$STUDY_UID E2E-MRN-90417" "$PY" "$WEB" qido "$URL" "$PKI" clinician PatientID=E2E-MRN-90417
check "QIDO-RS by a PatientName wildcard" \
  out_has "$STUDY_UID" "$PY" "$WEB" qido "$URL" "$PKI" clinician "PatientName=TESSERAE*"
none() { local out; out=$("$PY" "$WEB" qido "$URL" "$PKI" "$@"); ! grep -q -e "$STUDY_UID" -e E2E-MRN <<<"$out" || { echo "$out"; return 1; }; }
check "QIDO-RS: a date range outside the study matches nothing" none clinician StudyDate=19000101-19000102
check "QIDO-RS as clinician2 (no delegate, no grant): nothing of the study" none clinician2
check "WADO-RS without a grant: 403 naming tessera request-key" \
  out_has "^403 .*request-key" "$PY" "$WEB" status "$URL" "$PKI" clinician "$STUDY_UID"

HANDLE=$(gc clinician "$GW" -d "{\"owner\":\"spiffe://tessera.local/user/owner\",\"patient_id\":\"E2E-MRN-90417\",\"study_instance_uid\":\"$STUDY_UID\"}" \
  -- tessera.gateway.v1.Gateway/FindDicomStudy | sed -n 's/.*"studyHandle": "\(.*\)".*/\1/p')
grant() { # grant WHO USES -> request id, approved
  local rid
  rid=$(gc "$1" "$GW" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"e2e dicomweb\"}" -- tessera.gateway.v1.Gateway/RequestAccess |
    sed -n 's/.*"requestId": "\(.*\)".*/\1/p' | head -n 1)
  gc owner "$KS" -d "{\"request_id\":\"$rid\",\"ttl_seconds\":600,\"uses\":$2}" -- tessera.keyserver.v1.KeyServer/ApproveRequest >/dev/null
  echo "$rid"
}
grant clinician 2 >/dev/null
check "WADO-RS with a grant: 4 parts byte-identical (sha256) to the files stored" \
  out_has "^4$" "$PY" "$WEB" wado-raw "$URL" "$PKI" clinician "$STUDY_UID" "$STUDY_DIR"
check "dicomweb-client retrieve_study: the 4 data sets sent" \
  out_has "^4$" "$PY" "$WEB" wado "$URL" "$PKI" clinician "$STUDY_UID" "$STUDY_DIR" identical
check "the grant's 2 uses are spent: 403 again" \
  out_has "^403 " "$PY" "$WEB" status "$URL" "$PKI" clinician "$STUDY_UID"

grant researcher 1 >/dev/null
MAPPED=$("$PY" "$WEB" qido "$URL" "$PKI" researcher | awk '{print $1}' | head -n 1)
check "QIDO-RS as researcher: the study under a mapped UID, no Patient ID" \
  test "${MAPPED#2.25.}" != "$MAPPED" -a "$MAPPED" != "$STUDY_UID"
check "WADO-RS as researcher: 4 de-identified data sets" \
  out_has "^4$" "$PY" "$WEB" wado "$URL" "$PKI" researcher "$MAPPED" "$STUDY_DIR" deidentified
check "a client without a certificate is refused at the handshake" \
  out_has "^refused" "$PY" "$WEB" nocert "$URL" "$PKI"
refusal_logged() { grep -q "dicomweb:" "$E2E_TMP/devup.log" || { tail -20 "$E2E_TMP/devup.log"; return 1; }; }
check "the STOW-RS refusal is logged as a security event" refusal_logged

kill -INT "$DEV_PID"
wait "$DEV_PID" 2>/dev/null || true
e2e_finish
