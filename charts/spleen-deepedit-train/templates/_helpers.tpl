{{/* Chart name, trimmed to the 63 characters of a Kubernetes name. */}}
{{- define "spleen-deepedit-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, plus the chart name unless the release name already contains it.
Trimmed to 63 characters (the DNS label limit).
*/}}
{{- define "spleen-deepedit-train.fullname" -}}
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

{{/*
Name of the RayJob: KubeRay appends 6 characters for its RayCluster (at most 53), so at most 47, and a
DNS-1035 label (starts with a letter). Fails with a message instead of a RayJob the operator rejects.
*/}}
{{- define "spleen-deepedit-train.rayName" -}}
{{- $name := include "spleen-deepedit-train.fullname" . | trunc 47 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "RayJob name %q must start with a letter (DNS-1035): choose another release name or set fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "spleen-deepedit-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels of every object. */}}
{{- define "spleen-deepedit-train.labels" -}}
helm.sh/chart: {{ include "spleen-deepedit-train.chart" . }}
{{ include "spleen-deepedit-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: training
{{- end }}

{{/* Labels that select this release's pods (PodMonitors). */}}
{{- define "spleen-deepedit-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spleen-deepedit-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount of the Ray pods. */}}
{{- define "spleen-deepedit-train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spleen-deepedit-train.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container image. */}}
{{- define "spleen-deepedit-train.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Ray Train run name: stable across RayJob retries so that a retry resumes. */}}
{{- define "spleen-deepedit-train.runName" -}}
{{- default .Release.Name .Values.training.runName }}
{{- end }}

{{/* DDP ranks: explicit, else one per GPU of the worker group, else one per worker pod. */}}
{{- define "spleen-deepedit-train.numWorkers" -}}
{{- if gt (int .Values.training.numWorkers) 0 }}
{{- .Values.training.numWorkers | int }}
{{- else }}
{{- mul (int .Values.workers.replicas) (max 1 (int .Values.workers.gpusPerWorker)) }}
{{- end }}
{{- end }}

{{/* ConfigMap holding the training settings (train.yaml). */}}
{{- define "spleen-deepedit-train.configMapName" -}}
{{- printf "%s-config" (include "spleen-deepedit-train.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every Ray pod: selector labels (PodMonitors select on them), Kueue queue, user labels. */}}
{{- define "spleen-deepedit-train.podLabels" -}}
{{ include "spleen-deepedit-train.selectorLabels" . }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* S3 settings of every Ray container: credentials from the Secret (envFrom), endpoint and region as env. */}}
{{- define "spleen-deepedit-train.s3Env" -}}
{{- with .Values.storage.credentialsSecret -}}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
env:
  {{- with .Values.storage.endpoint }}
  - name: AWS_ENDPOINT_URL
    value: {{ . | quote }}
  {{- end }}
  - name: AWS_DEFAULT_REGION
    value: {{ .Values.storage.region | quote }}
  - name: SPLEEN_DEEPEDIT_RUN_NAME
    value: {{ include "spleen-deepedit-train.runName" . | quote }}
{{- end }}

{{/* Pod-level settings shared by head and workers. */}}
{{- define "spleen-deepedit-train.podSpecCommon" -}}
serviceAccountName: {{ include "spleen-deepedit-train.serviceAccountName" . }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The entrypoint the KubeRay submitter runs on the head: our trainer's Ray Train launcher. */}}
{{- define "spleen-deepedit-train.entrypoint" -}}
{{- $args := list "spleen-deepedit" "train" "--ray" }}
{{- $args = concat $args (list "--data" .Values.dataset.uri) }}
{{- $args = concat $args (list "--output" (printf "%s/%s" (trimSuffix "/" .Values.training.outputDir) (include "spleen-deepedit-train.runName" .))) }}
{{- $args = concat $args (list "--storage" .Values.storage.uri) }}
{{- $args = concat $args (list "--run-name" (include "spleen-deepedit-train.runName" .)) }}
{{- $args = concat $args (list "--num-workers" (include "spleen-deepedit-train.numWorkers" .)) }}
{{- if gt (int .Values.workers.gpusPerWorker) 0 }}
{{- $args = append $args "--use-gpu" }}
{{- end }}
{{- $args = concat $args (list "--profile" .Values.training.profile) }}
{{- if .Values.training.epochs }}
{{- $args = concat $args (list "--epochs" (toString (int .Values.training.epochs))) }}
{{- end }}
{{- if .Values.training.config }}
{{- $args = concat $args (list "--config" "/etc/spleen-deepedit/train.yaml") }}
{{- end }}
{{- /* No shell quoting needed: the schema restricts every value to URI/path characters. */}}
{{- join " " $args }}
{{- end }}
