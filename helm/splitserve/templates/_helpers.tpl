{{/*
Names, labels and the derived settings every template shares: the role list, each role's
custom Ray resource, the Redis address and the generated ClusterConfig.
*/}}

{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; also the RayCluster's name (KubeRay adds -head-svc for its Service). */}}
{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "splitserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "splitserve.labels" -}}
helm.sh/chart: {{ include "splitserve.chart" . }}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The roles in request order; a worker group per enabled role. */}}
{{- define "splitserve.roles" -}}
{{- list "encode" "prefill" "decode" | toJson }}
{{- end }}

{{/* GPUs per pod of a worker group: resources.limits["nvidia.com/gpu"], else 0. */}}
{{- define "splitserve.groupGpus" -}}
{{- $limits := (.resources | default dict).limits | default dict }}
{{- index $limits "nvidia.com/gpu" | default 0 | float64 }}
{{- end }}

{{/*
rayStartParams.resources of a role's pods, in KubeRay's quoting: the value is pasted into the
`ray start` shell command, so the JSON travels inside double quotes with its quotes escaped:
'"{\"prefill\":1}"'.
*/}}
{{- define "splitserve.rayResourcesParam" -}}
{{- dict . 1 | toJson | replace "\"" "\\\"" | printf "\"%s\"" }}
{{- end }}

{{- define "splitserve.redisHost" -}}
{{- if .Values.redis.enabled -}}
{{ include "splitserve.fullname" . }}-redis:6379
{{- else if .Values.redis.externalUrl -}}
{{ (urlParse .Values.redis.externalUrl).host }}
{{- end }}
{{- end }}

{{- define "splitserve.registryUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "splitserve.redisHost" . }}/0
{{- else if .Values.redis.externalUrl -}}
{{ .Values.redis.externalUrl }}
{{- else -}}
memory
{{- end }}
{{- end }}

{{/* Checks the schema cannot express (they compare two values); `fail` names the keys. */}}
{{- define "splitserve.validate" -}}
{{- if and .Values.redis.enabled .Values.redis.externalUrl }}
{{- fail "redis: set either redis.enabled (bundled Redis) or redis.externalUrl, not both" }}
{{- end }}
{{- if and .Values.gcsFaultTolerance.enabled (not (or .Values.redis.enabled .Values.redis.externalUrl)) }}
{{- fail "gcsFaultTolerance.enabled needs Redis: set redis.enabled or redis.externalUrl" }}
{{- end }}
{{- range $role := include "splitserve.roles" . | fromJsonArray }}
{{- $g := index $.Values.workerGroups $role }}
{{- if $g.enabled }}
{{- if gt (int $g.minReplicas) (int $g.replicas) }}
{{- fail (printf "workerGroups.%s.replicas (%d) must be >= minReplicas (%d)" $role (int $g.replicas) (int $g.minReplicas)) }}
{{- end }}
{{- if gt (int $g.replicas) (int $g.maxReplicas) }}
{{- fail (printf "workerGroups.%s.replicas (%d) must be <= maxReplicas (%d)" $role (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.workerGroups.decode.enabled }}
{{- fail "workerGroups.decode.enabled must be true: every request decodes on a decode worker" }}
{{- end }}
{{- end }}

{{/*
The ClusterConfig YAML: the user's `cluster` settings plus what the chart owns (roles from the
worker groups, ray.address, registry.url). splitserve validates it again at start.
*/}}
{{- define "splitserve.clusterConfig" -}}
{{- $cfg := omit (deepCopy .Values.cluster) "ray" "registry" }}
{{- $ray := deepCopy (.Values.cluster.ray | default dict) }}
{{- $_ := set $ray "address" "auto" }}
{{- $registry := deepCopy (.Values.cluster.registry | default dict) }}
{{- $_ := set $registry "url" (include "splitserve.registryUrl" .) }}
{{- $roles := dict }}
{{- range $role := include "splitserve.roles" . | fromJsonArray }}
{{- $g := index $.Values.workerGroups $role }}
{{- if $g.enabled }}
{{- $rc := deepCopy ($g.engine | default dict) }}
{{- $_ := set $rc "replicas" (int $g.replicas) }}
{{- $_ := set $rc "min_replicas" (int $g.minReplicas) }}
{{- $_ := set $rc "max_replicas" (int $g.maxReplicas) }}
{{- $_ := set $rc "num_gpus" (include "splitserve.groupGpus" $g | float64) }}
{{- $_ := set $rc "resources" (dict $role 1) }}
{{- $_ := set $roles $role $rc }}
{{- else }}
{{- $_ := set $roles $role (dict "replicas" 0) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "roles" $roles }}
{{- $_ := set $cfg "ray" $ray }}
{{- $_ := set $cfg "registry" $registry }}
{{- toYaml $cfg }}
{{- end }}

{{/* Volumes of every Ray pod: /dev/shm in memory plus the user's. */}}
{{- define "splitserve.podVolumes" -}}
- name: shared-mem
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- with .Values.volumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "splitserve.volumeMounts" -}}
- name: shared-mem
  mountPath: /dev/shm
{{- with .Values.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
