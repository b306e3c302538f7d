#!/usr/bin/env bash
# e2e: durability with every service its own process, so any of them can be
# killed with SIGKILL: five storage nodes (five zones), every object
# erasure-coded 3+2, driven by the `tessera` CLI and grpcurl.
#   - a burst of stores with a storage node and then the gateway killed -9
#     in the middle: every acknowledged study verifies intact and retrieves
#     bit-identical after restart; a full repair pass leaves no missing
#     fragment and no object that no record names;
#   - the gateway killed -9 during a repair: the next pass finishes it;
#   - two nodes lose their disks: everything still readable, verify names the
#     lost fragments, repair rebuilds them; then two *other* nodes lost:
#     still everything readable;
#   - a stopped (SIGSTOP) node does not stall a read (hedged reads);
#   - an object no record names is removed by the next full pass.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

T="$TESSERA_BIN_DIR/tessera"
ST=tessera.storage.v1.StorageNode
export TESSERA_DIR="$E2E_TMP"

# --- the suite, one process per service ---
start_backends 5 zone-a zone-b zone-c zone-d zone-e
{ gateway_base_config
  # No background pass (the script runs them); orphans older than 1 s go.
  printf '[erasure]\ndata = 3\nparity = 2\nrepair_interval_secs = 0\norphan_grace_secs = 1\nhedge_after_ms = 200\n'
  printf '[admin]\nlisten = "127.0.0.1:0"\n'
} >"$E2E_TMP/gateway.toml"
start_service gateway "$E2E_TMP/gateway.toml"; GW_ADDR=$SERVICE_ADDR; GW_PID=$SERVICE_PID
# The gateway's port is pinned too: the CLI's endpoints.toml names it.
sed -i "0,/127.0.0.1:0/s//${GW_ADDR}/" "$E2E_TMP/gateway.toml"

cat >"$E2E_TMP/endpoints.toml" <<EOF
[endpoints]
gateway = "$GW_ADDR"
keyserver = "$KS_ADDR"

[identities]
gateway = "spiffe://tessera.local/service/gateway"
keyserver = "spiffe://tessera.local/service/keyserver"
EOF

restart_gateway() {
  start_service gateway "$E2E_TMP/gateway.toml"; GW_PID=$SERVICE_PID
  [ "$SERVICE_ADDR" = "$GW_ADDR" ] || { echo "gateway came back on $SERVICE_ADDR, not $GW_ADDR" >&2; return 1; }
}
restart_node() { # restart_node N
  start_service storage-node "${NODE_CFG[$1]}"; NODE_PID[$1]=$SERVICE_PID
}
kill9() { kill -9 "$1"; wait "$1" 2>/dev/null || [ $? -eq 137 ]; }
# Stops node N cleanly and deletes its data: a new, empty disk.
lose_disk() {
  kill "${NODE_PID[$1]}"; wait "${NODE_PID[$1]}" 2>/dev/null || true   # exit code irrelevant: the disk goes
  rm -rf "$E2E_TMP/storage-$1"
}

# --- sixteen distinct 16-bit slices (96x80, 12 bits stored) ---
python3 - "$E2E_TMP" <<'PY'
import os, struct, sys
d = sys.argv[1]
for i in range(1, 17):
    raw = b"".join(struct.pack("<H", (x * 37 + y * 11 + i * 101) % 4096) for y in range(80) for x in range(96))
    open(os.path.join(d, f"slice{i}.raw"), "wb").write(raw)
PY

