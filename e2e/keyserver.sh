#!/usr/bin/env bash
# e2e: the keyserver's key flow with grpcurl over mutual TLS, one client
# certificate per identity; then the audit log is tampered with on disk and
# both VerifyAudit and the offline `keyserver audit-verify` name the entry.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

# out_has PATTERN CMD...: CMD succeeds and its output matches PATTERN (a
# here-string, not a pipe: `grep -q` closing a pipe early would fail the
# pipeline under pipefail).
SVC=tessera.keyserver.v1.KeyServer
OWNER=spiffe://tessera.local/user/owner
DB="$E2E_TMP/keyserver.redb"
KEK="$E2E_TMP/keyserver.kek"
head -c 32 /dev/urandom >"$KEK"
chmod 600 "$KEK"

write_config() { # write_config FILE KEK_FILE
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:0"

[server.tls]
ca = "$PKI/ca.crt"
cert = "$PKI/keyserver.crt"
key = "$PKI/keyserver.key"

[keyserver]
db_path = "$DB"
kek_file = "$2"
checkpoint_every = 4

[keyserver.access]
emergency = ["spiffe://tessera.local/user/clinician"]

[telemetry]
log = "info"
TOML
}
write_config "$E2E_TMP/keyserver.toml" "$KEK"

# --- the KEK file's permissions are checked before anything starts ---
LOOSE="$E2E_TMP/loose.kek"
head -c 32 /dev/urandom >"$LOOSE"
chmod 644 "$LOOSE"
write_config "$E2E_TMP/loose.toml" "$LOOSE"
kek_too_open() {
  local rc=0
  "$TESSERA_BIN_DIR/keyserver" --config "$E2E_TMP/loose.toml" >/dev/null 2>"$E2E_TMP/loose.log" || rc=$?
  [ "$rc" -eq 64 ] && grep -q "too open" "$E2E_TMP/loose.log"
}
check "a group-readable KEK file is refused (exit 64)" kek_too_open

start_service keyserver "$E2E_TMP/keyserver.toml"
ADDR=$SERVICE_ADDR
KS_PID=$SERVICE_PID
echo "keyserver on $ADDR"
wait_healthy "$ADDR" gateway "$SVC"

# --- reflection and health ---
lists_services() {
  local out
  out=$(gc gateway "$ADDR" list)
  grep -qx "$SVC" <<<"$out" && grep -qx grpc.health.v1.Health <<<"$out"
}
check "reflection lists the keyserver and health services" lists_services
describes() { out_has 'rpc ApproveRequest' gc gateway "$ADDR" describe "$SVC"; }
check "reflection describes KeyServer without proto files" describes
health_serving() {
  out_has '"SERVING"' gc "$1" "$ADDR" "${@:2}" -d "{\"service\":\"$SVC\"}" -- grpc.health.v1.Health/Check
}
check "health: SERVING" health_serving gateway
# The outsider has no role, so no reflection either: it brings the protos.
check "health needs no role (outsider)" health_serving outsider "${NO_REFLECTION[@]}"
KS_PROTO=(-import-path "$E2E_DIR/../proto" -proto tessera/keyserver/v1/keyserver.proto)

# field NAME: first string value of JSON field NAME on stdin.
field() { sed -n "s/.*\"$1\": \"\\([^\"]*\\)\".*/\\1/p" | head -n 1; }

ATTRS='[{"name":"patient_id","value":"P-0042"},{"name":"birth_date","value":"19700101"}]'
WRONG='[{"name":"patient_id","value":"P-0043"},{"name":"birth_date","value":"19700101"}]'

# --- gateway registers a study ---
STUDY=$(gc gateway "$ADDR" -d "{\"owner\":\"$OWNER\",\"attributes\":$ATTRS}" -- "$SVC/RegisterStudy" | field studyId)
check "gateway registers a study (pseudonymous id)" grep -Eq '^st-[0-9a-f]{32}$' <<<"$STUDY"
check "a clinician may not register studies" \
  expect_code PermissionDenied gc clinician "$ADDR" -d "{\"owner\":\"$OWNER\",\"attributes\":$ATTRS}" -- "$SVC/RegisterStudy"
