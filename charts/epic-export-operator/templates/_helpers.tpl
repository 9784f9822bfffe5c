{{/* The chart name, or nameOverride. */}}
{{- define "epic-export-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, with the chart name unless it already contains it. */}}
{{- define "epic-export-operator.fullname" -}}
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

{{- define "epic-export-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "epic-export-operator.labels" -}}
helm.sh/chart: {{ include "epic-export-operator.chart" . }}
{{ include "epic-export-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: epic-export
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels that select the operator's pods. */}}
{{- define "epic-export-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epic-export-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "epic-export-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "epic-export-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image: repository@digest, or repository:tag (default the appVersion). */}}
{{- define "epic-export-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Leader election is on exactly when there is more than one replica. */}}
{{- define "epic-export-operator.leaderElection" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ else }}false{{ end }}
{{- end }}

{{/*
The rules the controller uses, the same as examples/operator.yaml (scripts/check_manifests.py compares
them), plus with keyRotation.enabled the rule commented out there. Bound cluster-wide by a ClusterRole,
or in watchNamespace by a Role.
*/}}
{{- define "epic-export-operator.rules" -}}
# The EpicExports it reconciles, and their status (where it also publishes each key Secret's public
# keys for the JWK Set server).
- apiGroups: [fhirexport.dev]
  resources: [epicexports]
  verbs: [get, list, watch]
- apiGroups: [fhirexport.dev]
  resources: [epicexports/status]
  verbs: [get, patch]
# The runs: it creates, adopts, stops (concurrencyPolicy Replace) and cleans up export Jobs, and reads
# the pods' termination messages (the run reports).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
# References, read by name when an export is reconciled: the key Secret, the roster and resource
# ConfigMaps, and for the run e-mail smtpSecretRef and caCertRef. Never listed or watched: `get` by
# name cannot enumerate Secrets (list or watch would read them all). Secret contents are never logged
# or copied; of a key only its public half goes into the status.
- apiGroups: [""]
  resources: [secrets, configmaps]
  verbs: [get]
# Events on the EpicExports (the recorder patches repeated ones into a series).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.keyRotation.enabled }}
# Key rotation (keyRotation.enabled): it rewrites the key Secrets (next key, switch, old key retired).
- apiGroups: [""]
  resources: [secrets]
  verbs: [update]
{{- end }}
{{- end }}

{{/*
The JWK Set server's rules: it serves what the EpicExports' status publishes, from a watch, and reads
nothing else (no Secrets): the internet-facing process cannot read any key.
*/}}
{{- define "epic-export-operator.jwksRules" -}}
- apiGroups: [fhirexport.dev]
  resources: [epicexports]
  verbs: [get, list, watch]
{{- end }}

{{/* The JWK Set server's objects: <fullname>-jwks. */}}
{{- define "epic-export-operator.jwksFullname" -}}
{{- printf "%s-jwks" (include "epic-export-operator.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{/* The labels that select the JWK Set server's pods (never the operator's: another name). */}}
{{- define "epic-export-operator.jwksSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-jwks" (include "epic-export-operator.name" . | trunc 58 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the JWK Set server's objects. */}}
{{- define "epic-export-operator.jwksLabels" -}}
helm.sh/chart: {{ include "epic-export-operator.chart" . }}
{{ include "epic-export-operator.jwksSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: jwks
app.kubernetes.io/part-of: epic-export
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "epic-export-operator.jwksServiceAccountName" -}}
{{- if .Values.jwks.serviceAccount.create }}
{{- default (include "epic-export-operator.jwksFullname" .) .Values.jwks.serviceAccount.name }}
{{- else }}
{{- required "jwks.serviceAccount.name is required when jwks.serviceAccount.create is false" .Values.jwks.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The JWK Set server's checks: a health port of its own; an Ingress only with the endpoint and a host. */}}
{{- define "epic-export-operator.jwksChecks" -}}
{{- if .Values.jwks.enabled }}
{{- if eq (int .Values.jwks.port) (int .Values.jwks.healthPort) }}
{{- fail (printf "jwks.port and jwks.healthPort are both %d: the JWK Set endpoint and /healthz need a port each" (int .Values.jwks.port)) }}
{{- end }}
{{- end }}
{{- if .Values.jwks.ingress.enabled }}
{{- if not .Values.jwks.enabled }}
{{- fail "jwks.ingress.enabled needs jwks.enabled: the Ingress routes to the JWK Set endpoint" }}
{{- end }}
{{- required "jwks.ingress.host is required when jwks.ingress.enabled is true: the public host name Epic fetches https://<host>/jwks/<namespace>/<export>.json from" .Values.jwks.ingress.host | trunc 0 }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rules of every pod of the chart: DNS and the Kubernetes API server. */}}
{{- define "epic-export-operator.egressToCluster" -}}
# DNS.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# The Kubernetes API server (watches, Jobs, status, Events, the Lease).
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.apiServer.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