# store I: one study; on success appends "I HANDLE" to acked.txt.
store() {
  local out
  if out=$("$T" store "$E2E_TMP/slice$1.raw" --raw 96,80,16,12 --roi 16,16,48,32 --as owner \
      --owner owner --attr "patient_id=PID-DUR-$1" --json 2>>"$E2E_TMP/store-errors.txt"); then
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

# --- 1. a burst of stores; storage-2 and then the gateway killed -9 ---
burst() { local i; for i in "$@"; do store "$i"; done; }
burst 1 3 5 7 9 11 13 15 & B1=$!
burst 2 4 6 8 10 12 14 16 & B2=$!
wait_acked 3
kill9 "${NODE_PID[2]}"
wait_acked 7
kill9 "$GW_PID"
wait "$B1" "$B2"
N_ACKED=$(acked)
echo "   ($N_ACKED of 16 stores acknowledged before the gateway died)"
check "stores went on with storage-2 killed (write quorum 4 of 5) and some were acknowledged" \
  test "$N_ACKED" -ge 7
restart_node 2
restart_gateway

# verify_all: every acknowledged study verifies intact (owner, no grant spent).
verify_all() {
  local i h out
  while read -r i h; do
    out=$("$T" verify "$h" --as owner) || { echo "verify $h (slice $i) failed: $out"; return 1; }
    grep -q intact <<<"$out" || { echo "verify $h (slice $i): $out"; return 1; }
  done <"$E2E_TMP/acked.txt"
}
# retrieve_all: every acknowledged study retrieves bit-identical (clinician, one grant use each).
declare -A RID
grant_all() {
  local i h
  while read -r i h; do
    RID[$h]=$("$T" request-key "$h" --as clinician --why durability --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')
    "$T" approve "${RID[$h]}" --as owner --ttl 1h --uses 10 >/dev/null
  done <"$E2E_TMP/acked.txt"
}
retrieve_all() {
  local i h
  while read -r i h; do
    "$T" retrieve "$h" --request "${RID[$h]}" --as clinician -o "$E2E_TMP/got.raw" >/dev/null \
      || { echo "retrieve $h (slice $i) failed"; return 1; }
    cmp "$E2E_TMP/got.raw" "$E2E_TMP/slice$i.raw" || { echo "slice $i differs"; return 1; }
  done <"$E2E_TMP/acked.txt"
}
grant_all
check "after kill -9 of a node and the gateway mid-burst: every acknowledged study verifies intact" verify_all
check "... and retrieves bit-identical" retrieve_all

# node_objects: the number of objects on every node together.
node_objects() {
  local n total=0 c
  for n in 1 2 3 4 5; do
    c=$(gc gateway "${NODE_ADDR[$n]}" -d '{"limit":1000}' -- "$ST/List" \
      | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("objects", [])))') || return 1
    total=$((total + c))
  done
  echo "$total"
}
# full_and_clean: a scrub finds every fragment, and the nodes hold exactly
# the fragments the records name (no orphan).
full_and_clean() {
  local s checked objs
  s=$("$T" repair status --as admin --json) || { echo "repair status failed: $s"; return 1; }
  read -r checked missing bad <<<"$(python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["fragments_checked"], r["fragments_missing"], r["fragments_corrupt"]+r["fragments_unreachable"])' <<<"$s")"
  [ "$missing" -eq 0 ] && [ "$bad" -eq 0 ] || { echo "scrub: $s"; return 1; }
  objs=$(node_objects) || { echo "listing the nodes failed"; return 1; }
  [ "$objs" -eq "$checked" ] || { echo "the nodes hold $objs objects, the records name $checked fragments"; return 1; }
  [ "$checked" -ge $((N_ACKED * 10)) ] || { echo "$checked fragments checked for $N_ACKED studies (10 each)"; return 1; }
}
sleep 2.1   # orphan_grace_secs = 1 (whole seconds, by the node's clock)
check "a full repair pass runs without failures" "$T" repair run --as admin
check "then every fragment is in place and no node holds an object no record names" full_and_clean

# --- 2. an orphan (an object no record names) is removed by the next pass ---
BOGUS=$(python3 -c 'import base64; print(base64.b64encode(b"left by a crash").decode())')
gc gateway "${NODE_ADDR[4]}" -d "{\"header\":{\"object_id\":\"st-00000000000000000000000000000000.s1\",\"size\":15}} {\"chunk\":\"$BOGUS\"}" \
  -- "$ST/Put" >/dev/null
sleep 2.1
check "repair status names the orphan it would remove" out_has "would remove orphan st-00000000000000000000000000000000.s1 on storage-4" \
  "$T" repair status --as admin
check "repair run removes it" out_has "1 orphan object(s) removed" "$T" repair run --as admin
check "after which the nodes hold only recorded fragments" full_and_clean

# --- 3. the gateway killed -9 during a repair ---
lose_disk 3
restart_node 3
"$T" repair run --as admin >"$E2E_TMP/repair-killed.out" 2>&1 & RP=$!
sleep 0.3
kill9 "$GW_PID"
wait "$RP" || true   # the client's view of a killed server is not the subject here
restart_gateway
check "after a gateway killed -9 mid-repair, the next pass completes" "$T" repair run --as admin
check "... leaving every fragment in place and no orphan" full_and_clean
check "... and every study intact" verify_all

# --- 4. two nodes lose their disks, then two others ---
lose_disk 1; lose_disk 4
FIRST=$(head -n 1 "$E2E_TMP/acked.txt" | cut -d' ' -f2)
check "with storage-1 and storage-4 gone, verify names their fragments" \
  bash -c "'$T' verify '$FIRST' --as owner | grep -q 'on storage-1' && '$T' verify '$FIRST' --as owner | grep -q 'on storage-4'"
check "... and every study still verifies intact" verify_all
check "... and retrieves bit-identical" retrieve_all
restart_node 1; restart_node 4
MISSING=$("$T" repair status --as admin --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["fragments_missing"])')
check "a scrub finds the fragments of both lost disks missing (4 of each study's 10)" \
  test "$MISSING" -ge $((N_ACKED * 4))
check "repair rebuilds every one onto the new, empty disks" out_has "rebuilt $MISSING fragment(s)" "$T" repair run --as admin
check "... after which nothing is missing" full_and_clean
lose_disk 2; lose_disk 5
check "then storage-2 and storage-5 gone: every study still verifies intact" verify_all
check "... and retrieves bit-identical" retrieve_all
restart_node 2; restart_node 5
check "repair brings them back" "$T" repair run --as admin
check "... complete again" full_and_clean

# --- 5. a stopped node does not stall reads (hedged reads) ---
kill -STOP "${NODE_PID[1]}"
hedged_read() {
  local start end
  start=$(date +%s)
  "$T" retrieve "$FIRST" --request "${RID[$FIRST]}" --as clinician -o "$E2E_TMP/hedged.raw" >/dev/null || return 1
  end=$(date +%s)
  # Without hedging the read would wait for the stopped node until the
  # upstream deadline (30 s); a hedge asks another node after 0.2 s.
  [ $((end - start)) -lt 20 ] || { echo "the read took $((end - start)) s"; return 1; }
  cmp "$E2E_TMP/hedged.raw" "$E2E_TMP/slice$(head -n 1 "$E2E_TMP/acked.txt" | cut -d' ' -f1).raw"
}
check "with storage-1 stopped (SIGSTOP), a read does not wait for it (hedged), bit-identical" hedged_read
check "... and every study still retrieves bit-identical" retrieve_all
kill -CONT "${NODE_PID[1]}"
check "the gateway logged reads that hedged past the stopped node" \
  grep -q "read hedged to further fragments" "$E2E_TMP"/gateway.*.log

# --- 6. the repair counters on the gateway's admin listener (/metrics) ---
repair_metrics() {
  local out admin m
  # The newest gateway process (its output file was written last).
  out=$(ls -t "$E2E_TMP"/gateway.*.out | head -n 1)
  admin=$(sed -n 's/^admin=//p' "$out" | head -n 1)
  [ -n "$admin" ] || { echo "the gateway printed no admin= line"; return 1; }
  m=$(curl -fsS "http://$admin/metrics") || { echo "no /metrics at $admin"; return 1; }
  # This gateway process ran the last passes: 2 disks rebuilt, nothing left.
  grep -qE '^tessera_gateway_repair_passes(_total)? [1-9]' <<<"$m" &&
    grep -qE '^tessera_gateway_repair_fragments_rebuilt(_total)? [1-9]' <<<"$m" &&
    grep -qE '^tessera_gateway_repair_fragments_missing(_total)? [1-9]' <<<"$m" ||
    { grep '^tessera_gateway_repair' <<<"$m"; return 1; }
}
check "/metrics counts the repair passes, missing and rebuilt fragments" repair_metrics

e2e_finish
