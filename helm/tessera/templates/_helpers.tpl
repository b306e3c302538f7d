{{/*
Shared helpers. Every service's config is rendered here as TOML, from values,
with the exact keys of its Rust config struct (serde deny_unknown_fields:
an extra key is a start-up error, exit 64). Strings go through toJson (a JSON
string is a valid TOML basic string); numbers through int64 (Helm reads YAML
numbers as float64, which would print 2.68435456e+08).
*/}}

{{/* Mount points inside every container. */}}
{{- define "tessera.configDir" -}}/etc/tessera{{- end }}
{{- define "tessera.pkiDir" -}}/pki{{- end }}
{{- define "tessera.dataDir" -}}/data{{- end }}
{{- define "tessera.secretsDir" -}}/secrets{{- end }}
{{/* The TLS private key, copied 0400 out of the Secret (see tessera.tlsKeyInit). */}}
{{- define "tessera.tlsKeyDir" -}}/pki-key{{- end }}

{{- define "tessera.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Call with (dict "root" $ "component" "keyserver" "name" "keyserver"). */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
tessera.io/service: {{ .name }}
{{- end }}

{{- define "tessera.labels" -}}
{{ include "tessera.selectorLabels" . }}
helm.sh/chart: {{ include "tessera.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tessera
{{- end }}

{{- define "tessera.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* spiffe://<trustDomain>/service/<name>. Call with (list $ "gateway"). */}}
{{- define "tessera.serviceIdentity" -}}
{{- $root := index . 0 -}}
{{ printf "spiffe://%s/service/%s" $root.Values.access.trustDomain (index . 1) }}
{{- end }}

{{/* "<name>:<port>": the address clients dial (the DNS SAN the server
certificate must carry is <name>). Call with (list "keyserver" 7400). */}}
{{- define "tessera.address" -}}
{{ printf "%s:%d" (index . 0) (index . 1 | int) }}
{{- end }}

{{/* A TOML array of strings from a list. */}}
{{- define "tessera.tomlStrings" -}}
[{{ range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s | toString | toJson }}{{ end }}]
{{- end }}

{{/* A string as one shell word (single-quoted unless it is plain). */}}
{{- define "tessera.shellWord" -}}
{{- if regexMatch "^[A-Za-z0-9_./:-]+$" . -}}
{{ . }}
{{- else -}}
{{ printf "'%s'" (replace "'" "'\\''" .) }}
{{- end -}}
{{- end }}

{{/* Values sanity checks that a schema cannot express. */}}
{{- define "tessera.validate" -}}
{{- $ep := .Values.telemetry.otlpEndpoint | default "" -}}
{{- if and $ep (not (regexMatch "^https?://" $ep)) -}}
{{- fail (printf "telemetry.otlpEndpoint %q: use http(s)://host:port" $ep) -}}
{{- end -}}
{{- $n := .Values.storage.replicas | int -}}
{{- if or (lt $n 2) (gt $n 16) -}}
{{- fail (printf "storage.replicas is %d: use 2..16 (two shares go to distinct nodes; the gateway places on at most 16)" $n) -}}
{{- end -}}
{{- /* One size limit (issue 20): the nodes' cap follows gateway.maxImageBytes. */ -}}
{{- $maxImage := .Values.gateway.maxImageBytes | int64 -}}
{{- $need := include "tessera.nodeObjectBytesNeeded" . | int64 -}}
{{- $cap := include "tessera.storageMaxObjectBytes" . | int64 -}}
{{- if lt $cap $need -}}
{{- fail (printf "storage.maxObjectBytes is %d, below the %d bytes per object that gateway.maxImageBytes = %d needs on every node: leave it unset (null) to derive it, raise it, or lower gateway.maxImageBytes" $cap $need $maxImage) -}}
{{- end -}}
{{- if gt $cap 1073741824 -}}
{{- fail (printf "gateway.maxImageBytes = %d needs %d bytes per object on a storage node, over the node's hard cap of 1 GiB: lower it or enable storage.erasure" $maxImage $cap) -}}
{{- end -}}
{{- if gt $cap (.Values.storage.capacityBytes | int64) -}}
{{- fail (printf "storage.maxObjectBytes (%d, derived from gateway.maxImageBytes unless set) must not exceed storage.capacityBytes" $cap) -}}
{{- end -}}
{{- $_ := include "tessera.storageConcurrentPuts" . -}}
{{- range $svc := list "watermark" "segmentation" -}}
{{- $own := (index $.Values $svc).maxImageBytes -}}
{{- if and (not (kindIs "invalid" $own)) (lt ($own | int64) $maxImage) -}}
{{- fail (printf "%s.maxImageBytes (%d) is below gateway.maxImageBytes (%d): images the gateway accepts would be refused there; leave it unset (null) to follow the gateway" $svc ($own | int64) $maxImage) -}}
{{- end -}}
{{- end -}}
{{- /* gateway.dicom may be absent: an upgrade with --reuse-values from a release before it */ -}}
{{- $scp := ((.Values.gateway.dicom | default dict).scp | default dict) -}}
{{- if $scp.enabled -}}
{{- if not $scp.allowedCallingAEs -}}
{{- fail "gateway.dicom.scp.enabled needs gateway.dicom.scp.allowedCallingAEs: the calling AE titles allowed to send (e.g. [\"CT01\"])" -}}
{{- end -}}
{{- if not $scp.owner -}}
{{- fail (printf "gateway.dicom.scp.enabled needs gateway.dicom.scp.owner: the data owner of received studies (spiffe://%s/user/<name>)" .Values.access.trustDomain) -}}
{{- end -}}
{{- $td := printf "spiffe://%s/user/" .Values.access.trustDomain -}}
{{- if not (hasPrefix $td $scp.owner) -}}
{{- fail (printf "gateway.dicom.scp.owner %q: use a user identity of access.trustDomain (%s<name>)" $scp.owner $td) -}}
{{- end -}}
{{- if and $scp.service.loadBalancerSourceRanges (ne $scp.service.type "LoadBalancer") -}}
{{- fail "gateway.dicom.scp.service.loadBalancerSourceRanges applies to service.type LoadBalancer only: restrict a ClusterIP/NodePort DICOM port with a NetworkPolicy" -}}
{{- end -}}
{{- if eq ($scp.port | int) (.Values.gateway.port | int) -}}
{{- fail (printf "gateway.dicom.scp.port %d is gateway.port: use another port" ($scp.port | int)) -}}
{{- end -}}
{{- if not (kindIs "invalid" $scp.tlsPort) -}}
{{- $tp := $scp.tlsPort | int -}}
{{- range $name, $other := dict "gateway.port" .Values.gateway.port "gateway.dicom.scp.port" $scp.port "admin.port" .Values.admin.port -}}
{{- if eq $tp ($other | int) -}}
{{- fail (printf "gateway.dicom.scp.tlsPort %d is %s: use another port" $tp $name) -}}
{{- end -}}
{{- end -}}
{{- $w := (.Values.gateway.dicomweb | default dict) -}}
{{- if and $w.enabled (eq $tp ($w.port | int)) -}}
{{- fail (printf "gateway.dicom.scp.tlsPort %d is gateway.dicomweb.port: use another port" $tp) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $web := (.Values.gateway.dicomweb | default dict) -}}
{{- if $web.enabled -}}
{{- if eq ($web.port | int) (.Values.gateway.port | int) -}}
{{- fail (printf "gateway.dicomweb.port %d is gateway.port: use another port" ($web.port | int)) -}}
{{- end -}}
{{- if and $scp.enabled (eq ($web.port | int) ($scp.port | int)) -}}
{{- fail (printf "gateway.dicomweb.port %d is gateway.dicom.scp.port: use another port" ($web.port | int)) -}}
{{- end -}}
{{- if eq ($web.port | int) (.Values.admin.port | int) -}}
{{- fail (printf "gateway.dicomweb.port %d is admin.port: use another port" ($web.port | int)) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
[server] and [telemetry] tables of every service (the last tables of the
file: callers put their own top-level keys first). Call with
(dict "root" $ "port" 7400).
*/}}
{{- define "tessera.serverToml" -}}
{{- $v := .root.Values -}}
[server]
listen = {{ printf "%s:%d" $v.server.listenHost (.port | int) | toJson }}
max_concurrent_streams = {{ $v.server.maxConcurrentStreams | int64 }}

[server.tls]
ca = {{ printf "%s/ca.crt" (include "tessera.pkiDir" .) | toJson }}
cert = {{ printf "%s/tls.crt" (include "tessera.pkiDir" .) | toJson }}
key = {{ printf "%s/tls.key" (include "tessera.tlsKeyDir" .) | toJson }}

[server.access]
trust_domain = {{ $v.access.trustDomain | toJson }}
dev_roles = {{ $v.access.devRoles }}
{{- if $v.access.roles }}

[server.access.roles]
{{- range $id, $roles := $v.access.roles }}
{{ $id | toJson }} = {{ include "tessera.tomlStrings" $roles }}
{{- end }}
{{- end }}

[admin]
listen = {{ printf "%s:%d" $v.server.listenHost ($v.admin.port | int) | toJson }}

[telemetry]
log = {{ $v.telemetry.log | toJson }}
json = {{ $v.telemetry.json }}
{{- if $v.telemetry.otlpEndpoint }}
otlp_endpoint = {{ $v.telemetry.otlpEndpoint | toJson }}
{{- end }}
{{- end }}

{{/* Client TLS files: the service's own certificate (a [..tls] table body). */}}
{{- define "tessera.clientTlsToml" -}}
ca = {{ printf "%s/ca.crt" (include "tessera.pkiDir" .) | toJson }}
cert = {{ printf "%s/tls.crt" (include "tessera.pkiDir" .) | toJson }}
key = {{ printf "%s/tls.key" (include "tessera.tlsKeyDir" .) | toJson }}
{{- end }}

{{/* ---------------- per-service config files ---------------- */}}

{{- define "tessera.config.gateway" -}}
{{- $v := .Values -}}
# gateway --config: rendered by the Tessera chart from values.
[client_tls]
{{ include "tessera.clientTlsToml" . }}

# Each upstream must present exactly this identity (its URI SAN). Calls
# balance over every address the name resolves to, looked up again every
# resolve_secs (the watermark and segmentation Services are headless).
{{- $resolve := $v.gateway.upstreamResolveSecs | default 0 | int64 }}
[keyserver]
address = {{ include "tessera.address" (list "keyserver" $v.keyserver.port) | toJson }}
identity = {{ include "tessera.serviceIdentity" (list . "keyserver") | toJson }}
resolve_secs = {{ $resolve }}

[watermark]
address = {{ include "tessera.address" (list "watermark" $v.watermark.port) | toJson }}
identity = {{ include "tessera.serviceIdentity" (list . "watermark") | toJson }}
resolve_secs = {{ $resolve }}

[segmentation]
address = {{ include "tessera.address" (list "segmentation" $v.segmentation.port) | toJson }}
identity = {{ include "tessera.serviceIdentity" (list . "segmentation") | toJson }}
resolve_secs = {{ $resolve }}
{{- range $i := until ($v.storage.replicas | int) }}
{{- $node := printf "storage-%d" (add1 $i) }}

[[storage_nodes]]
name = {{ $node | toJson }}
address = {{ include "tessera.address" (list $node $v.storage.port) | toJson }}
identity = {{ include "tessera.serviceIdentity" (list $ $node) | toJson }}
{{- with $v.storage.zones }}{{ with index . $i }}
zone = {{ . | toJson }}
{{- end }}{{ end }}
{{- end }}
{{- with $v.storage.erasure }}
{{- if .enabled }}

# Every stored object as data + parity fragments on distinct nodes.
[erasure]
data = {{ .data | int64 }}
parity = {{ .parity | int64 }}
repair_interval_secs = {{ .repairIntervalSecs | default 3600 | int64 }}
hedge_after_ms = {{ .hedgeAfterMs | default 250 | int64 }}
orphan_grace_secs = {{ .orphanGraceSecs | default 3600 | int64 }}
{{- end }}
{{- end }}
{{- $t := $v.gateway.upstreamTimeouts | default dict }}

[upstream_timeouts]
connect_secs = {{ $t.connectSecs | default 5 | int64 }}
call_secs = {{ $t.callSecs | default 30 | int64 }}
stream_secs = {{ $t.streamSecs | default 600 | int64 }}

[vault]
{{- if eq $v.gateway.vault.backend "postgres" }}
backend = "postgres"
postgres_url_file = {{ printf "%s/vault-postgres.url" (include "tessera.secretsDir" .) | toJson }}
lease_secs = {{ $v.gateway.vault.leaseSecs | int64 }}
{{- else }}
path = {{ printf "%s/vault.redb" (include "tessera.dataDir" .) | toJson }}
{{- end }}
key_file = {{ printf "%s/vault.key" (include "tessera.secretsDir" .) | toJson }}

[gateway]
max_image_bytes = {{ $v.gateway.maxImageBytes | int64 }}
max_concurrent_jobs = {{ $v.gateway.maxConcurrentJobs | int64 }}

[dicom]
{{- $dicom := $v.gateway.dicom | default dict }}
temporal = {{ $dicom.temporal | default "remove" | toJson }}
file_requests = {{ $dicom.fileRequests | default false }}
{{- with $dicom.scp }}
{{- if .enabled }}

# C-STORE / C-ECHO SCP: plain DICOM, for the trusted hospital network only.
[dicom.scp]
listen = {{ printf "%s:%d" $v.server.listenHost (.port | int) | toJson }}
{{- if not (kindIs "invalid" .tlsPort) }}
# DICOM TLS (PS3.15 Annex B): the [server.tls] certificate and CA.
tls_listen = {{ printf "%s:%d" $v.server.listenHost (.tlsPort | int) | toJson }}
{{- end }}
ae_title = {{ .aeTitle | toJson }}
allowed_calling_aes = {{ include "tessera.tomlStrings" .allowedCallingAEs }}
owner = {{ .owner | toJson }}
max_associations = {{ .maxAssociations | int64 }}
idle_timeout_secs = {{ .idleTimeoutSecs | int64 }}
{{- end }}
{{- end }}
{{- with $v.gateway.dicomweb }}
{{- if .enabled }}

# DICOMweb over mutual TLS (the [server.tls] certificate and CA).
[dicomweb]
listen = {{ printf "%s:%d" $v.server.listenHost (.port | int) | toJson }}
max_request_bytes = {{ .maxRequestBytes | int64 }}
{{- end }}
{{- end }}

{{ include "tessera.serverToml" (dict "root" . "port" $v.gateway.port) }}
{{- end }}

{{- define "tessera.config.keyserver" -}}
{{- $v := .Values -}}
{{- $derive := $v.keyserver.deriveIdentities | default (list (include "tessera.serviceIdentity" (list . "gateway")) (include "tessera.serviceIdentity" (list . "watermark"))) -}}
# keyserver --config: rendered by the Tessera chart from values.
[keyserver]
{{- if ne $v.keyserver.store.backend "postgres" }}
db_path = {{ printf "%s/keyserver.redb" (include "tessera.dataDir" .) | toJson }}
{{- end }}
kek_file = {{ printf "%s/keyserver.kek" (include "tessera.secretsDir" .) | toJson }}
gateway_identity = {{ $v.keyserver.gatewayIdentity | default (include "tessera.serviceIdentity" (list . "gateway")) | toJson }}
derive_identities = {{ include "tessera.tomlStrings" $derive }}
checkpoint_every = {{ $v.keyserver.checkpointEvery | int64 }}
max_grant_ttl_secs = {{ $v.keyserver.maxGrantTtlSecs | int64 }}
max_grant_uses = {{ $v.keyserver.maxGrantUses | int64 }}
{{- if eq $v.keyserver.store.backend "postgres" }}

# State and audit chain in PostgreSQL, shared by the replicas (decision 24).
[keyserver.store]
backend = "postgres"
postgres_url_file = {{ printf "%s/keyserver-postgres.url" (include "tessera.secretsDir" .) | toJson }}
{{- end }}

{{ include "tessera.serverToml" (dict "root" . "port" $v.keyserver.port) }}
{{- end }}

{{- define "tessera.config.watermark" -}}
{{- $v := .Values -}}
{{- $callers := $v.watermark.allowedCallers | default (list (include "tessera.serviceIdentity" (list . "gateway"))) -}}
# watermark --config: rendered by the Tessera chart from values.
{{- $t := $v.watermark.keyserverTimeouts | default dict }}
[keyserver]
address = {{ include "tessera.address" (list "keyserver" $v.keyserver.port) | toJson }}
identity = {{ include "tessera.serviceIdentity" (list . "keyserver") | toJson }}
connect_timeout_secs = {{ $t.connectSecs | default 5 | int64 }}
call_timeout_secs = {{ $t.callSecs | default 30 | int64 }}
# Keyserver replicas on PostgreSQL sit behind a headless Service: balance
# over every one, as the gateway does.
{{- $ks := $v.keyserver }}
{{- if and (eq $ks.store.backend "postgres") (eq $ks.service.type "ClusterIP") }}
resolve_secs = {{ $v.gateway.upstreamResolveSecs | default 0 | int64 }}
{{- else }}
resolve_secs = 0
{{- end }}

[keyserver.tls]
{{ include "tessera.clientTlsToml" . }}

[watermark]
allowed_callers = {{ include "tessera.tomlStrings" $callers }}
max_image_bytes = {{ $v.watermark.maxImageBytes | default $v.gateway.maxImageBytes | int64 }}
max_concurrent_jobs = {{ $v.watermark.maxConcurrentJobs | int64 }}

{{ include "tessera.serverToml" (dict "root" . "port" $v.watermark.port) }}
{{- end }}

{{- define "tessera.config.segmentation" -}}
{{- $v := .Values -}}
{{- $callers := $v.segmentation.allowedCallers | default (list (include "tessera.serviceIdentity" (list . "gateway"))) -}}
# segmentation --config: rendered by the Tessera chart from values.
[segmentation]
allowed_callers = {{ include "tessera.tomlStrings" $callers }}
max_image_bytes = {{ $v.segmentation.maxImageBytes | default $v.gateway.maxImageBytes | int64 }}
max_concurrent_jobs = {{ $v.segmentation.maxConcurrentJobs | int64 }}

{{ include "tessera.serverToml" (dict "root" . "port" $v.segmentation.port) }}
{{- end }}

{{/* Call with (dict "root" $ "node" "storage-2"). */}}
{{- define "tessera.config.storage" -}}
{{- $v := .root.Values -}}
# storage-node --config: rendered by the Tessera chart from values.
node_id = {{ .node | toJson }}
data_dir = {{ include "tessera.dataDir" . | toJson }}
capacity_bytes = {{ $v.storage.capacityBytes | int64 }}
max_object_bytes = {{ include "tessera.storageMaxObjectBytes" .root }}
max_concurrent_puts = {{ include "tessera.storageConcurrentPuts" .root }}

{{ include "tessera.serverToml" (dict "root" .root "port" $v.storage.port) }}
{{- end }}

{{/*
The per-object cap every storage node needs so that any image or DICOM
instance within gateway.maxImageBytes can be placed (the gateway's
sizes::node_object_bytes_needed): max + max/8 + max/4 + 128 KiB per whole
object; with erasure coding one fragment of it (ceil(whole / k), rounded up
to even, plus a 512-byte header).
*/}}
{{- define "tessera.nodeObjectBytesNeeded" -}}
{{- $max := .Values.gateway.maxImageBytes | int64 -}}
{{- $whole := add $max (div $max 8) (div $max 4) 131072 -}}
{{- $e := .Values.storage.erasure | default dict -}}
{{- if $e.enabled -}}
{{- $k := $e.data | int64 -}}
{{- $per := div (add $whole $k -1) $k -}}
{{- add $per (mod $per 2) 512 -}}
{{- else -}}
{{- $whole -}}
{{- end -}}
{{- end -}}

{{/* storage.maxObjectBytes, or (null) the cap gateway.maxImageBytes needs. */}}
{{- define "tessera.storageMaxObjectBytes" -}}
{{- if kindIs "invalid" .Values.storage.maxObjectBytes -}}
{{- include "tessera.nodeObjectBytesNeeded" . -}}
{{- else -}}
{{- .Values.storage.maxObjectBytes | int64 -}}
{{- end -}}
{{- end -}}

{{/* A memory quantity ("1536Mi", "2Gi", "1G", "800000000") in bytes; 0 when
empty. Milli and exponent forms are not accepted (the chart fails). */}}
{{- define "tessera.memBytes" -}}
{{- $q := toString . -}}
{{- if not $q -}}0
{{- else if regexMatch "^[0-9]+$" $q -}}{{ $q }}
{{- else -}}
{{- $m := regexFind "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)$" $q -}}
{{- if not $m -}}{{ fail (printf "memory quantity %q: use an integer with Ki, Mi, Gi, Ti, k, M, G or T" $q) }}{{- end -}}
{{- $unit := regexFind "(Ki|Mi|Gi|Ti|k|M|G|T)$" $q -}}
{{- $n := trimSuffix $unit $q | int64 -}}
{{- $mul := get (dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000) $unit | int64 -}}
{{- mul $n $mul -}}
{{- end -}}
{{- end -}}

{{/* What a storage node keeps for itself besides the buffered uploads. */}}
{{- define "tessera.storageReserveBytes" -}}268435456{{- end -}}

{{/*
storage.maxConcurrentPuts, or (null) as many uploads of the per-object cap
as fit the memory limit beside the node's reserve, at most 8 (8 without a
limit). Fails when even one does not fit, or a set value does not.
*/}}
{{- define "tessera.storageConcurrentPuts" -}}
{{- $cap := include "tessera.storageMaxObjectBytes" . | int64 -}}
{{- $limit := include "tessera.memBytes" (((.Values.storage.resources | default dict).limits | default dict).memory | default "") | int64 -}}
{{- $reserve := include "tessera.storageReserveBytes" . | int64 -}}
{{- $set := .Values.storage.maxConcurrentPuts -}}
{{- $puts := 8 -}}
{{- if not (kindIs "invalid" $set) -}}
{{- $puts = $set | int64 -}}
{{- else if gt $limit 0 -}}
{{- $puts = min 8 (div (sub $limit $reserve) $cap) -}}
{{- end -}}
{{- if and (gt $limit 0) (or (lt $puts 1) (gt (add (mul $puts $cap) $reserve) $limit)) -}}
{{- fail (printf "storage: %d uploads of %d bytes (storage.maxConcurrentPuts x the per-object cap) plus 256 MiB do not fit storage.resources.limits.memory (%d bytes): lower maxConcurrentPuts (null: as many as fit), raise the limit, or enable storage.erasure" (max $puts 1) $cap $limit) -}}
{{- end -}}
{{- $puts -}}
{{- end -}}

{{/* ---------------- pod building blocks ---------------- */}}

{{/*
Probes: httpGet on the admin listener (plain HTTP, `[admin]`, port
`admin.port`), never on the mutual-TLS gRPC port (a probe there is a TLS
handshake the server logs as an EOF every few seconds). `/live` answers
while the process serves; `/ready` when the service's own check passes
(its database opened, its upstreams answer) and 503 with the reason
otherwise.
*/}}
{{- define "tessera.probes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  httpGet:
    path: /live
    port: admin
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
readinessProbe:
  httpGet:
    path: /ready
    port: admin
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
livenessProbe:
  httpGet:
    path: /live
    port: admin
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
{{- end }}

{{/* Pod spec lines shared by every pod. Call with (dict "root" $ "c" .Values.<component>). */}}
{{- define "tessera.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The main container's fixed parts (after its name). Call with (dict "root" $ "c" .Values.<component> "bin" "keyserver"),
optionally with "extraPorts" (list (dict "name" "dicom" "port" 11112)): container ports besides grpc. */}}
{{- define "tessera.container" -}}
image: {{ include "tessera.image" .root | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
command: [{{ printf "/usr/local/bin/%s" .bin | quote }}]
args: ["--config", {{ printf "%s/config.toml" (include "tessera.configDir" .) | quote }}]
ports:
  - name: grpc
    containerPort: {{ .c.port }}
    protocol: TCP
  - name: admin
    containerPort: {{ .root.Values.admin.port | int }}
    protocol: TCP
{{- range .extraPorts }}
  - name: {{ .name }}
    containerPort: {{ .port | int }}
    protocol: TCP
{{- end }}
securityContext:
  {{- toYaml .root.Values.containerSecurityContext | nindent 2 }}
resources:
  {{- toYaml .c.resources | nindent 2 }}
{{ include "tessera.probes" .root }}
{{- end }}

{{/* volumeMounts every main container has. */}}
{{- define "tessera.baseMounts" -}}
- name: config
  mountPath: {{ include "tessera.configDir" . }}
  readOnly: true
- name: pki
  mountPath: {{ include "tessera.pkiDir" . }}
  readOnly: true
- name: pki-key
  mountPath: {{ include "tessera.tlsKeyDir" . }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* volumes every pod has. Call with (dict "root" $ "config" "<configmap>" "tlsSecret" "<secret>"). */}}
{{- define "tessera.baseVolumes" -}}
- name: config
  configMap:
    name: {{ .config }}
- name: pki
  secret:
    secretName: {{ .tlsSecret }}
    # Group-readable: with fsGroup the kubelet adds group read anyway.
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
- name: pki-key
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- end }}

{{/*
The services refuse a TLS private key with group or other permission bits
(as they refuse such a KEK or vault key), and the pki Secret volume is
group-readable (fsGroup). Like tessera.keyCopyInit, an init container copies
tls.key with mode 0400 into a memory-backed emptyDir. Call with
(dict "root" $).
*/}}
{{- define "tessera.tlsKeyInit" -}}
- name: copy-tls-key
  image: {{ include "tessera.image" .root | quote }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["install", "-m", "0400", {{ printf "%s/tls.key" (include "tessera.pkiDir" .) | quote }}, {{ printf "%s/tls.key" (include "tessera.tlsKeyDir" .) | quote }}]
  securityContext:
    {{- toYaml .root.Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
  volumeMounts:
    - name: pki
      mountPath: {{ include "tessera.pkiDir" . }}
      readOnly: true
    - name: pki-key
      mountPath: {{ include "tessera.tlsKeyDir" . }}
{{- end }}

{{/*
The TLS key copy follows the Secret: when cert-manager renews the
certificate (rotationPolicy Always: a new key), this sidecar copies the new
key beside it (a temporary file renamed over the old one, mode 0400), and
the service reloads certificate and key together ([server] tls_reload_secs,
issue 20): no restart. Until both files agree the service keeps the old pair.
*/}}
{{- define "tessera.tlsKeyFollow" -}}
- name: follow-tls-key
  image: {{ include "tessera.image" .root | quote }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      src={{ printf "%s/tls.key" (include "tessera.pkiDir" .) }}; dst={{ printf "%s/tls.key" (include "tessera.tlsKeyDir" .) }}
      while sleep 5; do
        cmp -s "$src" "$dst" || { install -m 0400 "$src" "$dst.new" && mv -f "$dst.new" "$dst"; }
      done
  securityContext:
    {{- toYaml .root.Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 5m, memory: 8Mi}
    limits: {memory: 16Mi}
  volumeMounts:
    - name: pki
      mountPath: {{ include "tessera.pkiDir" . }}
      readOnly: true
    - name: pki-key
      mountPath: {{ include "tessera.tlsKeyDir" . }}
{{- end }}

{{/*
Secret key files (keyserver KEK, gateway vault key) must be mode 0600/0400
and owned by the process: the binaries refuse group/other permission bits.
A Secret volume cannot give that when fsGroup is set (the kubelet adds group
read, kubernetes/kubernetes#57923), so an init container copies the key into
a memory-backed emptyDir with mode 0400. Call with
(dict "root" $ "secret" "<source volume>" "key" "<key in secret>" "file" "<dest name>").
*/}}
{{- define "tessera.keyCopyInit" -}}
- name: copy-{{ .secret }}
  image: {{ include "tessera.image" .root | quote }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["install", "-m", "0400", {{ printf "/secret-src/%s" .key | quote }}, {{ printf "%s/%s" (include "tessera.secretsDir" .) .file | quote }}]
  securityContext:
    {{- toYaml .root.Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
  volumeMounts:
    - name: {{ .secret }}
      mountPath: /secret-src
      readOnly: true
    - name: secrets
      mountPath: {{ include "tessera.secretsDir" . }}
{{- end }}
