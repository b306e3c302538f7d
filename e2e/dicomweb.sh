#!/usr/bin/env bash
# e2e: DICOMweb on the gateway (issue 18) with a client nobody here wrote:
# dicomweb-client (PyPI) over mutual TLS with the dev PKI's certificates.
# STOW-RS as the owner (two studies); QIDO-RS at study, series and
# instance level finds them for a delegate (clinician), nothing for
# clinician2 until a grant, then only the granted study; WADO-RS refused
# (403, naming tessera request-key) without a grant, byte-identical with one,
# for a researcher byte-identical to RetrieveDicom's de-identified files; no
# certificate or one of another CA refused at the handshake, an identity
# without a role 403; a STOW-RS body over [dicomweb] max_request_bytes 413;
# the refusals counted on the gateway's /metrics. With [dicom]
# file_requests on: the refused WADO-RS files an access request for the
# caller (named in the 403, not filed twice while pending), which the owner
# approves. WADO-RS /metadata (dicomweb-client retrieve_*_metadata): refused
# without a grant; with one, every attribute of the files the retrieve
# sends (Patient ID for the clinician, de-identified for the researcher),
# no use spent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init
T="$TESSERA_BIN_DIR/tessera"
DIR="$E2E_TMP/dev"
PY="${PYTHON:-python3}"
TOOL="$(dirname "$0")/dicom_tool.py"
WEB="$(dirname "$0")/dicomweb_tool.py"

MAX_BYTES=$((1 << 20))
TESSERA_DEV_DICOMWEB_MAX_REQUEST_BYTES=$MAX_BYTES TESSERA_DEV_DICOM_FILE_REQUESTS=1 dev_up "$DIR"
PKI="$DIR/pki"
GW=$(ep gateway)
KS=$(ep keyserver)
URL="https://$(ep dicomweb)"
check "dev up records the DICOMweb endpoint" test "$URL" != "https://"
FORBIDDEN=0   # 403s asked for below, counted on /metrics at the end
count_of() { # count_of N UID CMD...: CMD prints exactly N lines, every one naming UID
  local n=$1 uid=$2 out
  shift 2
  out=$("$@") || { echo "$out"; return 1; }
  [ "$(grep -c . <<<"$out")" -eq "$n" ] && [ "$(grep -c -- "${uid:-.}" <<<"$out")" -eq "$n" ] || { echo "$out"; return 1; }
}

# A 4-instance CT study (uncompressed), stored over STOW-RS by the owner.
STUDY_DIR="$E2E_TMP/study"
STUDY_UID=$("$PY" "$TOOL" make-study "$STUDY_DIR")
rm "$STUDY_DIR/im5.dcm"
check "STOW-RS as the owner: 4 instances in ReferencedSOPSequence" \
  out_has "^4$" "$PY" "$WEB" stow "$URL" "$PKI" owner "$STUDY_DIR"
check "STOW-RS as a researcher: refused (403)" \
  out_has "^403 " "$PY" "$WEB" stow "$URL" "$PKI" researcher "$STUDY_DIR"
FORBIDDEN=$((FORBIDDEN + 1))
OTHER_UID=$("$PY" "$WEB" relabel "$STUDY_DIR" "$E2E_TMP/other" E2E-MRN-OTHER)
check "STOW-RS a second study of the owner" \
  out_has "^4$" "$PY" "$WEB" stow "$URL" "$PKI" owner "$E2E_TMP/other"
