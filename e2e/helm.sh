#!/usr/bin/env bash
# e2e: the Helm chart (helm/tessera). Lints it with helm-sdkpy (the Helm
# library) with the default values and with a non-default set (5 storage
# nodes, OTLP export, explicit roles), proves that lint rejects bad values,
# renders it offline (helm-python-sdk) and checks the manifests (N storage
# nodes in the gateway config, security context, probes, volumes, Secrets),
# then starts the real binaries on the rendered configs (paths and listen
# addresses overridden by environment) so the deny_unknown_fields configs are
# proven to load, and checks that certificates from helm/dev-pki.sh work with
# a service dialled by its Service name.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

CHART=$(cd "$E2E_DIR/../helm/tessera" && pwd)
DEV_PKI="$E2E_DIR/../helm/dev-pki.sh"
hc() { python3 "$E2E_DIR/helm_chart.py" "$@"; }
python3 -c 'import helm_sdkpy, helm_python' 2>/dev/null || {
  echo "helm-sdkpy / helm-python-sdk not importable by python3 (run via ./x e2e)" >&2
  exit 1
}

OTLP=http://otel-collector.observability:4317
cat >"$E2E_TMP/custom.json" <<JSON
{
  "image": {"repository": "registry.example/tessera", "tag": "test"},
  "access": {"devRoles": false, "roles": {
    "spiffe://tessera.local/service/gateway": ["service"],
    "spiffe://tessera.local/service/watermark": ["service"],
    "spiffe://tessera.local/user/owner": ["owner", "admin"]}},
  "telemetry": {"otlpEndpoint": "$OTLP", "log": "info,keyserver=debug", "json": false},
  "storage": {"replicas": 5, "capacityBytes": 21474836480, "maxObjectBytes": 134217728,
              "persistence": {"size": "25Gi", "storageClass": "fast"}},
  "watermark": {"replicas": 2},
  "gateway": {"persistence": {"existingClaim": "vault-data"}, "maxConcurrentJobs": 8},
  "keyserver": {"maxGrantUses": 5}
}
JSON

# --- lint (helm-sdkpy) ---
lint() { # lint CHART_DIR: lint, and on failure show helm-python-sdk's messages
  if hc lint "$1"; then return 0; fi
  hc diagnose "$1" || true
  return 1
}
check "helm lint: default values" lint "$CHART"
hc prepare "$CHART" "$E2E_TMP/custom.json" "$E2E_TMP/custom/tessera"
check "helm lint: 5 storage nodes, OTLP, explicit roles" lint "$E2E_TMP/custom/tessera"

lint_rejects() { # lint_rejects JSON: lint must fail with these values
  printf '%s\n' "$1" >"$E2E_TMP/bad.json"
  hc prepare "$CHART" "$E2E_TMP/bad.json" "$E2E_TMP/bad/tessera"
  if hc lint "$E2E_TMP/bad/tessera" >/dev/null; then
    echo "lint accepted $1"
    return 1
  fi
}
check "lint rejects storage.replicas = 1" lint_rejects '{"storage": {"replicas": 1}}'
check "lint rejects an unknown value key" lint_rejects '{"storage": {"replica": 4}}'
check "lint rejects an OTLP endpoint without http(s)://" lint_rejects '{"telemetry": {"otlpEndpoint": "otel:4317"}}'
check "lint rejects an unknown role" lint_rejects '{"access": {"roles": {"spiffe://tessera.local/user/a": ["root"]}}}'

# --- render (helm-python-sdk) and check the manifests ---
hc render "$CHART" "$E2E_TMP/r-default"
hc render "$CHART" "$E2E_TMP/r-custom" "$E2E_TMP/custom.json"
for set in default custom; do
  R="$E2E_TMP/r-$set"
  if [ "$set" = default ]; then n=3 otlp=none; else n=5 otlp=$OTLP; fi
  check "$set: gateway config lists exactly storage-1..$n, each a StatefulSet with that node_id" \
    hc check storage-nodes "$R" "$n"
  check "$set: every pod non-root, read-only root, no privilege escalation, caps dropped" hc check security "$R"
  check "$set: tcpSocket probes on the grpc port; Services match listen ports" hc check probes "$R"
  check "$set: every dialled <service>:<port> is a rendered Service" hc check addresses "$R"
  check "$set: config paths on the right volumes (Secret, PVC, memory emptyDir)" hc check paths "$R"
  check "$set: TLS, KEK and vault-key Secrets as named in values; none created" hc check secrets "$R"
  check "$set: telemetry.otlp_endpoint = $otlp in every config" hc check telemetry "$R" "$otlp"
  check "$set: [server.access] from values in every config" hc check access "$R"
  check "$set: per-workload config checksum annotations" hc check checksums "$R"
  check "$set: NOTES.txt shows grpcurl health and list" hc check notes "$R"
done

