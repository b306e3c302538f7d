#!/usr/bin/env bash
# e2e: two gateway replicas sharing one vault on PostgreSQL (decision 22).
# A real PostgreSQL server (Debian's package, ./x installs it) on a private
# socket folder; one keyserver, three storage nodes (erasure 2+1), watermark
# and segmentation; gateways A and B with the same vault key and database.
#   - B starts while A is in the middle of a burst: B's start-up recovery
#     leaves A's stores in flight alone (A's lease is live);
#   - stores sent to both at once, A killed -9 mid-burst: every acknowledged
#     store (through A or B) retrieves bit-identical through B;
#   - B's repair pass leaves A's unfinished stores (held by a stopped
#     keyserver when A died) alone while A's lease is live, and finishes
#     them once it lapsed;
#   - the database holds no patient identity bytes (plain or hex).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

T="$TESSERA_BIN_DIR/tessera"
export TESSERA_DIR="$E2E_TMP"
LEASE=30

start_postgres
start_backends 3
VAULT_PG_URL_FILE="$PG_URL_FILE" VAULT_LEASE_SECS=$LEASE gateway_base_config >"$E2E_TMP/gateway.toml"
printf '[erasure]\ndata = 2\nparity = 1\nrepair_interval_secs = 0\n' >>"$E2E_TMP/gateway.toml"
check "the gateway config names PostgreSQL, not a redb file" \
  bash -c "grep -q 'backend = \"postgres\"' '$E2E_TMP/gateway.toml' && ! grep -q 'redb' '$E2E_TMP/gateway.toml'"
start_service gateway "$E2E_TMP/gateway.toml"; GW_A=$SERVICE_ADDR; PID_A=$SERVICE_PID

cat >"$E2E_TMP/endpoints.toml" <<EOF
[endpoints]
gateway = "$GW_A"
keyserver = "$KS_ADDR"

[identities]
gateway = "spiffe://tessera.local/service/gateway"
keyserver = "spiffe://tessera.local/service/keyserver"
EOF

kill9() { kill -9 "$1"; wait "$1" 2>/dev/null || [ $? -eq 137 ]; }

# --- 24 distinct 16-bit slices (64x48, 12 bits stored) ---
python3 - "$E2E_TMP" <<'PY'
import os, struct, sys
d = sys.argv[1]
for i in range(1, 25):
    raw = b"".join(struct.pack("<H", (x * 29 + y * 13 + i * 97) % 4096) for y in range(48) for x in range(64))
    open(os.path.join(d, f"slice{i}.raw"), "wb").write(raw)
PY

# store I ADDR: one study through the gateway at ADDR; on success appends
# "I HANDLE" to acked.txt.
store() {
  local out
  if out=$("$T" store "$E2E_TMP/slice$1.raw" --raw 64,48,16,12 --roi 8,8,32,24 --as owner \
      --gateway "$2" --owner owner --attr "patient_id=PID-PGR-$1" --attr "patient_name=Replica^Patient$1" \
      --json 2>>"$E2E_TMP/store-errors.txt"); then
    echo "$1 $(python3 -c 'import json,sys; print(json.load(sys.stdin)["study"])' <<<"$out")" >>"$E2E_TMP/acked.txt"
  fi
}
: >"$E2E_TMP/acked.txt"
acked() { wc -l <"$E2E_TMP/acked.txt"; }
wait_acked() { # wait_acked N: until N studies are acknowledged (60 s at most)
  local i
  for i in $(seq 1 600); do [ "$(acked)" -ge "$1" ] && return 0; sleep 0.1; done
  echo "only $(acked) studies acknowledged, waited for $1" >&2; return 1
}
burst() { local gw=$1 i; shift; for i in "$@"; do store "$i" "$gw"; done; }

