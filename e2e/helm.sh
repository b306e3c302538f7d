#!/usr/bin/env bash
# e2e: the Helm chart (helm/tessera). Lints it with helm-sdkpy (the Helm
# library) with the default values and with a non-default set (5 storage
# nodes, OTLP export, explicit roles; and the gateway's DICOM C-STORE SCP
# enabled), proves that lint rejects bad values, renders it offline
# (helm-python-sdk) and checks the manifests (N storage nodes in the gateway
# config, the identity every upstream must present and the call timeouts,
# security context, probes, volumes, Secrets, [dicom.scp] and [dicomweb] with their
# container ports and Services only when enabled), then starts the
# real binaries on the rendered configs (paths and listen addresses overridden
# by environment) so the deny_unknown_fields configs are proven to load (the
# gateway with the SCP answers C-ECHO with the rendered AE titles), and checks
# that certificates from `tessera pki init --dns` work with a service dialled
# by its Service name.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
e2e_init

CHART=$(cd "$E2E_DIR/../helm/tessera" && pwd)
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
    "spiffe://tessera.local/service/gateway": ["gateway"],
    "spiffe://tessera.local/service/watermark": ["watermark"],
    "spiffe://tessera.local/user/owner": ["owner", "admin"]}},
  "telemetry": {"otlpEndpoint": "$OTLP", "log": "info,keyserver=debug", "json": false},
  "storage": {"replicas": 5, "capacityBytes": 21474836480, "maxObjectBytes": 134217728,
              "zones": ["cloud-a", "cloud-a", "cloud-b", "cloud-b", "cloud-c"],
              "erasure": {"enabled": true, "data": 3, "parity": 2},
              "persistence": {"size": "25Gi", "storageClass": "fast"}},
  "watermark": {"replicas": 2},
  "gateway": {"persistence": {"existingClaim": "vault-data"}, "maxConcurrentJobs": 8,
              "upstreamTimeouts": {"connectSecs": 3, "callSecs": 20, "streamSecs": 900}},
  "keyserver": {"maxGrantUses": 5}
}
JSON
# The C-STORE SCP on an internal LoadBalancer; an AE title with a space and
# one with an apostrophe exercise the TOML and shell quoting.
DICOM_OWNER=spiffe://tessera.local/user/owner
cat >"$E2E_TMP/dicom.json" <<JSON
{
  "gateway": {"dicom": {"temporal": "retain-modified", "scp": {
    "enabled": true, "port": 11113, "tlsPort": 2762, "aeTitle": "TESSERA K8S",
    "allowedCallingAEs": ["CT01", "O'PACS"], "owner": "$DICOM_OWNER",
    "maxAssociations": 8, "idleTimeoutSecs": 30,
    "service": {"type": "LoadBalancer",
                "annotations": {"networking.gke.io/load-balancer-type": "Internal"},
                "loadBalancerSourceRanges": ["10.20.0.0/16"]}}},
              "dicomweb": {"enabled": true, "port": 8444, "maxRequestBytes": 1048576}}
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
hc prepare "$CHART" "$E2E_TMP/dicom.json" "$E2E_TMP/dicom/tessera"
check "helm lint: DICOM SCP enabled (LoadBalancer, source ranges)" lint "$E2E_TMP/dicom/tessera"
echo '{"keyserver": {"store": {"backend": "postgres", "replicas": 3}}}' >"$E2E_TMP/pgks-lint.json"
hc prepare "$CHART" "$E2E_TMP/pgks-lint.json" "$E2E_TMP/pgks-lint/tessera"
check "helm lint: the keyserver on PostgreSQL (3 replicas)" lint "$E2E_TMP/pgks-lint/tessera"

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
scp_json() { printf '{"gateway": {"dicom": {"scp": {"enabled": true, %s}}}}' "$1"; }
AES='"allowedCallingAEs": ["CT01"]'
OWNER="\"owner\": \"$DICOM_OWNER\""
check "lint rejects the DICOM SCP enabled without allowedCallingAEs" lint_rejects "$(scp_json "$OWNER")"
check "lint rejects the DICOM SCP enabled without an owner" lint_rejects "$(scp_json "$AES")"
check "lint rejects a service identity as DICOM owner" \
  lint_rejects "$(scp_json "$AES, \"owner\": \"spiffe://tessera.local/service/gateway\"")"