# --- the real binaries load the rendered (default) configs ---
CFG="$E2E_TMP/r-default/config"
started() { # started NAME: counts a service that came up healthy
  E2E_PASSED=$((E2E_PASSED + 1))
  echo "ok   - $1"
}
failed() {
  E2E_FAILED=$((E2E_FAILED + 1))
  echo "FAIL - $1"
}
tls_env() { # tls_env PREFIX SECTION NAME: TLS path overrides for SECTION
  local p=$1 s=$2 n=$3
  printf '%s\n' "${p}__${s}__CA=$PKI/ca.crt" "${p}__${s}__CERT=$PKI/$n.crt" "${p}__${s}__KEY=$PKI/$n.key"
}
# run_rendered NAME BIN CONFIG SVC VAR=VALUE...: start BIN on a rendered config
# with overrides, then wait for health; sets SERVICE_ADDR.
run_rendered() {
  local name=$1 bin=$2 config=$3 svc=$4
  shift 4
  if start_with_env "$bin" "$config" "$@" && wait_healthy "$SERVICE_ADDR" gateway "$svc"; then
    started "$name: rendered config loads; healthy on $SERVICE_ADDR"
  else
    failed "$name: rendered config"
    return 1
  fi
}
start_with_env() { # start_with_env BIN CONFIG VAR=VALUE...
  local bin=$1 config=$2
  shift 2
  local -a vars=("$@")
  local v
  for v in "${vars[@]}"; do export "${v?}"; done
  local rc=0
  start_service "$bin" "$config" || rc=$?
  for v in "${vars[@]}"; do unset "${v%%=*}"; done
  return "$rc"
}

KEK="$E2E_TMP/keyserver.kek"
head -c 32 /dev/urandom >"$KEK"
chmod 600 "$KEK"
mapfile -t ks_env < <(tls_env TESSERA_KEYSERVER SERVER__TLS keyserver)
run_rendered keyserver keyserver "$CFG/keyserver-config.toml" tessera.keyserver.v1.KeyServer \
  TESSERA_KEYSERVER__SERVER__LISTEN=127.0.0.1:0 "${ks_env[@]}" \
  TESSERA_KEYSERVER__KEYSERVER__DB_PATH="$E2E_TMP/keyserver.redb" \
  TESSERA_KEYSERVER__KEYSERVER__KEK_FILE="$KEK" || true
KS_ADDR=${SERVICE_ADDR:-}

mapfile -t wm_env < <(tls_env TESSERA_WATERMARK SERVER__TLS watermark; tls_env TESSERA_WATERMARK KEYSERVER__TLS watermark)
run_rendered watermark watermark "$CFG/watermark-config.toml" tessera.watermark.v1.Watermark \
  TESSERA_WATERMARK__SERVER__LISTEN=127.0.0.1:0 "${wm_env[@]}" \
  TESSERA_WATERMARK__KEYSERVER__ADDRESS="${KS_ADDR:-127.0.0.1:1}" || true
WM_ADDR=${SERVICE_ADDR:-}

mapfile -t seg_env < <(tls_env TESSERA_SEGMENTATION SERVER__TLS segmentation)
run_rendered segmentation segmentation "$CFG/segmentation-config.toml" tessera.segmentation.v1.Segmentation \
  TESSERA_SEGMENTATION__SERVER__LISTEN=127.0.0.1:0 "${seg_env[@]}" || true
SEG_ADDR=${SERVICE_ADDR:-}

# The custom set renders [server.access.roles], no dev roles, OTLP export
# and a compound log filter: one service proves those load too (the
# collector is pointed at a closed loopback port).
run_rendered "segmentation (custom values)" segmentation "$E2E_TMP/r-custom/config/segmentation-config.toml" \
  tessera.segmentation.v1.Segmentation \
  TESSERA_SEGMENTATION__SERVER__LISTEN=127.0.0.1:0 "${seg_env[@]}" \
  TESSERA_SEGMENTATION__TELEMETRY__OTLP_ENDPOINT=http://127.0.0.1:1 || true
CUSTOM_SEG=${SERVICE_ADDR:-127.0.0.1:1}
# Reflection needs any role: clinician holds one only through dev_roles,
# owner through the rendered [server.access.roles] table.
lists_as() { gc "$1" "$2" list | grep -qx tessera.segmentation.v1.Segmentation; }
check "default values: dev roles in force (clinician may list)" lists_as clinician "$SEG_ADDR"
check "custom values: dev_roles = false in force (clinician refused)" \
  expect_code PermissionDenied gc clinician "$CUSTOM_SEG" list
check "custom values: [server.access.roles] in force (owner may list)" lists_as owner "$CUSTOM_SEG"

