{{/* Chart name, trimmed to the 63 characters of a Kubernetes name. */}}
{{- define "spleen-deepedit-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, plus the chart name unless the release name already contains it.
Trimmed to 63 characters (the DNS label limit).
*/}}
{{- define "spleen-deepedit-serve.fullname" -}}
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
Name of the RayService: KubeRay appends 6 characters for its RayCluster (at most 53), so at most 47, and a
DNS-1035 label (starts with a letter). Fails with a message instead of a RayService the operator rejects.
*/}}
{{- define "spleen-deepedit-serve.rayName" -}}
{{- $name := include "spleen-deepedit-serve.fullname" . | trunc 47 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "RayService name %q must start with a letter (DNS-1035): choose another release name or set fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "spleen-deepedit-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels of every object. */}}
{{- define "spleen-deepedit-serve.labels" -}}
helm.sh/chart: {{ include "spleen-deepedit-serve.chart" . }}
{{ include "spleen-deepedit-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: serving
{{- end }}

{{/* Labels that select this release's pods (PodMonitors). */}}
{{- define "spleen-deepedit-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spleen-deepedit-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount of the Ray pods: the created one, else the named one, else none (empty). Never
`default`: with none named and autoscaling on, KubeRay creates a per-cluster account for the head and
binds its autoscaler Role to it (raycluster_controller.go reconcileAutoscalerServiceAccount).
*/}}
{{- define "spleen-deepedit-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spleen-deepedit-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container image; the repository has no usable default (the image is built from our Dockerfile). */}}
{{- define "spleen-deepedit-serve.image" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository is required: the image built from this repository's Dockerfile and pushed to your registry (e.g. --set image.repository=registry.example.com/ml/spleen-deepedit)" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secret holding the API token: the user's, else the one this chart creates. */}}
{{- define "spleen-deepedit-serve.authSecretName" -}}
{{- default (printf "%s-api-token" (include "spleen-deepedit-serve.fullname" . | trunc 53 | trimSuffix "-")) .Values.auth.existingSecret }}
{{- end }}

{{/* Labels of every Ray pod: selector labels (PodMonitors select on them) and user labels. */}}
{{- define "spleen-deepedit-serve.podLabels" -}}
{{ include "spleen-deepedit-serve.selectorLabels" . }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Name of the Serve Service (KubeRay's default name is `<rayservice>-serve-svc`; we set the same). */}}
{{- define "spleen-deepedit-serve.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "spleen-deepedit-serve.rayName" .) }}
{{- end }}

{{/* Environment variable that holds the API token in the replicas. */}}
{{- define "spleen-deepedit-serve.authTokenEnv" -}}
DEEPEDIT_AUTH_TOKEN
{{- end }}

{{/*
Environment of a Ray container (`.root`, `.group`): S3 endpoint and region, the API token (from its
Secret), the scratch locations (nothing is written to the read-only root filesystem), then the user's
env (all pods, then the group's). Credentials only through envFrom / secretKeyRef.
*/}}
{{- define "spleen-deepedit-serve.env" -}}
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
  {{- if $.Values.auth.enabled }}
  - name: {{ include "spleen-deepedit-serve.authTokenEnv" $ }}
    valueFrom:
      secretKeyRef:
        name: {{ include "spleen-deepedit-serve.authSecretName" $ }}
        key: {{ $.Values.auth.secretKey }}
  {{- end }}
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
Scratch volumes of a Ray pod (`.root`, `.group`): emptyDirs with a size limit, so the root filesystem
stays read-only and a runaway log or cache evicts only its own pod. `ray-logs` is KubeRay's own name
for /tmp/ray (pod.go RayLogVolumeName): the autoscaler sidecar shares it.
*/}}
{{- define "spleen-deepedit-serve.volumes" -}}
{{- $ := .root -}}
{{- $s := $.Values.scratch -}}
- name: tmp
  emptyDir: {sizeLimit: {{ $s.tmp }}}
- name: ray-logs
  emptyDir: {sizeLimit: {{ $s.rayTmp }}}
- name: model-cache
  emptyDir: {sizeLimit: {{ $s.modelCache }}}
{{- with $.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- with .group.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Mounts of the scratch volumes (and the user's) in a Ray container (`.root`, `.group`). */}}
{{- define "spleen-deepedit-serve.volumeMounts" -}}
{{- $ := .root -}}
- {name: tmp, mountPath: /tmp}
- {name: ray-logs, mountPath: /tmp/ray}
- {name: model-cache, mountPath: /var/cache/spleen-deepedit}
{{- with $.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- with .group.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level settings of every pod the operator builds from our objects (`.root`, `.group`,
`.automount`). Only the head with autoscaling mounts the service-account token: Ray's KubeRay
autoscaler sidecar reads it unconditionally to call the API server.
*/}}
{{- define "spleen-deepedit-serve.podSpec" -}}
{{- $ := .root -}}
{{- with include "spleen-deepedit-serve.serviceAccountName" $ }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ .automount }}
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

{{/* Pod template metadata (`.root`, `.component`). */}}
{{- define "spleen-deepedit-serve.podMetadata" -}}
{{- $ := .root -}}
labels:
  {{- include "spleen-deepedit-serve.podLabels" $ | nindent 2 }}
  spleen-deepedit/pod-role: {{ .component }}
{{- with $.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Ray's authentication (`authOptions`): token mode, the token from a Secret (KubeRay makes one per cluster when none is named). */}}
{{- define "spleen-deepedit-serve.authOptions" -}}
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

{{/*
The Serve config (KubeRay serveConfigV2, Ray's ServeDeploySchema): our application built by the typed
builder `trainer.serve.app:build_app` from `args` (trainer/serve/settings.py ServeArgs). The checkpoint
is also in the deployment's user_config: changing only that reloads the model in the live replicas
(`reconfigure`), which is what `spleen-deepedit k8s promote` patches.
*/}}
{{- define "spleen-deepedit-serve.serveConfig" -}}
{{- $s := .Values.serve }}
{{- if lt (int $s.maxOngoingRequests) (int $s.maxBatchSize) }}
{{- fail (printf "serve.maxOngoingRequests %d is below serve.maxBatchSize %d: a batch could never fill; raise maxOngoingRequests to at least maxBatchSize" (int $s.maxOngoingRequests) (int $s.maxBatchSize)) }}
{{- end }}
{{- $args := dict
  "checkpoint" $s.checkpoint
  "model_name" $s.modelName
  "num_replicas" (max 1 (int (ternary .Values.autoscaling.minReplicas $s.replicas .Values.autoscaling.enabled)))
  "num_cpus" $s.cpusPerReplica
  "num_gpus" $s.gpusPerReplica
  "max_batch_size" (int $s.maxBatchSize)
  "batch_wait_timeout_s" $s.batchWaitTimeoutS
  "max_ongoing_requests" (int $s.maxOngoingRequests)
  "max_queued_requests" (int $s.maxQueuedRequests)
  "request_timeout_s" $s.requestTimeoutS
  "max_upload_bytes" (int64 $s.maxUploadBytes)
  "session_ttl_s" $s.sessionTtlS
  "session_max_bytes" (int64 $s.sessionMaxBytes)
  "cors_origins" $s.corsOrigins
}}
{{- with $s.profile }}{{ $_ := set $args "profile" . }}{{ end }}
{{- with $s.device }}{{ $_ := set $args "device" . }}{{ end }}
{{- if not (kindIs "invalid" $s.clickRadius) }}{{ $_ := set $args "click_radius" $s.clickRadius }}{{ end }}
{{- if not (kindIs "invalid" $s.refine) }}{{ $_ := set $args "refine" $s.refine }}{{ end }}
{{- if .Values.auth.enabled }}
{{- $_ := set $args "auth_token_env" (include "spleen-deepedit-serve.authTokenEnv" .) }}
{{- end }}
{{- $deployment := dict "name" "DeepEdit" "user_config" (dict "checkpoint" $s.checkpoint "profile" $s.profile) }}
{{- if .Values.autoscaling.enabled }}
{{- $_ := set $deployment "num_replicas" "auto" }}
{{- $_ := set $deployment "autoscaling_config" (dict
  "min_replicas" (int .Values.autoscaling.minReplicas)
  "max_replicas" (int .Values.autoscaling.maxReplicas)
  "target_ongoing_requests" .Values.autoscaling.targetOngoingRequests
  "downscale_delay_s" .Values.autoscaling.downscaleDelayS) }}
{{- end }}
{{- $app := dict
  "name" $s.appName
  "route_prefix" $s.routePrefix
  "import_path" "trainer.serve.app:build_app"
  "args" $args
  "deployments" (list $deployment)
}}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" 8000)
  "applications" (list $app)
}}
{{- toYaml $config }}
{{- end }}
