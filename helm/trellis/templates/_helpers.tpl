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

{{/* The URL workers and coordctl use to reach the coordinator. */}}
{{- define "trellis.coordinatorURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "trellis.coordinatorName" .) .Release.Namespace (int .Values.coordinator.grpcPort) -}}
{{- end -}}

{{/* etcd client URLs, comma-separated. */}}
{{- define "trellis.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- $name := include "trellis.etcdName" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
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