STORAGE_ADDRS=()
for i in 1 2 3; do
  mkdir -p "$E2E_TMP/storage-$i"
  mapfile -t st_env < <(tls_env TESSERA_STORAGE SERVER__TLS "storage-$i")
  SERVICE_ADDR=
  run_rendered "storage-$i" storage-node "$CFG/storage-$i-config.toml" tessera.storage.v1.StorageNode \
    TESSERA_STORAGE__SERVER__LISTEN=127.0.0.1:0 "${st_env[@]}" \
    TESSERA_STORAGE__DATA_DIR="$E2E_TMP/storage-$i" || true
  STORAGE_ADDRS+=("${SERVICE_ADDR:-127.0.0.1:1}")
done
node_id_is() { # node_id_is ADDR ID: NodeInfo answers the rendered node_id
  gc gateway "$1" -d '{}' -- tessera.storage.v1.StorageNode/NodeInfo | grep -q "\"nodeId\": \"$2\""
}
for i in 1 2 3; do
  check "storage-$i reports node_id storage-$i (NodeInfo)" node_id_is "${STORAGE_ADDRS[$((i - 1))]}" "storage-$i"
done

if [ -x "$TESSERA_BIN_DIR/gateway" ]; then
  VAULT_KEY="$E2E_TMP/vault.key"
  head -c 32 /dev/urandom >"$VAULT_KEY"
  chmod 600 "$VAULT_KEY"
  NODES=$(hc gateway-nodes-override "$E2E_TMP/r-default" "${STORAGE_ADDRS[@]}")
  mapfile -t gw_env < <(tls_env TESSERA_GATEWAY SERVER__TLS gateway; tls_env TESSERA_GATEWAY CLIENT_TLS gateway)
  run_rendered gateway gateway "$CFG/gateway-config.toml" tessera.gateway.v1.Gateway \
    TESSERA_GATEWAY__SERVER__LISTEN=127.0.0.1:0 "${gw_env[@]}" \
    TESSERA_GATEWAY__KEYSERVER__ADDRESS="$KS_ADDR" \
    TESSERA_GATEWAY__WATERMARK__ADDRESS="$WM_ADDR" \
    TESSERA_GATEWAY__SEGMENTATION__ADDRESS="$SEG_ADDR" \
    TESSERA_GATEWAY__STORAGE_NODES="$NODES" \
    TESSERA_GATEWAY__VAULT__PATH="$E2E_TMP/vault.redb" \
    TESSERA_GATEWAY__VAULT__KEY_FILE="$VAULT_KEY" || true
else
  echo "skip - gateway: $TESSERA_BIN_DIR/gateway not built"
fi

# --- helm/dev-pki.sh: certificates for in-cluster names ---
expect_fail() { if "$@" >/dev/null 2>&1; then echo "succeeded: $*"; return 1; fi; }
KPKI="$E2E_TMP/kpki"
check "dev-pki.sh writes a PKI for 3 storage nodes" "$DEV_PKI" --dir "$KPKI" --namespace tessera --storage-nodes 3
check "dev-pki.sh refuses to overwrite it" expect_fail "$DEV_PKI" --dir "$KPKI"
KEK2="$E2E_TMP/keyserver2.kek"
head -c 32 /dev/urandom >"$KEK2"
chmod 600 "$KEK2"
kg() { # kg SERVERNAME ARGS...: grpcurl as the dev-pki.sh owner
  local sn=$1
  shift
  grpcurl -max-time 20 -cacert "$KPKI/ca.crt" -cert "$KPKI/owner.crt" -key "$KPKI/owner.key" -servername "$sn" "$@"
}
K2=127.0.0.1:1
if start_with_env keyserver "$CFG/keyserver-config.toml" \
  TESSERA_KEYSERVER__SERVER__LISTEN=127.0.0.1:0 \
  TESSERA_KEYSERVER__SERVER__TLS__CA="$KPKI/ca.crt" \
  TESSERA_KEYSERVER__SERVER__TLS__CERT="$KPKI/keyserver.crt" \
  TESSERA_KEYSERVER__SERVER__TLS__KEY="$KPKI/keyserver.key" \
  TESSERA_KEYSERVER__KEYSERVER__DB_PATH="$E2E_TMP/keyserver2.redb" \
  TESSERA_KEYSERVER__KEYSERVER__KEK_FILE="$KEK2"; then
  K2=$SERVICE_ADDR
fi
health_as() { # health_as SERVERNAME: the TLS name grpcurl checks the certificate against
  local i
  for i in $(seq 1 50); do
    if kg "$1" "$K2" grpc.health.v1.Health/Check 2>&1 | grep -q SERVING; then return 0; fi
    kg "$1" "$K2" grpc.health.v1.Health/Check 2>&1 | grep -q "certificate is valid for" && break
    sleep 0.1
  done
  kg "$1" "$K2" grpc.health.v1.Health/Check
  return 1
}
check "dialled with the Service name keyserver as TLS name: SERVING" health_as keyserver
lists() { kg keyserver "$K2" list | grep -qx tessera.keyserver.v1.KeyServer; }
check "reflection list as the dev-pki.sh owner" lists
check "the keyserver certificate does not pass for storage-1" expect_refused health_as storage-1

e2e_finish