derive() { # derive IDENTITY ATTRS [PURPOSE]
  gc "$1" "$ADDR" -d "{\"study_id\":\"$STUDY\",\"attributes\":$2,\"purpose\":\"${3:-pixels}\",\"operation\":\"OPERATION_PROTECT\"}" -- "$SVC/DeriveKey"
}
WM_KEY=$(derive watermark "$ATTRS" | field key)
check "the watermark derives the pixel key" test -n "$WM_KEY"
check "the gateway derives DICOM keys" out_has '"key"' derive gateway "$ATTRS" dicom-metadata
check "the gateway may not derive pixel keys (dicom-* only)" expect_code PermissionDenied derive gateway "$ATTRS" pixels
check "a storage node may not derive keys" expect_code PermissionDenied derive storage-1 "$ATTRS"

# --- clinician requests the key ---
request() { # request IDENTITY ATTRS
  gc "$1" "$ADDR" -d "{\"study_id\":\"$STUDY\",\"attributes\":$2,\"purpose\":\"pixels\",\"justification\":\"tumour board\"}" -- "$SVC/RequestKey"
}
check "wrong patient attributes: PermissionDenied" expect_code PermissionDenied request clinician "$WRONG"
REQ=$(request clinician "$ATTRS" | field requestId)
check "clinician's request is recorded" grep -Eq '^rq-[0-9a-f]{32}$' <<<"$REQ"
fetch() { gc "$1" "$ADDR" -d "{\"request_id\":\"$2\"}" -- "$SVC/FetchKey"; }
check "key refused while the request is pending" expect_code PermissionDenied fetch clinician "$REQ"

# --- owner lists and approves ---
lists_request() { out_has "$REQ" gc owner "$ADDR" -d '{}' -- "$SVC/ListRequests"; }
check "owner lists the pending request" lists_request
check "a clinician may not list requests" expect_code PermissionDenied gc clinician "$ADDR" -d '{}' -- "$SVC/ListRequests"
approve() { gc "$1" "$ADDR" -d "{\"request_id\":\"$2\",\"ttl_seconds\":600,\"uses\":1}" -- "$SVC/ApproveRequest"; }
check "the clinician cannot approve" expect_code PermissionDenied approve clinician "$REQ"
approved() { out_has REQUEST_STATE_APPROVED approve owner "$REQ"; }
check "owner approves (expiry 600 s, uses 1)" approved

# --- release, once, to the requester only ---
check "another clinician cannot fetch the grant" expect_code PermissionDenied fetch clinician2 "$REQ"
released() { [ "$(fetch clinician "$REQ" | field key)" = "$WM_KEY" ]; }
check "key released to the clinician (same key the watermark derived)" released
check "a second fetch is refused (uses = 1)" expect_code PermissionDenied fetch clinician "$REQ"

# --- outsider, self-approval, bad input ---
outsider_request() {
  gc outsider "$ADDR" "${KS_PROTO[@]}" \
    -d "{\"study_id\":\"$STUDY\",\"attributes\":$ATTRS,\"purpose\":\"pixels\"}" -- "$SVC/RequestKey"
}
outsider_refused() {
  local out
  out=$(expect_code PermissionDenied outsider_request) || { echo "$out"; return 1; }
  # Refused by the policy layer for this very method, not for reflection.
  out=$(outsider_request 2>&1) && return 1
  grep -q "may not call /$SVC/RequestKey" <<<"$out" || { echo "$out"; return 1; }
}
check "outsider (no role) is refused" outsider_refused
OWN=$(request owner "$ATTRS" | field requestId)
self_approval() {
  local out
  out=$(expect_code PermissionDenied approve owner "$OWN") || { echo "$out"; return 1; }
  out=$(approve owner "$OWN" 2>&1) && { echo "approved: $out"; return 1; }
  grep -q "own request" <<<"$out"
}
check "self-approval is refused" self_approval
check "malformed request id: InvalidArgument" expect_code InvalidArgument fetch clinician "../etc/passwd"
check "unknown study: NotFound" \
  expect_code NotFound gc gateway "$ADDR" -d "{\"study_id\":\"st-0123456789abcdef0123456789abcdef\",\"attributes\":$ATTRS,\"purpose\":\"dicom-pixels\"}" -- "$SVC/DeriveKey"
