#!/usr/bin/env bash
# e2e: DICOM TLS (PS3.15 Annex B, issue 18) with dcmtk's storescu, findscu
# and getscu (+tls) against `tessera dev up`'s `dicom.scp.tls_listen`: the
# peer is its client certificate's identity (the SPIFFE id, as over gRPC),
# whatever its calling AE title. Stored, found and retrieved with the
# clinician's certificate (byte-identical data sets, the grant spent);
# refused without a grant; no certificate, another CA's certificate or
# plain DICOM on the TLS port refused at the handshake (the gateway logs
# each as a security event, `rpc = dicom:A-ASSOCIATE`; `dev up` keeps no
# log: services/gateway/tests/dicom_tls_log.rs asserts those entries).
# dcmtk's getscu has no TLS: C-GET is
# pynetdicom's, with an ssl context.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init
DCMDUMP=$(command -v dcmdump) || { echo "dcmtk missing: apt-get install -y dcmtk (./x e2e installs it)" >&2; exit 1; }
DCMTK=$(dirname "$DCMDUMP")
"$DCMTK/findscu" --help 2>&1 | grep -q -- "--enable-tls" || { echo "this dcmtk has no TLS (+tls)" >&2; exit 1; }

T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
PY="${PYTHON:-python3}"
TOOL="$(dirname "$0")/dicom_tool.py"