check "lint rejects a 17-character AE title" lint_rejects "$(scp_json "$AES, $OWNER, \"aeTitle\": \"TESSERA-GATEWAY-1\"")"
check "lint rejects an AE title with a backslash" lint_rejects "$(scp_json "\"allowedCallingAEs\": [\"CT\\\\01\"], $OWNER")"
check "lint rejects an unknown dicom.temporal" lint_rejects '{"gateway": {"dicom": {"temporal": "shift"}}}'
check "lint rejects a zero upstream call timeout" lint_rejects '{"gateway": {"upstreamTimeouts": {"callSecs": 0}}}'
# Checks across values (tessera.validate) fail the render, which install and
# template do; Helm's lint only logs a template's `fail`.
render_rejects() { # render_rejects JSON MESSAGE: rendering must fail, naming MESSAGE
  printf '%s\n' "$1" >"$E2E_TMP/bad.json"
  local out
  if out=$(hc render "$CHART" "$E2E_TMP/r-bad" "$E2E_TMP/bad.json" 2>&1); then
    echo "rendered $1"
    return 1
  fi
  grep -qF "$2" <<<"$out" || { echo "render failed without naming $2:"; tail -n 3 <<<"$out"; return 1; }
}
check "render refuses a DICOM owner outside access.trustDomain" \
  render_rejects "$(scp_json "$AES, \"owner\": \"spiffe://other.org/user/owner\"")" "gateway.dicom.scp.owner"
check "render refuses the DICOM SCP on the gRPC port" \
  render_rejects "$(scp_json "$AES, $OWNER, \"port\": 7700")" "gateway.dicom.scp.port 7700 is gateway.port"
check "render rejects a dicom.scp.tlsPort equal to the plain DICOM port" \
  render_rejects "$(scp_json "$AES, $OWNER, \"tlsPort\": 11112")" "gateway.dicom.scp.tlsPort 11112 is gateway.dicom.scp.port"
check "lint rejects a dicom.scp.tlsPort that is not a port" lint_rejects '{"gateway": {"dicom": {"scp": {"tlsPort": 70000}}}}'
check "render refuses DICOMweb on the gRPC port" \
  render_rejects '{"gateway": {"dicomweb": {"enabled": true, "port": 7700}}}' "gateway.dicomweb.port 7700 is gateway.port"
check "render refuses DICOMweb on the DICOM SCP's port" \
  render_rejects "{\"gateway\": {\"dicom\": {\"scp\": {\"enabled\": true, $AES, $OWNER}}, \"dicomweb\": {\"enabled\": true, \"port\": 11112}}}" \
  "gateway.dicomweb.port 11112 is gateway.dicom.scp.port"
check "lint rejects a zero dicomweb.maxRequestBytes" lint_rejects '{"gateway": {"dicomweb": {"maxRequestBytes": 0}}}'
check "render refuses loadBalancerSourceRanges on a ClusterIP DICOM Service" \
  render_rejects "$(scp_json "$AES, $OWNER, \"service\": {\"loadBalancerSourceRanges\": [\"10.0.0.0/8\"]}")" \
  "loadBalancerSourceRanges applies to service.type LoadBalancer only"
# One size limit (issue 20): a node cap or a service limit below what
# gateway.maxImageBytes needs fails the render, naming both.
check "render refuses storage.maxObjectBytes below what gateway.maxImageBytes needs" \
  render_rejects '{"storage": {"maxObjectBytes": 67108864}}' "below the 369229824 bytes per object that gateway.maxImageBytes = 268435456 needs"
check "render refuses watermark.maxImageBytes below gateway.maxImageBytes" \
  render_rejects '{"watermark": {"maxImageBytes": 1048576}}' "watermark.maxImageBytes (1048576) is below gateway.maxImageBytes"