BIG="$E2E_TMP/big.json"
printf '{"study_id":"%s","purpose":"pixels","attributes":[{"name":"patient_id","value":"%s"}]}' \
  "$STUDY" "$(head -c 150000 /dev/zero | tr '\0' x)" >"$BIG"
oversized() { gc gateway "$ADDR" -d @ -- "$SVC/DeriveKey" <"$BIG"; }
check "oversized message: ResourceExhausted" expect_code ResourceExhausted oversized
check "revoke needs an approved grant: FailedPrecondition" \
  expect_code FailedPrecondition gc owner "$ADDR" -d "{\"request_id\":\"$OWN\"}" -- "$SVC/RevokeGrant"

# --- the gateway redeems a user's grant (no key leaves); gateway only ---
CLIN=spiffe://tessera.local/user/clinician
REQ2=$(request clinician "$ATTRS" | field requestId)
gc owner "$ADDR" -d "{\"request_id\":\"$REQ2\",\"ttl_seconds\":600,\"uses\":2}" -- "$SVC/ApproveRequest" >/dev/null
grant_call() { # grant_call IDENTITY METHOD REQUEST_ID
  gc "$1" "$ADDR" -d "{\"request_id\":\"$3\",\"on_behalf_of\":\"$CLIN\",\"study_id\":\"$STUDY\"}" -- "$SVC/$2"
}
check "a clinician may not call RedeemGrant" expect_code PermissionDenied grant_call clinician RedeemGrant "$REQ2"
check "an owner may not call CheckGrant" expect_code PermissionDenied grant_call owner CheckGrant "$REQ2"
check "the watermark service may not redeem (gateway only)" \
  expect_code PermissionDenied grant_call watermark RedeemGrant "$REQ2"
check "gateway checks the grant (2 uses left, none spent)" out_has '"usesLeft": 2' grant_call gateway CheckGrant "$REQ2"
redeemed_no_key() {
  local out
  out=$(grant_call gateway RedeemGrant "$REQ2") || return 1
  grep -q '"usesLeft": 1' <<<"$out" && ! grep -q '"key"' <<<"$out"
}
check "gateway redeems one use, no key in the answer" redeemed_no_key