PARTIAL_UID=$("$PY" "$WEB" relabel "$STUDY_DIR" "$E2E_TMP/partial" E2E-MRN-PARTIAL)
BAD_SOP=$("$PY" -c 'import pydicom, sys; print(pydicom.dcmread(sys.argv[1]).SOPInstanceUID)' "$E2E_TMP/partial/im2.dcm")
partial() {
  local out
  out=$("$PY" "$WEB" stow-partial "$URL" "$PKI" owner "$E2E_TMP/partial/im1.dcm" "$E2E_TMP/partial/im2.dcm") || return 1
  [ "$(sed -n 1p <<<"$out")" = 202 ] && [ "$(sed -n 2p <<<"$out")" = 1 ] &&
    [ "$(grep -c '^FAILED' <<<"$out")" -eq 1 ] && grep -qE "^FAILED $BAD_SOP [0-9]+$" <<<"$out" || { echo "$out"; return 1; }
}
check "STOW-RS one whole and one cut-short instance: 202, the cut one in FailedSOPSequence with a FailureReason" partial
check "the instance stored by the partial STOW-RS is findable" \
  count_of 1 "$PARTIAL_UID" "$PY" "$WEB" qido-instances "$URL" "$PKI" owner study="$PARTIAL_UID"

check "QIDO-RS as clinician (a delegate) finds the study by PatientID" \
  out_has "$STUDY_UID E2E-MRN-90417" "$PY" "$WEB" qido "$URL" "$PKI" clinician PatientID=E2E-MRN-90417
check "QIDO-RS by a PatientName wildcard" \
  out_has "$STUDY_UID" "$PY" "$WEB" qido "$URL" "$PKI" clinician "PatientName=TESSERAE*"
none() { local out; out=$("$PY" "$WEB" qido "$URL" "$PKI" "$@"); ! grep -q -e "$STUDY_UID" -e E2E-MRN <<<"$out" || { echo "$out"; return 1; }; }
check "QIDO-RS: a date range outside the study matches nothing" none clinician StudyDate=19000101-19000102
check "QIDO-RS as clinician2 (no delegate, no grant): nothing of the study" none clinician2
check "QIDO-RS /series as clinician: the study's one series" \
  count_of 1 "$STUDY_UID" "$PY" "$WEB" qido-series "$URL" "$PKI" clinician StudyInstanceUID="$STUDY_UID"
check "QIDO-RS /studies/{uid}/instances as clinician: its 4 instances" \
  count_of 4 "$STUDY_UID" "$PY" "$WEB" qido-instances "$URL" "$PKI" clinician study="$STUDY_UID"
check "QIDO-RS /instances as clinician: the three studies' 9 instances" \
  count_of 9 "" "$PY" "$WEB" qido-instances "$URL" "$PKI" clinician
check "QIDO-RS /instances as clinician2: nothing" \
  count_of 0 "" "$PY" "$WEB" qido-instances "$URL" "$PKI" clinician2
check "QIDO-RS /studies/{uid}/series as clinician2: nothing" \
  count_of 0 "" "$PY" "$WEB" qido-series "$URL" "$PKI" clinician2 study="$STUDY_UID"
check "QIDO-RS as outsider (our CA, no role): 403" \
  out_has "^403 .*no Tessera role" "$PY" "$WEB" get "$URL" "$PKI" outsider /studies
FORBIDDEN=$((FORBIDDEN + 1))
REFUSED=$("$PY" "$WEB" status "$URL" "$PKI" clinician "$STUDY_UID")
FILED=$(grep -o 'rq-[0-9a-f]\{32\}' <<<"$REFUSED" | head -n 1)
check "WADO-RS without a grant: 403 naming the access request filed for the caller and tessera approve" \
  grep -q "^403 .*access request $FILED was filed on your behalf.*tessera approve $FILED" <<<"$REFUSED"
FORBIDDEN=$((FORBIDDEN + 1))
check "WADO-RS /metadata without a grant: 403, the same request still pending (no second one)" \
  out_has "^403 .*$FILED filed on your behalf earlier is still pending" "$PY" "$WEB" get "$URL" "$PKI" clinician "/studies/$STUDY_UID/metadata"
FORBIDDEN=$((FORBIDDEN + 1))

HANDLE=$(gc clinician "$GW" -d "{\"owner\":\"spiffe://tessera.local/user/owner\",\"patient_id\":\"E2E-MRN-90417\",\"study_instance_uid\":\"$STUDY_UID\"}" \
  -- tessera.gateway.v1.Gateway/FindDicomStudy | sed -n 's/.*"studyHandle": "\(.*\)".*/\1/p')