# A storage node's buffered uploads must fit its memory limit: 8 whole
# 352 MiB objects do not fit 1536Mi; a cap one upload does not fit either.
check "render refuses storage.maxConcurrentPuts x the per-object cap over the memory limit" \
  render_rejects '{"storage": {"maxConcurrentPuts": 8}}' "8 uploads of 369229824 bytes (storage.maxConcurrentPuts x the per-object cap) plus 256 MiB do not fit storage.resources.limits.memory (1610612736 bytes)"
check "render refuses a storage memory limit below one upload plus the reserve" \
  render_rejects '{"storage": {"resources": {"limits": {"memory": "512Mi"}}}}' "do not fit storage.resources.limits.memory (536870912 bytes)"

# Operations: users only from the clinic namespace, the DICOM port from one
# CIDR, scrapers from monitoring, a PodMonitor, 3+2 erasure on 5 nodes.
cat >"$E2E_TMP/ops.json" <<JSON
{
  "networkPolicy": {
    "usersFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clinic"}}}],
    "dicomCIDRs": ["10.20.0.0/16"],
    "adminFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
  "metrics": {"podMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "prom"}}},
  "storage": {"replicas": 5, "zones": ["a", "a", "b", "b", "c"],
              "erasure": {"enabled": true, "data": 3, "parity": 2}},
  "gateway": {"dicom": {"fileRequests": true,
                        "scp": {"enabled": true, "tlsPort": 2762, "owner": "$DICOM_OWNER", "allowedCallingAEs": ["CT01"]}},
              "dicomweb": {"enabled": true}}
}
JSON
# cert-manager issues every service certificate (4 storage nodes).
cat >"$E2E_TMP/certmanager.json" <<JSON
{"pki": {"mode": "certManager", "certManager": {"issuerRef": {"name": "tessera-ca", "kind": "ClusterIssuer"},
         "duration": "720h", "renewBefore": "240h"}},
 "storage": {"replicas": 4}}
JSON
# Policies off: no NetworkPolicy, no PodDisruptionBudget.
cat >"$E2E_TMP/nopolicy.json" <<JSON
{"networkPolicy": {"enabled": false}, "podDisruptionBudget": {"enabled": false}}
JSON