# --- 1. B starts while A stores; then both store at once; A killed -9 ---
burst "$GW_A" 1 2 3 4 5 6 & BA1=$!
wait_acked 1
start_service gateway "$E2E_TMP/gateway.toml"; GW_B=$SERVICE_ADDR; PID_B=$SERVICE_PID
wait "$BA1"
check "B started (sharing the database) while A stored; A's burst all acknowledged" test "$(acked)" -eq 6
burst "$GW_A" 7 9 11 & BA2=$!; burst "$GW_A" 13 15 17 & BA3=$!; burst "$GW_A" 19 21 23 & BA4=$!
burst "$GW_B" 8 10 12 & BB1=$!; burst "$GW_B" 14 16 18 & BB2=$!; burst "$GW_B" 20 22 24 & BB3=$!
wait_acked 12
# The keyserver stopped (SIGSTOP): every store in flight holds right after
# its intent record (the pending record, then the keyserver registers the
# study); A dies with its stores unfinished, B's resume.
kill -STOP "$KS_PID"
sleep 3
kill9 "$PID_A"; KILLED_AT=$(date +%s)
kill -CONT "$KS_PID"
sed -i "s/$GW_A/$GW_B/" "$E2E_TMP/endpoints.toml"   # the CLI's default gateway: B from now on
# --- recovery respects A's lease (A beat at most LEASE/3 s ago) ---
rollbacks() { "$T" repair status --as admin --gateway "$GW_B" | grep -c 'roll back the interrupted store' || true; }
check "right after A died, B's repair pass would roll back none of A's stores (lease live)" test "$(rollbacks)" -eq 0
wait "$BA2" "$BA3" "$BA4" "$BB1" "$BB2" "$BB3"
N_ACKED=$(acked)
echo "   ($N_ACKED of 24 stores acknowledged; A killed -9 after 12)"
check "B went on storing after A died" bash -c "grep -cE '^(8|10|12|14|16|18|20|22|24) ' '$E2E_TMP/acked.txt' | grep -qx 9"
check "A died with stores unacknowledged" test "$N_ACKED" -lt 24

# --- 2. every acknowledged store retrieves bit-identical through B ---
declare -A RID
grant_all() {
  local i h
  while read -r i h; do
    RID[$h]=$("$T" request-key "$h" --as clinician --why replicas --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
    "$T" approve "${RID[$h]}" --as owner --ttl 1h --uses 10 >/dev/null
  done <"$E2E_TMP/acked.txt"
}
retrieve_all() { # retrieve_all ADDR
  local i h
  while read -r i h; do
    "$T" retrieve "$h" --request "${RID[$h]}" --as clinician --gateway "$1" -o "$E2E_TMP/got.raw" >/dev/null \
      || { echo "retrieve $h (slice $i) through $1 failed"; return 1; }
    cmp "$E2E_TMP/got.raw" "$E2E_TMP/slice$i.raw" || { echo "slice $i differs"; return 1; }
  done <"$E2E_TMP/acked.txt"
}
grant_all
check "every acknowledged store (through A or B) retrieves bit-identical through B" retrieve_all "$GW_B"

# --- 3. once A's lease lapsed, B finishes A's leftovers ---
WAIT=$((KILLED_AT + LEASE + 2 - $(date +%s)))
[ "$WAIT" -le 0 ] || sleep "$WAIT"
LEFT=$(rollbacks)
check "once A's lease lapsed, B's repair pass would roll back A's interrupted stores ($LEFT)" test "$LEFT" -ge 1
check "after A's lease lapsed, B's repair run completes" "$T" repair run --as admin --gateway "$GW_B"
check "... leaving nothing unfinished" test "$(rollbacks)" -eq 0
check "... and every acknowledged store still retrieves bit-identical" retrieve_all "$GW_B"

# --- 4. a restarted A serves everything too ---
start_service gateway "$E2E_TMP/gateway.toml"; GW_A=$SERVICE_ADDR
check "a restarted A retrieves every acknowledged store bit-identical" retrieve_all "$GW_A"

# --- 5. the database holds only ciphertext and opaque keys ---
pg_dump_vault >"$E2E_TMP/vault.dump"
check "the database holds the vault's rows" grep -q 'COPY public.vault_studies' "$E2E_TMP/vault.dump"
no_identity() {
  local i needle hex
  for i in $(seq 1 24); do
    for needle in "PID-PGR-$i" "Replica^Patient$i"; do
      hex=$(printf '%s' "$needle" | od -An -tx1 | tr -d ' \n')
      if grep -qF "$needle" "$E2E_TMP/vault.dump" || grep -qF "$hex" "$E2E_TMP/vault.dump"; then
        echo "$needle found in the database"; return 1
      fi
    done
  done
}
check "no patient id or name in the database, plain or hex" no_identity

e2e_finish