one_pending() { # the owner's pending requests on the study: exactly the filed one, for the clinician
  local out
  out=$(gc owner "$KS" -d "{\"study_id\":\"$HANDLE\"}" -- tessera.keyserver.v1.KeyServer/ListRequests) || return 1
  [ "$(grep -c '"requestId"' <<<"$out")" -eq 1 ] && grep -q "\"requestId\": \"$FILED\"" <<<"$out" &&
    grep -q '"requester": "spiffe://tessera.local/user/clinician"' <<<"$out" || { echo "$out"; return 1; }
}
check "the owner lists one pending request on the study: the filed one, by the clinician" one_pending
gc owner "$KS" -d "{\"request_id\":\"$FILED\",\"ttl_seconds\":600,\"uses\":2}" -- tessera.keyserver.v1.KeyServer/ApproveRequest >/dev/null
# /metadata under the grant (checked, not spent): every level, what the
# stored files hold (Patient ID included), no Pixel Data.
for level in study series instance; do
  check "dicomweb-client retrieve_${level}_metadata as clinician: the stored files' attributes and Patient ID" \
    out_has "^PatientID=E2E-MRN-90417$" "$PY" "$WEB" metadata "$URL" "$PKI" clinician "$level" "$STUDY_DIR"
done
grant() { # grant WHO USES -> request id, approved
  local rid
  rid=$(gc "$1" "$GW" -d "{\"study_handle\":\"$HANDLE\",\"justification\":\"e2e dicomweb\"}" -- tessera.gateway.v1.Gateway/RequestAccess |
    sed -n 's/.*"requestId": "\(.*\)".*/\1/p' | head -n 1)
  gc owner "$KS" -d "{\"request_id\":\"$rid\",\"ttl_seconds\":600,\"uses\":$2}" -- tessera.keyserver.v1.KeyServer/ApproveRequest >/dev/null
  echo "$rid"
}
check "WADO-RS with a grant: 4 parts byte-identical (sha256) to the files stored" \
  out_has "^4$" "$PY" "$WEB" wado-raw "$URL" "$PKI" clinician "$STUDY_UID" "$STUDY_DIR"
check "dicomweb-client retrieve_study: the 4 data sets sent" \
  out_has "^4$" "$PY" "$WEB" wado "$URL" "$PKI" clinician "$STUDY_UID" "$STUDY_DIR" identical
check "the grant's 2 uses are spent (not by /metadata): 403 again" \
  out_has "^403 " "$PY" "$WEB" status "$URL" "$PKI" clinician "$STUDY_UID"
FORBIDDEN=$((FORBIDDEN + 1))
check "WADO-RS /metadata with the grant spent: 403" \
  out_has "^403 " "$PY" "$WEB" get "$URL" "$PKI" clinician "/studies/$STUDY_UID/metadata"
FORBIDDEN=$((FORBIDDEN + 1))

# clinician2 (not a delegate) granted the first study: QIDO-RS finds it at
# every level, and still nothing of the second.
grant clinician2 1 >/dev/null
check "QIDO-RS as clinician2 with a grant: the granted study only" \
  count_of 1 "$STUDY_UID" "$PY" "$WEB" qido "$URL" "$PKI" clinician2
check "QIDO-RS /series as clinician2 with a grant: the granted study's series only" \
  count_of 1 "$STUDY_UID" "$PY" "$WEB" qido-series "$URL" "$PKI" clinician2
check "QIDO-RS /instances as clinician2 with a grant: the granted study's 4 only" \
  count_of 4 "$STUDY_UID" "$PY" "$WEB" qido-instances "$URL" "$PKI" clinician2
check "QIDO-RS as clinician2: the ungranted study by its UID matches nothing" \
  count_of 0 "" "$PY" "$WEB" qido-instances "$URL" "$PKI" clinician2 study="$OTHER_UID"

RRID=$(grant researcher 3)
MAPPED=$("$PY" "$WEB" qido "$URL" "$PKI" researcher | awk '{print $1}' | head -n 1)
check "QIDO-RS as researcher: the study under a mapped UID, no Patient ID" \
  test "${MAPPED#2.25.}" != "$MAPPED" -a "$MAPPED" != "$STUDY_UID"