# --- render (helm-python-sdk) and check the manifests ---
hc render "$CHART" "$E2E_TMP/r-default"
hc render "$CHART" "$E2E_TMP/r-custom" "$E2E_TMP/custom.json"
hc render "$CHART" "$E2E_TMP/r-dicom" "$E2E_TMP/dicom.json"
hc render "$CHART" "$E2E_TMP/r-ops" "$E2E_TMP/ops.json"
hc render "$CHART" "$E2E_TMP/r-nopolicy" "$E2E_TMP/nopolicy.json"
hc render "$CHART" "$E2E_TMP/r-certmanager" "$E2E_TMP/certmanager.json"
# The vault in an external PostgreSQL (decision 22): replicas, no volume.
echo '{"gateway": {"vault": {"backend": "postgres", "replicas": 3}}}' >"$E2E_TMP/pgvault.json"
hc render "$CHART" "$E2E_TMP/r-pgvault" "$E2E_TMP/pgvault.json"
pg_gateway() { # the gateway: 3 replicas rolling, its connection string copied 0400, no PVC
  python3 - "$E2E_TMP/r-pgvault" <<'PY'
import json, sys
objs = [o["object"] for o in json.load(open(sys.argv[1] + "/objects.json"))]
gw = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
assert gw["spec"]["replicas"] == 3 and gw["spec"]["strategy"]["type"] == "RollingUpdate", gw["spec"]
assert not any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "gateway-data" for o in objs)
vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
assert vols["vault-postgres"]["secret"]["secretName"] == "tessera-gateway-vault-postgres", vols
cfg = open(sys.argv[1] + "/config/gateway-config.toml").read()
assert 'backend = "postgres"' in cfg and "vault.redb" not in cfg, cfg
PY
}
check "pgvault: the gateway on an external PostgreSQL: 3 replicas rolling, connection string from a Secret, no vault volume" pg_gateway
# The keyserver on an external PostgreSQL too (decision 24): replicas, no volume.
echo '{"gateway": {"vault": {"backend": "postgres", "replicas": 3}}, "keyserver": {"store": {"backend": "postgres", "replicas": 3}}}' >"$E2E_TMP/pgks.json"
hc render "$CHART" "$E2E_TMP/r-pgks" "$E2E_TMP/pgks.json"
pg_keyserver() { # the keyserver: 3 replicas, its connection string copied 0400, no PVC, no db_path
  python3 - "$E2E_TMP/r-pgks" <<'PY'
import json, sys, tomllib
objs = [o["object"] for o in json.load(open(sys.argv[1] + "/objects.json"))]
ks = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "keyserver")
assert ks["spec"]["replicas"] == 3 and ks["spec"]["podManagementPolicy"] == "Parallel", ks["spec"]
assert "volumeClaimTemplates" not in ks["spec"], "keyserver: a PVC beside backend postgres"
vols = {v["name"]: v for v in ks["spec"]["template"]["spec"]["volumes"]}
assert vols["keyserver-postgres"]["secret"]["secretName"] == "tessera-keyserver-postgres", vols
assert "emptyDir" in vols["data"], vols["data"]
cfg = tomllib.load(open(sys.argv[1] + "/config/keyserver-config.toml", "rb"))
k = cfg["keyserver"]
assert k["store"]["backend"] == "postgres" and "db_path" not in k, k
assert k["store"]["postgres_url_file"].endswith("/keyserver-postgres.url"), k
PY
}
check "pgks: the keyserver on an external PostgreSQL: 3 replicas, connection string from a Secret, no volume" pg_keyserver
limits_follow() { # limits_follow DIR CAP: every storage node's cap is CAP, every service's limit the gateway's
  local d=$1 cap=$2 gw
  gw=$(grep -h '^max_image_bytes' "$d"/config/*gateway*.toml)
  for f in "$d"/config/*watermark*.toml "$d"/config/*segmentation*.toml; do
    grep -qx "$gw" "$f" || { echo "$f: not $gw"; return 1; }
  done
  for f in "$d"/config/*storage-*.toml; do
    grep -qx "max_object_bytes = $cap" "$f" || { echo "$f: $(grep max_object_bytes "$f")"; return 1; }
  done
}
check "default: the nodes' cap derived from gateway.maxImageBytes (352 MiB whole)" limits_follow "$E2E_TMP/r-default" 369229824
check "ops (3+2): the nodes' cap is one fragment of it" limits_follow "$E2E_TMP/r-ops" 123077120
# The schema check is a gate: a manifest Kubernetes would refuse fails it.
cp -r "$E2E_TMP/r-default" "$E2E_TMP/r-broken"
python3 - "$E2E_TMP/r-broken/objects.json" <<'PY'
import json, sys
objs = json.load(open(sys.argv[1]))
svc = next(o["object"] for o in objs if o["object"]["kind"] == "Service")
svc["spec"]["ports"][0]["port"] = "seven-thousand"
json.dump(objs, open(sys.argv[1], "w"))
PY
schema_refuses() { ! hc check schemas "$E2E_TMP/r-broken" >/dev/null; }
check "the Kubernetes schema check refuses a Service port that is not a number" schema_refuses
for set in default custom dicom ops nopolicy certmanager pgvault pgks; do
  R="$E2E_TMP/r-$set"
  np=on cm=off
  case $set in
    default) n=3 otlp=none dicom=off web=off ec=off ;;
    custom) n=5 otlp=$OTLP dicom=off web=off ec=3+2/cloud-a,cloud-a,cloud-b,cloud-b,cloud-c ;;
    dicom) n=3 otlp=none dicom=on web=on ec=off ;;
    ops) n=5 otlp=none dicom=on web=on ec=3+2/a,a,b,b,c ;;
    nopolicy) n=3 otlp=none dicom=off web=off ec=off np=off ;;
    certmanager) n=4 otlp=none dicom=off web=off ec=off cm=on ;;
    pgvault) n=3 otlp=none dicom=off web=off ec=off ;;
    pgks) n=3 otlp=none dicom=off web=off ec=off ;;
  esac
  check "$set: every manifest valid against the Kubernetes $(hc k8s-version) OpenAPI schemas (strict)" \
    hc check schemas "$R"
  check "$set: NetworkPolicies encode the trust zones ($np)" hc check network-policies "$R" "$np"
  check "$set: PodDisruptionBudgets (storage: the erasure parity)" hc check disruption-budgets "$R"
  check "$set: cert-manager Certificates with SPIFFE URI and Service DNS SANs ($cm)" hc check certificates "$R" "$cm"
  check "$set: [erasure] and node zones from values: $ec" hc check erasure "$R" "$ec"
  check "$set: gateway config lists exactly storage-1..$n, each a StatefulSet with that node_id" \
    hc check storage-nodes "$R" "$n"
  check "$set: every pod non-root, read-only root, no privilege escalation, caps dropped" hc check security "$R"
  check "$set: httpGet probes on the admin port (/live, /ready); Services match listen ports" hc check probes "$R"
  check "$set: every dialled <service>:<port> is a rendered Service, with its identity and timeouts" hc check addresses "$R"
  check "$set: config paths on the right volumes (Secret, PVC, memory emptyDir)" hc check paths "$R"
  check "$set: TLS, KEK and vault-key Secrets as named in values; none created" hc check secrets "$R"
  check "$set: telemetry.otlp_endpoint = $otlp in every config" hc check telemetry "$R" "$otlp"
  check "$set: [server.access] from values in every config" hc check access "$R"
  check "$set: per-workload config checksum annotations" hc check checksums "$R"
  check "$set: NOTES.txt shows grpcurl health and list" hc check notes "$R"
  check "$set: [dicom] from values; [dicom.scp], container port and Service dicom, NOTES echoscu: $dicom" \
    hc check dicom "$R" "$dicom"
  check "$set: [dicomweb], its container port and Service gateway port dicomweb: $web" \
    hc check dicomweb "$R" "$web"
  check "$set: headless watermark and segmentation Services, the gateway balancing over them" \
    hc check spread "$R" "$set"
  check "$set: every storage node's puts x per-object cap + 256 MiB fit its memory limit" \
    hc check storage-memory "$R"
done
puts_of() { # puts_of DIR N: every storage node renders max_concurrent_puts = N
  local f
  for f in "$1"/config/*storage-*.toml; do
    grep -qx "max_concurrent_puts = $2" "$f" || { echo "$f: $(grep max_concurrent_puts "$f")"; return 1; }
  done
}
check "default: 3 concurrent puts of 352 MiB fit the 1536Mi node limit" puts_of "$E2E_TMP/r-default" 3
check "ops (3+2): 8 concurrent puts of one 118 MiB fragment" puts_of "$E2E_TMP/r-ops" 8

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
    failed "$name: rendered config"  # counted; later checks on it fail too
    SERVICE_ADDR=
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
  TESSERA_KEYSERVER__SERVER__LISTEN=127.0.0.1:0 TESSERA_KEYSERVER__ADMIN__LISTEN=127.0.0.1:0 "${ks_env[@]}" \
  TESSERA_KEYSERVER__KEYSERVER__DB_PATH="$E2E_TMP/keyserver.redb" \
  TESSERA_KEYSERVER__KEYSERVER__KEK_FILE="$KEK"
KS_ADDR=${SERVICE_ADDR:-}
# The rendered [admin] section: plain-HTTP probes answer on the keyserver.
KS_OUT=$(grep -l "^listening=${KS_ADDR:-none}\$" "$E2E_TMP"/keyserver.*.out 2>/dev/null | head -n 1 || true)
KS_ADMIN=$(sed -n 's/^admin=//p' "${KS_OUT:-/dev/null}" | head -n 1)
check "keyserver (rendered config) admin listener: /live and /ready 200 (${KS_ADMIN:-none})" \
  bash -c 'curl -fsS -o /dev/null "http://$1/live" && curl -fsS -o /dev/null "http://$1/ready"' _ "$KS_ADMIN"
# The body is read whole first: `curl | grep -q` fails under pipefail when
# grep stops at its match before curl has written everything.
ks_metrics() { local body; body=$(curl -fsS "http://$KS_ADMIN/metrics") && grep -q '^tessera_rpc_requests_total{method="grpc.health.v1.Health/Check",code="0"} [1-9]' <<<"$body"; }
check "keyserver (rendered config) /metrics counts the health checks" ks_metrics

mapfile -t wm_env < <(tls_env TESSERA_WATERMARK SERVER__TLS watermark; tls_env TESSERA_WATERMARK KEYSERVER__TLS watermark)
run_rendered watermark watermark "$CFG/watermark-config.toml" tessera.watermark.v1.Watermark \
  TESSERA_WATERMARK__SERVER__LISTEN=127.0.0.1:0 TESSERA_WATERMARK__ADMIN__LISTEN=127.0.0.1:0 "${wm_env[@]}" \
  TESSERA_WATERMARK__KEYSERVER__ADDRESS="${KS_ADDR:-127.0.0.1:1}"
WM_ADDR=${SERVICE_ADDR:-}

mapfile -t seg_env < <(tls_env TESSERA_SEGMENTATION SERVER__TLS segmentation)
run_rendered segmentation segmentation "$CFG/segmentation-config.toml" tessera.segmentation.v1.Segmentation \
  TESSERA_SEGMENTATION__SERVER__LISTEN=127.0.0.1:0 TESSERA_SEGMENTATION__ADMIN__LISTEN=127.0.0.1:0 "${seg_env[@]}"
SEG_ADDR=${SERVICE_ADDR:-}

# The custom set renders [server.access.roles], no dev roles, OTLP export
# and a compound log filter: one service proves those load too (the
# collector is pointed at a closed loopback port).
run_rendered "segmentation (custom values)" segmentation "$E2E_TMP/r-custom/config/segmentation-config.toml" \
  tessera.segmentation.v1.Segmentation \
  TESSERA_SEGMENTATION__SERVER__LISTEN=127.0.0.1:0 TESSERA_SEGMENTATION__ADMIN__LISTEN=127.0.0.1:0 "${seg_env[@]}" \
  TESSERA_SEGMENTATION__TELEMETRY__OTLP_ENDPOINT=http://127.0.0.1:1
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
    TESSERA_STORAGE__SERVER__LISTEN=127.0.0.1:0 TESSERA_STORAGE__ADMIN__LISTEN=127.0.0.1:0 "${st_env[@]}" \
    TESSERA_STORAGE__DATA_DIR="$E2E_TMP/storage-$i"
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
    TESSERA_GATEWAY__SERVER__LISTEN=127.0.0.1:0 TESSERA_GATEWAY__ADMIN__LISTEN=127.0.0.1:0 "${gw_env[@]}" \
    TESSERA_GATEWAY__KEYSERVER__ADDRESS="$KS_ADDR" \
    TESSERA_GATEWAY__WATERMARK__ADDRESS="$WM_ADDR" \
    TESSERA_GATEWAY__SEGMENTATION__ADDRESS="$SEG_ADDR" \
    TESSERA_GATEWAY__STORAGE_NODES="$NODES" \
    TESSERA_GATEWAY__VAULT__PATH="$E2E_TMP/vault.redb" \
    TESSERA_GATEWAY__VAULT__KEY_FILE="$VAULT_KEY"

  # The DICOM values: the binary must accept the rendered [dicom.scp] (a
  # rejected config exits 64), serve it, and answer C-ECHO for the rendered
  # called AE title and calling AE titles only.
  DCFG="$E2E_TMP/r-dicom/config/gateway-config.toml"
  dgw_env=("${gw_env[@]}"
    TESSERA_GATEWAY__KEYSERVER__ADDRESS="$KS_ADDR"
    TESSERA_GATEWAY__WATERMARK__ADDRESS="$WM_ADDR"
    TESSERA_GATEWAY__SEGMENTATION__ADDRESS="$SEG_ADDR"
    TESSERA_GATEWAY__STORAGE_NODES="$NODES"
    TESSERA_GATEWAY__VAULT__PATH="$E2E_TMP/vault-dicom.redb"
    TESSERA_GATEWAY__VAULT__KEY_FILE="$VAULT_KEY")
  exits_64() { # exits_64 GREP VAR=VALUE...: the gateway refuses the DICOM config, naming GREP
    local want=$1 rc=0
    shift
    env "${dgw_env[@]}" TESSERA_GATEWAY__SERVER__LISTEN=127.0.0.1:0 TESSERA_GATEWAY__ADMIN__LISTEN=127.0.0.1:0 "$@" \
      timeout 30 "$TESSERA_BIN_DIR/gateway" --config "$DCFG" >/dev/null 2>"$E2E_TMP/gateway-64.log" || rc=$?
    [ "$rc" -eq 64 ] && grep -q "$want" "$E2E_TMP/gateway-64.log" && return 0
    echo "exit $rc, expected 64 naming $want:"
    tail -n 5 "$E2E_TMP/gateway-64.log"
    return 1
  }
  check "gateway exits 64 when the rendered [dicom.scp] owner is overridden with a service identity" \
    exits_64 dicom.scp.owner TESSERA_GATEWAY__DICOM__SCP__OWNER=spiffe://tessera.local/service/gateway
  SERVICE_ADDR=
  run_rendered "gateway (DICOM SCP values)" gateway "$DCFG" tessera.gateway.v1.Gateway \
    TESSERA_GATEWAY__SERVER__LISTEN=127.0.0.1:0 TESSERA_GATEWAY__ADMIN__LISTEN=127.0.0.1:0 "${dgw_env[@]}" \
    TESSERA_GATEWAY__DICOM__SCP__LISTEN=127.0.0.1:0 TESSERA_GATEWAY__DICOMWEB__LISTEN=127.0.0.1:0
  DGW_OUT="$E2E_TMP/gateway.$((${#E2E_PIDS[@]} - 1)).out"
  DICOM_ADDR=$(sed -n 's/^dicom_listening=//p' "$DGW_OUT" 2>/dev/null | head -n 1)
  check "gateway (DICOM SCP values) prints dicom_listening=ADDR (${DICOM_ADDR:-none})" test -n "$DICOM_ADDR"
  WEB_ADDR=$(sed -n 's/^dicomweb_listening=//p' "$DGW_OUT" 2>/dev/null | head -n 1)
  check "gateway (DICOM values) serves the rendered [dicomweb]: dicomweb_listening=ADDR (${WEB_ADDR:-none})" test -n "$WEB_ADDR"
  web_status() { # web_status WHO: the HTTP status of QIDO-RS /studies as WHO over mutual TLS
    curl -sS -o /dev/null -w '%{http_code}' --max-time 20 --cacert "$PKI/ca.crt" \
      --cert "$PKI/$1.crt" --key "$PKI/$1.key" "https://${WEB_ADDR:-127.0.0.1:1}/studies"
  }
  check "DICOMweb of the rendered config answers QIDO-RS over mutual TLS (owner: 200)" out_has "^200$" web_status owner
  check "DICOMweb of the rendered config: an identity without a role gets 403" out_has "^403$" web_status outsider
  DICOM_ADDR=${DICOM_ADDR:-127.0.0.1:1}
  mapfile -t scp_aes < <(hc gateway-scp "$E2E_TMP/r-dicom")
  echo_as() { # echo_as CALLED CALLING: pynetdicom's echoscu against the SCP
    python3 -m pynetdicom echoscu "${DICOM_ADDR%:*}" "${DICOM_ADDR##*:}" -aec "$1" -aet "$2" -v 2>&1
  }
  echo_ok() { # echo_ok CALLED CALLING: C-ECHO status 0x0000
    local out
    out=$(echo_as "$1" "$2")
    grep -q "Status: 0x0000" <<<"$out" || { echo "$out"; return 1; }
  }
  DGW_LOG="${DGW_OUT%.out}.log"
  # echo_rejected CALLED CALLING WHY: the association is not accepted (no
  # C-ECHO) and the gateway logs its A-ASSOCIATE-RJ for WHY. The gateway's
  # log is the witness: it closes the connection right after the RJ, and
  # pynetdicom then sometimes reports an abort instead of the rejection.
  echo_rejected() {
    local out before
    before=$(grep -c "association rejected.*$3" "$DGW_LOG" || true)
    out=$(echo_as "$1" "$2")
    if grep -qE "Association Accepted|Status: 0x|unable to connect" <<<"$out"; then
      echo "$out"
      return 1
    fi
    local i
    for i in $(seq 1 20); do
      [ "$(grep -c "association rejected.*$3" "$DGW_LOG" || true)" -gt "$before" ] && return 0
      sleep 0.1
    done
    echo "the gateway logged no rejection for $3; echoscu: $out"
    return 1
  }
  for ae in "${scp_aes[@]:1}"; do
    check "C-ECHO to ${scp_aes[0]} from rendered calling AE $ae: success" echo_ok "${scp_aes[0]}" "$ae"
  done
  check "C-ECHO from a calling AE not in allowedCallingAEs: rejected" \
    echo_rejected "${scp_aes[0]}" INTRUDER "calling AE title not recognized"
  check "C-ECHO to another called AE title: rejected" \
    echo_rejected OTHERPACS "${scp_aes[1]}" "called AE title not recognized"
else
  E2E_FAILED=$((E2E_FAILED + 1))
  echo "FAIL - gateway: $TESSERA_BIN_DIR/gateway not built (the rendered DICOM config cannot be checked)"
fi

# --- tessera pki init --dns: certificates for in-cluster names ---
expect_fail() { if "$@" >/dev/null 2>&1; then echo "succeeded: $*"; return 1; fi; }
KPKI="$E2E_TMP/kpki"
check "pki init --dns writes a PKI naming the Services" \
  "$TESSERA_BIN_DIR/tessera" pki init --dir "$KPKI" --dns tessera.svc tessera.svc.cluster.local
check "pki init refuses to overwrite it" expect_fail "$TESSERA_BIN_DIR/tessera" pki init --dir "$KPKI" --dns
KEK2="$E2E_TMP/keyserver2.kek"
head -c 32 /dev/urandom >"$KEK2"
chmod 600 "$KEK2"
kg() { # kg SERVERNAME ARGS...: grpcurl as the --dns PKI's owner
  local sn=$1
  shift
  grpcurl -max-time 20 -cacert "$KPKI/ca.crt" -cert "$KPKI/owner.crt" -key "$KPKI/owner.key" -servername "$sn" "$@"
}
K2=127.0.0.1:1
if start_with_env keyserver "$CFG/keyserver-config.toml" \
  TESSERA_KEYSERVER__SERVER__LISTEN=127.0.0.1:0 TESSERA_KEYSERVER__ADMIN__LISTEN=127.0.0.1:0 \
  TESSERA_KEYSERVER__SERVER__TLS__CA="$KPKI/ca.crt" \
  TESSERA_KEYSERVER__SERVER__TLS__CERT="$KPKI/keyserver.crt" \
  TESSERA_KEYSERVER__SERVER__TLS__KEY="$KPKI/keyserver.key" \
  TESSERA_KEYSERVER__KEYSERVER__DB_PATH="$E2E_TMP/keyserver2.redb" \
  TESSERA_KEYSERVER__KEYSERVER__KEK_FILE="$KEK2"; then
  K2=$SERVICE_ADDR
else # counted: the refusal check below would otherwise pass on a keyserver that never ran
  failed "keyserver on pki init --dns certificates did not start"
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
check "dialled as keyserver.tessera.svc.cluster.local: SERVING" health_as keyserver.tessera.svc.cluster.local
lists() { kg keyserver "$K2" list | grep -qx tessera.keyserver.v1.KeyServer; }
check "reflection list as the --dns PKI owner" lists
check "the keyserver certificate does not pass for storage-1" expect_refused health_as storage-1

e2e_finish