# --- access that fits clinical work (issue 19): purposes, standing
# approvals, break-glass and its review, grants; wrong roles refused.
# On a second study, so the forget and tamper checks below see what they did.
STUDY_B=$(gc gateway "$ADDR" -d "{\"owner\":\"$OWNER\",\"attributes\":$ATTRS}" -- "$SVC/RegisterStudy" | field studyId)
ask() { # ask IDENTITY ACCESS_PURPOSE
  gc "$1" "$ADDR" -d "{\"study_id\":\"$STUDY_B\",\"attributes\":$ATTRS,\"purpose\":\"pixels\",\"access_purpose\":\"$2\"}" -- "$SVC/RequestKey"
}
check "an access purpose outside the vocabulary: InvalidArgument" expect_code InvalidArgument ask clinician curiosity
standing() { # standing IDENTITY
  gc "$1" "$ADDR" -d "{\"grantee_identity\":\"$CLIN\",\"access_purpose\":\"research\",\"ttl_seconds\":3600}" -- "$SVC/CreateStandingApproval"
}
check "a clinician may not create standing approvals" expect_code PermissionDenied standing clinician
SA=$(standing owner | field approvalId)
check "owner creates a standing approval" grep -Eq '^sa-[0-9a-f]{32}$' <<<"$SA"
REQ3=$(ask clinician research | field requestId)
auto_approved() { out_has "\"standingApproval\": \"$SA\"" gc owner "$ADDR" -d '{"include_decided":true}' -- "$SVC/ListRequests"; }
check "a matching request is approved by the standing approval" auto_approved
check "the clinician sees the grant (tessera grants)" out_has "$REQ3" gc clinician "$ADDR" -d '{}' -- "$SVC/ListGrants"
sa_call() { gc "$1" "$ADDR" -d "{\"approval_id\":\"$SA\"}" -- "$SVC/$2"; }
check "a clinician may not revoke a standing approval" expect_code PermissionDenied sa_call clinician RevokeStandingApproval
check "owner revokes the standing approval" out_has '"revoked": true' sa_call owner RevokeStandingApproval
check "its grant releases nothing after the revocation" expect_code PermissionDenied fetch clinician "$REQ3"
glass() { # glass IDENTITY REASON
  gc "$1" "$ADDR" -d "{\"study_id\":\"$STUDY_B\",\"attributes\":$ATTRS,\"purpose\":\"pixels\",\"reason\":\"$2\"}" -- "$SVC/BreakGlass"
}
check "break-glass without the emergency permission is refused" expect_code PermissionDenied glass clinician2 "arrest"
check "break-glass without a reason is refused" expect_code InvalidArgument glass clinician ""
BG=$(glass clinician "cardiac arrest, owner unreachable" | field requestId)
check "break-glass opens the study at once" grep -Eq '^rq-[0-9a-f]{32}$' <<<"$BG"
check "a clinician may not list break-glass uses" expect_code PermissionDenied gc clinician "$ADDR" -d '{}' -- "$SVC/ListBreakGlass"
check "the owner's review list shows it" out_has "$BG" gc owner "$ADDR" -d '{}' -- "$SVC/ListBreakGlass"
review() { gc "$1" "$ADDR" -d "{\"request_id\":\"$BG\"}" -- "$SVC/MarkReviewed"; }
check "a clinician may not mark it reviewed" expect_code PermissionDenied review clinician
check "the owner marks it reviewed" out_has '"reviewedBy"' review owner
check "a storage node may not watch requests" \
  expect_code PermissionDenied gc storage-1 "$ADDR" -d '{"as_owner":true}' -- "$SVC/WatchRequests"

# --- the gateway forgets the study (crypto-shredding) ---
forget() { gc "$1" "$ADDR" -d "{\"study_id\":\"$STUDY\",\"on_behalf_of\":\"$OWNER\"}" -- "$SVC/ForgetStudy"; }
check "an owner may not call ForgetStudy directly" expect_code PermissionDenied forget owner
# Two approved grants (REQ used up, REQ2) are revoked; OWN (pending) is denied.
check "gateway forgets the study: 2 grants revoked" out_has '"grantsRevoked": 2' forget gateway
derive_deleted() {
  local out
  out=$(expect_code NotFound derive watermark "$ATTRS") || { echo "$out"; return 1; }
  out=$(derive watermark "$ATTRS" 2>&1) && return 1
  grep -q "was deleted" <<<"$out" || { echo "$out"; return 1; }
}
check "after ForgetStudy, DeriveKey: NotFound (study was deleted)" derive_deleted
check "after ForgetStudy, RequestKey: NotFound" expect_code NotFound request clinician "$ATTRS"
check "the redeemed grant is revoked" expect_code PermissionDenied grant_call gateway RedeemGrant "$REQ2"
check "a second ForgetStudy: NotFound" expect_code NotFound forget gateway
check "the forgotten study id cannot be registered again" \
  expect_code AlreadyExists gc gateway "$ADDR" -d "{\"owner\":\"$OWNER\",\"attributes\":$ATTRS,\"study_id\":\"$STUDY\"}" -- "$SVC/RegisterStudy"