check "WADO-RS as researcher: 4 de-identified data sets" \
  out_has "^4$" "$PY" "$WEB" wado "$URL" "$PKI" researcher "$MAPPED" "$STUDY_DIR" deidentified
retrieve_res() { gc researcher "$GW" -max-msg-sz 8388608 -d "{\"study_handle\":\"$HANDLE\",\"key_request_id\":\"$RRID\"}" \
  -- tessera.gateway.v1.Gateway/RetrieveDicom >"$E2E_TMP/res.json"; }
check "researcher: RetrieveDicom (gRPC) streams the de-identified study" retrieve_res
# /metadata spends nothing: the grant's third use is left for wado-same.
res_meta() { # the researcher's study metadata: RetrieveDicom's de-identified files, no original Patient ID
  local out
  out=$("$PY" "$WEB" metadata "$URL" "$PKI" researcher study "$E2E_TMP/res.json") || { echo "$out"; return 1; }
  [ "$(sed -n 1p <<<"$out")" = 4 ] && ! grep -q "E2E-MRN-90417" <<<"$out" || { echo "$out"; return 1; }
}
check "retrieve_study_metadata as researcher: RetrieveDicom's de-identified attributes, not the Patient ID" res_meta
check "retrieve_instance_metadata as researcher: one de-identified instance (the grant's last use still there for the next check)" \
  out_has "^1$" "$PY" "$WEB" metadata "$URL" "$PKI" researcher instance "$E2E_TMP/res.json"
check "WADO-RS as researcher: byte-identical to RetrieveDicom's de-identified files" \
  out_has "^4$" "$PY" "$WEB" wado-same "$URL" "$PKI" researcher "$MAPPED" "$E2E_TMP/res.json"
check "a client without a certificate is refused at the handshake" \
  out_has "^refused" "$PY" "$WEB" nocert "$URL" "$PKI"
"$T" pki init --dir "$E2E_TMP/other-pki" >/dev/null
check "a clinician certificate of another CA is refused at the handshake" \
  out_has "^refused" "$PY" "$WEB" foreign "$URL" "$PKI" "$E2E_TMP/other-pki" clinician

# Over [dicomweb] max_request_bytes: 413, whether the Content-Length says so
# (refused before the body is read) or a chunked body grows past it.
BIG="$E2E_TMP/big.bin"
head -c $((MAX_BYTES + 4096)) /dev/zero >"$BIG"
post_big() { # post_big [curl flags...] -> the HTTP status
  curl -sS -o "$E2E_TMP/big.out" -w '%{http_code}' --max-time 30 --cacert "$PKI/ca.crt" \
    --cert "$PKI/owner.crt" --key "$PKI/owner.key" "$@" \
    -H 'Content-Type: multipart/related; type="application/dicom"; boundary=b0' \
    --data-binary @"$BIG" "$URL/studies"
}
check "STOW-RS over max_request_bytes (Content-Length): 413" out_has "^413$" post_big
check "STOW-RS over max_request_bytes (chunked): 413" out_has "^413$" post_big -H "Transfer-Encoding: chunked"

ADMIN=$(sed -n "/^\[admin\]/,/^\[/s/^gateway = \"\(.*\)\"/\1/p" "$DIR/endpoints.toml")
metric_is() { # metric_is NAME VALUE: the gateway's /metrics says so
  local body
  body=$(curl -sS --max-time 10 "http://$ADMIN/metrics") || return 1
  grep -qx "$1 $2" <<<"$body" || { grep "^$1" <<<"$body"; echo "expected $1 $2"; return 1; }
}
check "/metrics counts the $FORBIDDEN refusals (403)" metric_is tessera_dicomweb_forbidden_total "$FORBIDDEN"
check "/metrics counts the 2 oversize requests (413)" metric_is tessera_dicomweb_too_large_total 2

kill -INT "$DEV_PID"
wait "$DEV_PID" 2>/dev/null || true
e2e_finish