dev_up "$DIR"
PKI="$DIR/pki"
GW=$(ep gateway)
KS=$(ep keyserver)
DTLS=$(ep dicom-tls)
[ -n "$DTLS" ] || { echo "no dicom-tls endpoint in $DIR/endpoints.toml" >&2; exit 1; }
HOST=${DTLS%:*}
PORT=${DTLS##*:}
# tls WHO: dcmtk's TLS options with WHO's key and certificate, the dev CA.
tlsopts() { echo "+tls $PKI/$1.key $PKI/$1.crt +cf $PKI/ca.crt"; }

STUDY_DIR="$E2E_TMP/study"
STUDY_UID=$("$PY" "$TOOL" make-study "$STUDY_DIR")
rm "$STUDY_DIR/im5.dcm"
# C-GET and C-STORE over TLS: pynetdicom with an ssl context (dcmtk's
# getscu has no +tls; dcmtk's storescu re-encodes what it sends, so the
# byte-identical check needs pynetdicom's), the certificate named by
# E2E_DICOM_TLS.
QR="$(dirname "$0")/dicom_qr_tool.py"
as_tls() { E2E_DICOM_TLS="$PKI/ca.crt:$PKI/$1.crt:$PKI/$1.key" "${@:2}"; }
check "C-STORE over TLS (the clinician's certificate, calling AE STORESCU) stores the 4-instance study" \
  out_has "^4 stored" as_tls clinician "$PY" "$QR" cstore "$HOST" "$PORT" STORESCU "$STUDY_DIR"

# shellcheck disable=SC2046
find_as() { "$DCMTK/findscu" -v -S $(tlsopts "$1") -aet ANYTITLE -aec TESSERA "$HOST" "$PORT" \
  -k QueryRetrieveLevel=STUDY -k PatientID=E2E-MRN-90417 -k StudyInstanceUID 2>&1; }
found() { local out; out=$(find_as clinician); grep -q "$STUDY_UID" <<<"$out" || { echo "$out"; return 1; }; }
check "findscu +tls as the clinician (any calling AE title) finds the study" found
nothing() { local out; out=$(find_as clinician2); ! grep -q "$STUDY_UID" <<<"$out" && grep -q "Final Find Response (Success)" <<<"$out" || { echo "$out"; return 1; }; }
check "findscu +tls as clinician2 (no standing) hears nothing of the study" nothing

check "C-GET over TLS without a grant: 0x0124 naming tessera request-key, nothing received" \
  out_has "^0x0124 0 .*request-key" as_tls clinician "$PY" "$QR" cget-status "$HOST" "$PORT" ANYTITLE "$STUDY_UID"

HANDLE=$(gc clinician "$GW" -d "{\"owner\":\"spiffe://tessera.local/user/owner\",\"patient_id\":\"E2E-MRN-90417\",\"study_instance_uid\":\"$STUDY_UID\"}" \
  -- tessera.gateway.v1.Gateway/FindDicomStudy | sed -n 's/.*"studyHandle": "\(.*\)".*/\1/p')
RID=$(gc clinician "$GW" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"e2e tls\"}" -- tessera.gateway.v1.Gateway/RequestAccess |
  sed -n 's/.*"requestId": "\(.*\)".*/\1/p' | head -n 1)
gc owner "$KS" -d "{\"request_id\":\"$RID\",\"ttl_seconds\":600,\"uses\":1}" -- tessera.keyserver.v1.KeyServer/ApproveRequest >/dev/null

check "C-GET over TLS with a grant: 4 data sets byte-identical to those sent" \
  as_tls clinician "$PY" "$QR" cget "$HOST" "$PORT" ANYTITLE "$STUDY_UID" "$STUDY_DIR" identical 4
check "the one-use grant is spent: a second C-GET over TLS is refused" \
  out_has "^0x0124 0 " as_tls clinician "$PY" "$QR" cget-status "$HOST" "$PORT" ANYTITLE "$STUDY_UID"
check "the same C-GET over TLS with clinician2's certificate matches nothing (no standing): nothing sent" \
  out_has "^0x0000 0 " as_tls clinician2 "$PY" "$QR" cget-status "$HOST" "$PORT" VIEWER "$STUDY_UID"

# dcmtk's storescu +tls: one more instance (a copy under a new SOP UID).
cp "$STUDY_DIR/im1.dcm" "$E2E_TMP/extra.dcm"
"$DCMTK/dcmodify" -nb -m "SOPInstanceUID=$STUDY_UID.91" "$E2E_TMP/extra.dcm" >/dev/null
# shellcheck disable=SC2046
check "dcmtk storescu +tls (the clinician's certificate) stores an instance" \
  "$DCMTK/storescu" $(tlsopts clinician) -aet STORESCU -aec TESSERA "$HOST" "$PORT" "$E2E_TMP/extra.dcm"
# shellcheck disable=SC2046
store_refused() { local out; out=$("$DCMTK/storescu" -v $(tlsopts clinician) -aet ANYTITLE -aec TESSERA "$HOST" "$PORT" "$E2E_TMP/extra.dcm" 2>&1); grep -q "Status: 0x0*124" <<<"$out" || { echo "$out"; return 1; }; }
check "a calling AE title not in allowed_calling_aes may not C-STORE, certificate or not (0x0124)" store_refused

# --- who may associate ---
no_assoc() { local out; out=$("$@" 2>&1) && { echo "associated: $out"; return 1; }; ! grep -q "$STUDY_UID" <<<"$out"; }
# shellcheck disable=SC2086
check "findscu +tla (TLS without a client certificate) is refused" \
  no_assoc "$DCMTK/findscu" -S +tla +cf "$PKI/ca.crt" -aet ANYTITLE -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=STUDY -k PatientID=E2E-MRN-90417
"$T" pki init --dir "$E2E_TMP/other-pki" >/dev/null
check "findscu +tls with a clinician certificate of another CA is refused" \
  no_assoc "$DCMTK/findscu" -S +tls "$E2E_TMP/other-pki/clinician.key" "$E2E_TMP/other-pki/clinician.crt" +cf "$PKI/ca.crt" \
  -aet ANYTITLE -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=STUDY -k PatientID=E2E-MRN-90417
check "plain DICOM (no TLS) on the TLS port is refused" \
  no_assoc "$DCMTK/findscu" -S -aet VIEWER -aec TESSERA "$HOST" "$PORT" -k QueryRetrieveLevel=STUDY -k PatientID=E2E-MRN-90417
kill -INT "$DEV_PID"
wait "$DEV_PID" 2>/dev/null || true
e2e_finish