# --- audit ---
verify() { gc owner "$ADDR" -d '{}' -- "$SVC/VerifyAudit"; }
audit_ok() { out_has '"ok": true' verify; }
check "VerifyAudit: the chain and its signed checkpoints verify" audit_ok
audit_has_events() {
  local out
  out=$(gc owner "$ADDR" -d '{"from_seq":1,"limit":1000}' -- "$SVC/ListAudit") || return 1
  grep -q '"event": "grant.redeemed"' <<<"$out" && grep -q '"event": "study.forgotten"' <<<"$out" &&
    grep -q '"event": "redeem.refused"' <<<"$out"
}
check "the audit log records the redemption, the refusal and the forget" audit_has_events
check "a clinician may not read the audit" expect_code PermissionDenied gc clinician "$ADDR" -d '{}' -- "$SVC/VerifyAudit"
APPROVAL_SEQ=$(gc owner "$ADDR" -d '{"from_seq":1,"limit":1000}' -- "$SVC/ListAudit" |
  python3 -c 'import json,sys; print(next(e["seq"] for e in json.load(sys.stdin)["entries"] if e["event"]=="grant.approved"))')
echo "the approval is audit entry $APPROVAL_SEQ"

# --- tamper: stop, flip one byte inside the approval record, restart ---
kill "$KS_PID"
wait "$KS_PID" 2>/dev/null || true
OFFSETS=$(grep -boa 'grant\.approved' "$DB" | cut -d: -f1)
check "the approval record is on disk in plain text" test -n "$OFFSETS"
for off in $OFFSETS; do
  # 'grant.approved' -> 'grant.approveD': one byte, inside the record payload.
  printf 'D' | dd of="$DB" bs=1 seek=$((off + 13)) conv=notrunc status=none
done
offline_names_entry() {
  local out rc=0
  out=$("$TESSERA_BIN_DIR/keyserver" audit-verify --db "$DB" --kek-file "$KEK") || rc=$?
  echo "$out"
  [ "$rc" -eq 1 ] && grep -q "\"firstBrokenSeq\":$APPROVAL_SEQ," <<<"$out"
}
check "offline audit-verify names entry $APPROVAL_SEQ (exit 1)" offline_names_entry

start_service keyserver "$E2E_TMP/keyserver.toml"
ADDR=$SERVICE_ADDR
KS_PID=$SERVICE_PID
wait_healthy "$ADDR" gateway "$SVC"
online_names_entry() {
  local out
  out=$(verify)
  echo "$out"
  grep -q '"firstBrokenSeq": "'"$APPROVAL_SEQ"'"' <<<"$out" && ! grep -q '"ok": true' <<<"$out"
}
check "after restart, VerifyAudit reports entry $APPROVAL_SEQ broken" online_names_entry
register() { gc gateway "$ADDR" -d "{\"owner\":\"$OWNER\",\"attributes\":$ATTRS}" -- "$SVC/RegisterStudy"; }
fails_closed() {
  local out
  out=$(expect_code FailedPrecondition register) || { echo "$out"; return 1; }
  out=$(register 2>&1) && return 1
  grep -q "entry $APPROVAL_SEQ" <<<"$out" || { echo "$out"; return 1; }
}
check "while the chain is broken, key operations fail closed (FailedPrecondition, entry $APPROVAL_SEQ)" fails_closed

# --- recovery: the documented, audited administrator command ---
kill "$KS_PID"
wait "$KS_PID" 2>/dev/null || true
recover() { "$TESSERA_BIN_DIR/keyserver" --config "$E2E_TMP/keyserver.toml" audit-recover --acknowledge-broken-at "$1"; }
recover_other() { ! recover $((APPROVAL_SEQ + 1)); }
check "audit-recover refuses another entry than the first broken one" recover_other
check "audit-recover acknowledges entry $APPROVAL_SEQ" out_has '"ok":true' recover "$APPROVAL_SEQ"
start_service keyserver "$E2E_TMP/keyserver.toml"
ADDR=$SERVICE_ADDR
KS_PID=$SERVICE_PID
wait_healthy "$ADDR" gateway "$SVC"
check "after recovery, VerifyAudit is ok" audit_ok
check "after recovery, key operations work again" out_has studyId register

e2e_finish
