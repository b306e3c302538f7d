#!/usr/bin/env bash
# e2e: two keyserver replicas sharing one PostgreSQL database (decision 24).
# A real PostgreSQL server (Debian's package, ./x installs it) on a private
# socket folder; keyservers A and B with the same KEK and database.
#   - B, started second, loads A's master secret and audit signing key;
#   - a single-use grant fetched from A and B at once is released once;
#   - registrations sent to both at once, A killed -9 mid-burst: every
#     acknowledged study is in the database, B keeps serving;
#   - the audit chain verifies (VerifyAudit on B and the offline
#     `keyserver audit-verify` on the database), seqs contiguous;
#   - the database gone: B answers UNAVAILABLE, nothing is released, and
#     the grant is still there once the database is back.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

SVC=tessera.keyserver.v1.KeyServer
OWNER=spiffe://tessera.local/user/owner
field() { sed -n "s/.*\"$1\": \"\\([^\"]*\\)\".*/\\1/p" | head -n 1; }
attrs() { printf '[{"name":"patient_id","value":"%s"},{"name":"birth_date","value":"19700101"}]' "$1"; }
kill9() { kill -9 "$1"; wait "$1" 2>/dev/null || [ $? -eq 137 ]; }
sql() { psql -X -A -t -q -h "$PG_DIR/sock" -p 5432 -U postgres -d keyserver -c "$1"; }

start_postgres
psql -X -q -h "$PG_DIR/sock" -p 5432 -U postgres -d postgres -c 'CREATE DATABASE keyserver' >/dev/null
KS_URL_FILE="$E2E_TMP/ks-pg.url"
printf 'host=%s/sock port=5432 user=postgres dbname=keyserver\n' "$PG_DIR" >"$KS_URL_FILE"
chmod 600 "$KS_URL_FILE"
KEK="$E2E_TMP/keyserver.kek"
head -c 32 /dev/urandom >"$KEK"; chmod 600 "$KEK"
{ printf '[server]\nlisten = "127.0.0.1:0"\n'; tls server.tls keyserver
  printf '[keyserver]\nkek_file = "%s"\ncheckpoint_every = 5\n' "$KEK"
  printf '[keyserver.store]\nbackend = "postgres"\npostgres_url_file = "%s"\n' "$KS_URL_FILE"
  printf '[server.access]\nroles = { "spiffe://tessera.local/user/researcher" = ["researcher", "admin"] }\n'
} >"$E2E_TMP/keyserver.toml"

start_service keyserver "$E2E_TMP/keyserver.toml"; A=$SERVICE_ADDR; PID_A=$SERVICE_PID
start_service keyserver "$E2E_TMP/keyserver.toml"; B=$SERVICE_ADDR; PID_B=$SERVICE_PID
wait_healthy "$A" gateway "$SVC"
wait_healthy "$B" gateway "$SVC"
check "the database holds the state: no redb file, ks_ tables" \
  bash -c "! ls '$E2E_TMP'/*.redb 2>/dev/null && [ \"\$(psql -X -A -t -h '$PG_DIR/sock' -U postgres -d keyserver -c \"SELECT count(*) FROM ks_masters\")\" = 1 ]"
same_key() {
  local a b
  a=$(gc researcher "$A" -d '{}' -- "$SVC/VerifyAudit" | field auditPublicKey)
  b=$(gc researcher "$B" -d '{}' -- "$SVC/VerifyAudit" | field auditPublicKey)
  [ -n "$a" ] && [ "$a" = "$b" ]
}
check "both replicas sign with one audit key (the second loaded the first's)" same_key

register() { # register ADDR PATIENT: prints the study id
  gc gateway "$1" -d "{\"owner\":\"$OWNER\",\"attributes\":$(attrs "$2")}" -- "$SVC/RegisterStudy" | field studyId
}

# --- a single-use grant fetched from both replicas at once ---
STUDY=$(register "$A" P-GRANT)
REQ=$(gc clinician "$B" -d "{\"study_id\":\"$STUDY\",\"attributes\":$(attrs P-GRANT),\"purpose\":\"pixels\",\"justification\":\"tumour board\"}" \
  -- "$SVC/RequestKey" | field requestId)
gc owner "$A" -d "{\"request_id\":\"$REQ\",\"ttl_seconds\":600,\"uses\":1}" -- "$SVC/ApproveRequest" >/dev/null
fetch() { gc clinician "$1" -d "{\"request_id\":\"$REQ\"}" -- "$SVC/FetchKey"; }
FETCHES=()
for r in A1 B1 A2 B2; do
  addr=$A; [ "${r:0:1}" = B ] && addr=$B
  (fetch "$addr" >"$E2E_TMP/fetch.$r.out" 2>&1 || true) &
  FETCHES+=($!)
