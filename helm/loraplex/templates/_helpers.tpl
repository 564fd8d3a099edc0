{{/*
Names, labels and the values-derived facts several templates share.
*/}}

{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplex.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", kept within 63 characters. */}}
{{- define "loraplex.child" -}}
{{- $root := index . 0 }}
{{- $base := include "loraplex.fullname" $root | trunc (int (sub 62 (len (index . 1)))) | trimSuffix "-" }}
{{- printf "%s-%s" $base (index . 1) }}
{{- end }}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplex
{{- end }}

{{/* Selector labels of one component: (list $ "gateway") */}}
{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "loraplex.componentLabels" -}}
{{ include "loraplex.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "loraplex.gatewayName" -}}{{ include "loraplex.child" (list . "gateway") }}{{- end }}
{{- define "loraplex.engineName" -}}{{ include "loraplex.child" (list . "engine") }}{{- end }}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "loraplex.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Fixed paths inside the pods (gateway and engine agree on them). */}}
{{- define "loraplex.adaptersDir" -}}/var/lib/loraplex/adapters{{- end }}
{{- define "loraplex.modelsDir" -}}/var/lib/loraplex/models{{- end }}
{{- define "loraplex.registryDir" -}}/var/lib/loraplex/registry{{- end }}
{{- define "loraplex.configDir" -}}/etc/loraplex/config{{- end }}
{{- define "loraplex.modelPath" -}}
{{- printf "%s/%s" (include "loraplex.modelsDir" .) (.Values.engine.model.path | trimSuffix "/") }}
{{- end }}

{{/*
Engines. vLLM listens on one fixed container port. The gateway finds every ready engine pod
through the headless Service's DNS name and connects to the pod addresses directly (no
kube-proxy in between), so the port in its engine URL is the container port.
*/}}
{{- define "loraplex.enginePort" -}}8000{{- end }}
{{- define "loraplex.engineHeadlessName" -}}{{ include "loraplex.child" (list . "engine-headless") }}{{- end }}
{{- define "loraplex.engineDiscoveryDns" -}}
{{- printf "%s.%s.svc.%s" (include "loraplex.engineHeadlessName" .) .Release.Namespace (.Values.clusterDomain | trimSuffix ".") }}
{{- end }}
{{- define "loraplex.engineUrl" -}}
{{- printf "http://%s:%s" (include "loraplex.engineHeadlessName" .) (include "loraplex.enginePort" .) }}
{{- end }}

{{/* "true" when the registry lives in an external PostgreSQL. */}}
{{- define "loraplex.postgres" -}}
{{- if or .Values.externalPostgresql.url .Values.externalPostgresql.existingSecret }}true{{ end }}
{{- end }}

{{- define "loraplex.adminSecretName" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecret }}{{ else }}{{ include "loraplex.child" (list . "auth") }}{{ end }}
{{- end }}

{{- define "loraplex.dbSecretName" -}}
{{- if .Values.externalPostgresql.existingSecret }}{{ .Values.externalPostgresql.existingSecret }}{{ else }}{{ include "loraplex.child" (list . "db") }}{{ end }}
{{- end }}

{{- define "loraplex.adaptersClaim" -}}
{{- default (include "loraplex.child" (list . "adapters")) .Values.storage.adapters.existingClaim }}
{{- end }}
{{- define "loraplex.modelsClaim" -}}
{{- default (include "loraplex.child" (list . "models")) .Values.storage.models.existingClaim }}
{{- end }}
{{- define "loraplex.registryClaim" -}}
{{- default (include "loraplex.child" (list . "registry")) .Values.storage.registry.existingClaim }}
{{- end }}

{{/* "true" when the chart's ConfigMap has something to hold. */}}
{{- define "loraplex.hasConfigMap" -}}
{{- if or .Values.tenants.seed .Values.adapters .Values.router.routes }}true{{ end }}
{{- end }}

{{/*
gateway.config → LORAPLEX_* env entries: (list "LORAPLEX_" $map). Strings pass as they are;
numbers, booleans and lists as JSON (pydantic-settings parses both; JSON keeps 2147483648 from
becoming 2.147483648e+09).
*/}}
{{- define "loraplex.configEnv" -}}
{{- $prefix := index . 0 }}
{{- range $key, $value := index . 1 }}
{{- $name := printf "%s%s" $prefix (upper $key) }}
{{- if kindIs "map" $value }}
{{- include "loraplex.configEnv" (list (printf "%s__" $name) $value) }}
{{- else if not (kindIs "invalid" $value) }}
- name: {{ $name }}
  value: {{ if kindIs "string" $value }}{{ $value | quote }}{{ else }}{{ toJson $value | quote }}{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuse value combinations that would install but not work. */}}
{{- define "loraplex.validate" -}}
{{- if not (include "loraplex.postgres" .) }}
{{- if gt (int .Values.gateway.replicas) 1 }}
{{- fail "gateway.replicas > 1 needs externalPostgresql: replicas cannot share a SQLite registry" }}
{{- end }}
{{- if .Values.gateway.autoscaling.enabled }}
{{- fail "gateway.autoscaling needs externalPostgresql: replicas cannot share a SQLite registry" }}
{{- end }}
{{- end }}
{{- if and .Values.router.existingConfigMap .Values.router.routes }}
{{- fail "set router.routes or router.existingConfigMap, not both" }}
{{- end }}
{{- if and .Values.tenants.existingSecret .Values.tenants.seed }}
{{- fail "set tenants.seed or tenants.existingSecret, not both" }}
{{- end }}
{{- if and .Values.auth.existingSecret .Values.auth.adminKeySha256 }}
{{- fail "set auth.adminKeySha256 or auth.existingSecret, not both" }}
{{- end }}
{{- if and .Values.externalPostgresql.existingSecret .Values.externalPostgresql.url }}
{{- fail "set externalPostgresql.url or externalPostgresql.existingSecret, not both" }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas is above maxReplicas" }}
{{- end }}
{{- end }}
