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

{{/*
ServiceAccount of the Ray pods: the created one, else the named one, else none (empty). Never
`default`: without a name the pods get the namespace's default account without us binding anything
to it (KubeRay binds its autoscaler Role to the head's account, or creates one per cluster).
*/}}
{{- define "spleen-deepedit-train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spleen-deepedit-train.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container image; the repository has no usable default (the image is built from our Dockerfile). */}}
{{- define "spleen-deepedit-train.image" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository is required: the image built from this repository's Dockerfile and pushed to your registry (e.g. --set image.repository=registry.example.com/ml/spleen-deepedit)" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Ray Train run name: stable across RayJob retries so that a retry resumes. */}}
{{- define "spleen-deepedit-train.runName" -}}
{{- default .Release.Name .Values.training.runName }}
{{- end }}

{{/* DDP ranks: explicit, else one per GPU of the worker group, else one per worker pod. */}}
{{- define "spleen-deepedit-train.numWorkers" -}}
{{- $slots := mul (int .Values.workers.replicas) (max 1 (int .Values.workers.gpusPerWorker)) }}
{{- if gt (int .Values.training.numWorkers) (int $slots) }}
{{- fail (printf "training.numWorkers %d is more than the worker group holds (workers.replicas %d x %d GPU(s) = %d ranks): Ray Train would wait forever for the missing workers; lower numWorkers or raise workers.replicas / workers.gpusPerWorker" (int .Values.training.numWorkers) (int .Values.workers.replicas) (int .Values.workers.gpusPerWorker) (int $slots)) }}
{{- end }}
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

{{/*
Environment of a Ray container (`.root`, `.group`): S3 endpoint and region, the run name, the scratch
locations (so nothing is written to the read-only root filesystem), then the user's env (all pods,
then the group's). Credentials only through envFrom (the Secret), never as literal values.
*/}}
{{- define "spleen-deepedit-train.env" -}}
{{- $ := .root -}}
{{- $from := list -}}
{{- with $.Values.storage.credentialsSecret }}{{ $from = append $from (dict "secretRef" (dict "name" .)) }}{{ end -}}
{{- $from = concat $from (default list $.Values.envFrom) (default list .group.envFrom) -}}
{{- with $from }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
env:
  {{- with $.Values.storage.endpoint }}
  - name: AWS_ENDPOINT_URL
    value: {{ . | quote }}
  {{- end }}
  - name: AWS_DEFAULT_REGION
    value: {{ $.Values.storage.region | quote }}
  - name: SPLEEN_DEEPEDIT_RUN_NAME
    value: {{ include "spleen-deepedit-train.runName" $ | quote }}
  - name: SPLEEN_DEEPEDIT_CACHE
    value: /var/cache/spleen-deepedit
  - name: XDG_CACHE_HOME
    value: /tmp/.cache
  {{- with $.Values.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .group.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
Scratch volumes of a Ray pod (`.root`, `.head`): emptyDirs with a size limit, so the root filesystem
stays read-only and a runaway log or cache evicts only its own pod. `ray-logs` is KubeRay's own name
for /tmp/ray (pod.go RayLogVolumeName): the autoscaler sidecar, when there is one, shares it.
*/}}
{{- define "spleen-deepedit-train.volumes" -}}
{{- $ := .root -}}
{{- $s := $.Values.scratch -}}
- name: ray-logs
  emptyDir: {sizeLimit: {{ $s.rayTmp }}}
- name: tmp
  emptyDir: {sizeLimit: {{ $s.tmp }}}
- name: dataset-cache
  emptyDir: {sizeLimit: {{ $s.datasetCache }}}
{{- if .head }}
- name: outputs
  emptyDir: {sizeLimit: {{ $s.outputs }}}
{{- if $.Values.training.config }}
- name: train-config
  configMap:
    name: {{ include "spleen-deepedit-train.configMapName" $ }}
{{- end }}
{{- end }}
{{- with $.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- with .group.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Mounts of the scratch volumes (and the user's) in a Ray container (`.root`, `.head`, `.group`). */}}
{{- define "spleen-deepedit-train.volumeMounts" -}}
{{- $ := .root -}}
- {name: tmp, mountPath: /tmp}
- {name: ray-logs, mountPath: /tmp/ray}
- {name: dataset-cache, mountPath: /var/cache/spleen-deepedit}
{{- if .head }}
- {name: outputs, mountPath: {{ $.Values.training.outputDir }}}
{{- if $.Values.training.config }}
- {name: train-config, mountPath: /etc/spleen-deepedit, readOnly: true}
{{- end }}
{{- end }}
{{- with $.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- with .group.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level settings of every pod the operator builds from our objects (`.root`, `.group`): head,
workers and the submitter. The service-account token is not mounted: nothing in these pods calls the
Kubernetes API (no autoscaler in a RayJob).
*/}}
{{- define "spleen-deepedit-train.podSpec" -}}
{{- $ := .root -}}
{{- with include "spleen-deepedit-train.serviceAccountName" $ }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
{{- with $.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml $.Values.podSecurityContext | nindent 2 }}
{{- with $.Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with (default $.Values.priorityClassName .group.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template metadata of every pod (`.root`, `.component`). */}}
{{- define "spleen-deepedit-train.podMetadata" -}}
{{- $ := .root -}}
labels:
  {{- include "spleen-deepedit-train.podLabels" $ | nindent 2 }}
  spleen-deepedit/pod-role: {{ .component }}
{{- with $.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Ray's authentication (`authOptions`): token mode, the token from a Secret (KubeRay makes one per cluster when none is named). */}}
{{- define "spleen-deepedit-train.authOptions" -}}
{{- if .Values.rayAuth.enabled }}
authOptions:
  mode: token
  {{- with .Values.rayAuth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- else }}
authOptions:
  mode: disabled
{{- end }}
{{- end }}

{{/* Forward actors of mode annotate: annotate.concurrency, else one per worker GPU, else one per worker pod. */}}
{{- define "spleen-deepedit-train.annotateConcurrency" -}}
{{- if gt (int .Values.annotate.concurrency) 0 }}
{{- .Values.annotate.concurrency | int }}
{{- else if gt (int .Values.workers.gpusPerWorker) 0 }}
{{- mul (int .Values.workers.replicas) (int .Values.workers.gpusPerWorker) }}
{{- else }}
{{- .Values.workers.replicas | int }}
{{- end }}
{{- end }}

{{/* The entrypoint of mode annotate: batch pre-annotation on Ray Data (the driver connects to this cluster). */}}
{{- define "spleen-deepedit-train.annotateEntrypoint" -}}
{{- $a := .Values.annotate }}
{{- $output := $a.output | default (printf "%s/annotations/%s" (trimSuffix "/" .Values.storage.uri) (include "spleen-deepedit-train.runName" .)) }}
{{- $args := list "spleen-deepedit" "annotate" "--input" $a.input "--output" $output "--checkpoint" $a.checkpoint }}
{{- $args = concat $args (list "--format" $a.format "--batch-size" (toString (int $a.batchSize))) }}
{{- $args = concat $args (list "--concurrency" (include "spleen-deepedit-train.annotateConcurrency" .)) }}
{{- if gt (int .Values.workers.gpusPerWorker) 0 }}
{{- $args = concat $args (list "--num-gpus" "1") }}
{{- end }}
{{- if $a.redo }}
{{- $args = append $args "--redo" }}
{{- end }}
{{- /* No shell quoting needed: the schema restricts every value to URI/path characters. */}}
{{- join " " $args }}
{{- end }}

{{/* The entrypoint the KubeRay submitter runs on the head: our trainer's Ray Train launcher (mode train) or annotate. */}}
{{- define "spleen-deepedit-train.entrypoint" -}}
{{- if eq (.Values.mode | default "train") "annotate" }}
{{- include "spleen-deepedit-train.annotateEntrypoint" . }}
{{- else }}
{{- include "spleen-deepedit-train.trainEntrypoint" . }}
{{- end }}
{{- end }}

{{- define "spleen-deepedit-train.trainEntrypoint" -}}
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