done
wait "${FETCHES[@]}" # (a bare `wait` would wait for the keyservers too)
released_once() {
  local n
  n=$(grep -l '"key"' "$E2E_TMP"/fetch.*.out | wc -l)
  [ "$n" -eq 1 ] || { echo "$n of 4 concurrent fetches released the key"; cat "$E2E_TMP"/fetch.*.out; return 1; }
  [ "$(grep -l PermissionDenied "$E2E_TMP"/fetch.*.out | wc -l)" -eq 3 ]
}
check "a single-use grant fetched 4 times at once from A and B: released exactly once" released_once

# --- registrations to both at once, A killed -9 mid-burst ---
: >"$E2E_TMP/acked.txt"
burst() { # burst ADDR TAG N: N registrations; acknowledged ids to acked.txt
  local i id
  for i in $(seq 1 "$3"); do
    if id=$(register "$1" "P-$2-$i" 2>/dev/null) && [ -n "$id" ]; then echo "$id" >>"$E2E_TMP/acked.txt"; fi
  done
}
burst "$A" a1 40 & BA1=$!; burst "$A" a2 40 & BA2=$!
burst "$B" b1 25 & BB1=$!; burst "$B" b2 25 & BB2=$!
for _ in $(seq 1 300); do [ "$(wc -l <"$E2E_TMP/acked.txt")" -ge 20 ] && break; sleep 0.1; done
kill9 "$PID_A"
wait "$BA1" "$BA2" "$BB1" "$BB2" || true
ACKED=$(wc -l <"$E2E_TMP/acked.txt")
echo "acknowledged registrations: $ACKED (A killed -9 after 20)"
check "B's bursts all acknowledged while A died" test "$ACKED" -ge 50
none_lost() {
  local id missing=0
  while read -r id; do
    [ "$(sql "SELECT count(*) FROM ks_studies WHERE key = '$id'")" = 1 ] || { echo "lost: $id"; missing=1; }
  done <"$E2E_TMP/acked.txt"
  [ "$missing" -eq 0 ]
}
check "every acknowledged registration is in the database" none_lost
check "B still serves after A's death" wait_healthy "$B" gateway "$SVC"

# --- the chain ---
verifies() { out_has '"ok": true' gc researcher "$B" -d '{}' -- "$SVC/VerifyAudit"; }
check "VerifyAudit on B: the chain written by both replicas verifies" verifies
contiguous() {
  local n max
  n=$(sql "SELECT count(*) FROM ks_audit"); max=$(sql "SELECT max(key) FROM ks_audit")
  [ "$n" = "$max" ] || { echo "$n entries, last seq $max"; return 1; }
}
check "audit seqs unique and contiguous (1..N)" contiguous
one_release() {
  local n
  n=$(gc researcher "$B" -d '{"from_seq":1,"limit":1000}' -- "$SVC/ListAudit" | grep -c '"event": "key.released"')
  [ "$n" -eq 1 ] || { echo "$n key.released entries"; return 1; }
}
check "the audit log holds one key.released for the grant" one_release

# --- the database goes away: fail closed ---
STUDY2=$(register "$B" P-DOWN)
REQ2=$(gc clinician "$B" -d "{\"study_id\":\"$STUDY2\",\"attributes\":$(attrs P-DOWN),\"purpose\":\"pixels\",\"justification\":\"x\"}" \
  -- "$SVC/RequestKey" | field requestId)
gc owner "$B" -d "{\"request_id\":\"$REQ2\",\"ttl_seconds\":600,\"uses\":1}" -- "$SVC/ApproveRequest" >/dev/null
BEFORE=$(sql "SELECT count(*) FROM ks_audit")
pg_tool pg_ctl -D "$PG_DIR/data" -m immediate -w stop >/dev/null
REQ=$REQ2
check "database stopped: FetchKey on B is UNAVAILABLE" expect_code Unavailable fetch "$B"
pg_tool pg_ctl -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
  -o "-p 5432 -k $PG_DIR/sock -c listen_addresses=" start >/dev/null
check "nothing was recorded while it was away" test "$(sql "SELECT count(*) FROM ks_audit")" = "$BEFORE"
check "database back: the grant is released (it was not spent)" out_has '"key"' fetch "$B"

# --- offline verification of the database (replica B stopped first) ---
kill "$PID_B"; wait "$PID_B" 2>/dev/null || true
offline() { out_has '"ok":true' "$TESSERA_BIN_DIR/keyserver" --config "$E2E_TMP/keyserver.toml" audit-verify --kek-file "$KEK"; }
check "keyserver audit-verify (the store of --config) verifies the chain" offline

e2e_finish
