{{/* Chart name. */}}
{{- define "trellis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full resource-name prefix, at most 40 characters so that suffixes stay within 63. */}}
{{- define "trellis.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "trellis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels; pass (dict "ctx" $ "component" "coordinator"). */}}
{{- define "trellis.labels" -}}
helm.sh/chart: {{ include "trellis.chart" .ctx }}
{{ include "trellis.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: trellis
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trellis.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "trellis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "trellis.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "trellis.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "trellis.coordinatorName" -}}{{ include "trellis.fullname" . }}-coordinator{{- end -}}
{{- define "trellis.workerName" -}}{{ include "trellis.fullname" . }}-worker{{- end -}}
{{- define "trellis.etcdName" -}}{{ include "trellis.fullname" . }}-etcd{{- end -}}

{{/* "true" when the chart configures mTLS (tls.existingSecret or tls.certManager), else "". */}}
{{- define "trellis.tls" -}}
{{- if or .Values.tls.existingSecret .Values.tls.certManager.enabled -}}true{{- end -}}
{{- end -}}

{{/* The coordinator Service's DNS name (in its certificate). */}}
{{- define "trellis.coordinatorHost" -}}
{{- printf "%s.%s.svc" (include "trellis.coordinatorName" .) .Release.Namespace -}}
{{- end -}}

{{/* The URL workers and coordctl use to reach the coordinator. */}}
{{- define "trellis.coordinatorURL" -}}
{{- printf "%s://%s:%d" (ternary "https" "http" (eq (include "trellis.tls" .) "true")) (include "trellis.coordinatorHost" .) (int .Values.coordinator.grpcPort) -}}
{{- end -}}

{{/* The coordinator's probe, (dict "ctx" $ ["service" NAME]): grpc.health.v1 natively (for
the service NAME when given), or a TCP check with mTLS (native gRPC probes cannot present a
client certificate; the check then cannot tell a wedged coordinator from a healthy one). */}}
{{- define "trellis.coordinatorProbe" -}}
{{- $v := .ctx.Values -}}
{{- if eq (include "trellis.tls" .ctx) "true" -}}
tcpSocket:
  port: {{ $v.coordinator.grpcPort }}
{{- else -}}
grpc:
  port: {{ $v.coordinator.grpcPort }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* Where the certificate files are mounted in every pod that has some. */}}
{{- define "trellis.tlsDir" -}}/etc/trellis/tls{{- end -}}

{{/* The file stem of a certificate: worker-N is worker-<pod name>, the rest as named. */}}
{{- define "trellis.tlsFile" -}}
{{- if hasPrefix "worker-" .stem -}}
{{- printf "worker-%s-%s" (include "trellis.workerName" .ctx) (trimPrefix "worker-" .stem) -}}
{{- else -}}
{{- .stem -}}
{{- end -}}
{{- end -}}

{{/* The volume "tls" with ca.crt and STEM.crt/.key for each of .stems (coordinator, operator,
etcd-server, etcd-client, worker-N), from tls.existingSecret or cert-manager's Secrets. */}}
{{- define "trellis.tlsVolume" -}}
{{- $ctx := .ctx -}}
{{- $full := include "trellis.fullname" $ctx -}}
- name: tls
  projected:
    # 0440: readable by the pods' group (fsGroup) only.
    defaultMode: 288
    sources:
      {{- if $ctx.Values.tls.existingSecret }}
      - secret:
          name: {{ $ctx.Values.tls.existingSecret }}
          items:
            - key: ca.crt
              path: ca.crt
            {{- range .stems }}
            {{- $file := include "trellis.tlsFile" (dict "ctx" $ctx "stem" .) }}
            - key: {{ $file }}.crt
              path: {{ $file }}.crt
            - key: {{ $file }}.key
              path: {{ $file }}.key
            {{- end }}
      {{- else }}
      {{- range $i, $stem := .stems }}
      {{- $file := include "trellis.tlsFile" (dict "ctx" $ctx "stem" $stem) }}
      - secret:
          name: {{ $full }}-tls-{{ $stem }}
          items:
            {{- if eq $i 0 }}
            - key: ca.crt
              path: ca.crt
            {{- end }}
            - key: tls.crt
              path: {{ $file }}.crt
            - key: tls.key
              path: {{ $file }}.key
      {{- end }}
      {{- end }}
{{- end -}}

{{/* coordctl's TLS flags with the operator's certificate (empty without TLS). */}}
{{- define "trellis.coordctlTLSArgs" -}}
{{- if eq (include "trellis.tls" .) "true" -}}
{{- $d := include "trellis.tlsDir" . -}}
- --ca
- {{ $d }}/ca.crt
- --cert
- {{ $d }}/operator.crt
- --key
- {{ $d }}/operator.key
{{- end -}}
{{- end -}}

{{/* etcd client URLs, comma-separated. */}}
{{- define "trellis.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- $name := include "trellis.etcdName" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s.%s.svc:2379" (ternary "https" "http" (eq (include "trellis.tls" $) "true")) $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{- define "trellis.checkpointClaim" -}}
{{- default (printf "%s-checkpoints" (include "trellis.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* Checks the schema cannot express (it expresses most; these name the fix). */}}
{{- define "trellis.validate" -}}
{{- $bundled := .Values.etcd.bundled.enabled -}}
{{- $external := gt (len .Values.etcd.external.endpoints) 0 -}}
{{- if and $bundled $external -}}
{{- fail "etcd: set exactly one of etcd.bundled.enabled=true or etcd.external.endpoints, not both (set etcd.bundled.enabled=false to use the external cluster)" -}}
{{- end -}}
{{- if not (or $bundled $external) -}}
{{- fail "etcd: set exactly one of etcd.bundled.enabled=true or etcd.external.endpoints (none is set)" -}}
{{- end -}}
{{- if and $bundled (eq (mod (int .Values.etcd.bundled.replicas) 2) 0) -}}
{{- fail (printf "etcd.bundled.replicas must be odd (1, 3, 5), got %d" (int .Values.etcd.bundled.replicas)) -}}
{{- end -}}
{{- if and .Values.tls.existingSecret .Values.tls.certManager.enabled -}}
{{- fail "tls: set tls.existingSecret or tls.certManager.enabled=true, not both" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (a cert-manager Issuer or ClusterIssuer that signs with a CA and fills ca.crt)" -}}
{{- end -}}
{{- if and (hasPrefix "cuda" .Values.worker.device) (lt (int .Values.worker.gpusPerWorker) 1) -}}
{{- fail "worker.device is cuda but worker.gpusPerWorker is 0: request at least one GPU or use worker.device=cpu" -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context shared by all Trellis pods. */}}
{{- define "trellis.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "trellis.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ . }}
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "trellis.commonEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
- name: TRELLIS_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- if .Values.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otlpEndpoint | quote }}
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}
