{{/* Names, labels, images and the shared bits of every pod. */}}

{{- define "framecast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "framecast.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "framecast.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "framecast.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "framecast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "framecast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "framecast.labels" -}}
{{ include "framecast.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: framecast
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels of every Ray pod (head and workers): the NetworkPolicies select on these, and on
framecast.io/ray-cluster (serve: the RayService's pods, which run Serve's proxies; train: the
RayJob's), which each template adds. */}}
{{- define "framecast.rayPodLabels" -}}
{{ include "framecast.selectorLabels" . }}
app.kubernetes.io/part-of: framecast
framecast.io/ray: "true"
{{- end -}}

{{- define "framecast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "framecast.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "framecast.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "framecast.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" (default .Chart.AppVersion .Values.image.tag)) .Values.image.gpuTag) -}}
{{- end -}}

{{- define "framecast.artifactsClaim" -}}
{{- default (printf "%s-artifacts" (include "framecast.fullname" .)) .Values.artifacts.persistence.existingClaim -}}
{{- end -}}

{{- define "framecast.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "framecast.fullname" .) -}}
{{- end -}}

{{/* Ray token authentication (KubeRay authOptions): the token comes from a Secret. */}}
{{- define "framecast.rayAuth" -}}
authOptions:
  mode: {{ .Values.ray.auth.mode }}
  {{- with .Values.ray.auth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
{{- end -}}

{{- define "framecast.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "framecast.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Ray head ports: all stay inside the cluster (ClusterIP service, NetworkPolicy). */}}
{{- define "framecast.rayHeadPorts" -}}
ports:
  - {name: gcs-server, containerPort: 6379}
  - {name: dashboard, containerPort: 8265}
  - {name: client, containerPort: 10001}
  - {name: serve, containerPort: 8000}
  - {name: metrics, containerPort: 8080}
{{- end -}}

{{/*
Writable paths under the read-only root filesystem (containerSecurityContext): emptyDir
volumes, deleted with the pod. /tmp: Python tempfiles, FRAMECAST_HOME=/tmp/framecast, the
caches below. /tmp/ray: Ray's temp root (session dirs, logs, sockets, spilled objects,
runtime_env resources). The volume must be called ray-logs: KubeRay mounts the volume of that
name at /tmp/ray in the autoscaler sidecar, so the head and its autoscaler share the session
dir. /dev/shm (the object store) is a tmpfs KubeRay adds, or the GPU groups' dshm.
*/}}
{{- define "framecast.tmpVolume" -}}
- name: tmp
  emptyDir: {sizeLimit: {{ .Values.scratch.tmpSizeLimit }}}
{{- end -}}

{{- define "framecast.rayScratchVolumes" -}}
{{ include "framecast.tmpVolume" . }}
- name: ray-logs
  emptyDir: {sizeLimit: {{ .Values.scratch.rayTmpSizeLimit }}}
{{- end -}}

{{- define "framecast.rayScratchMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: ray-logs, mountPath: /tmp/ray}
{{- end -}}

{{/* Caches that would default to $HOME (read-only) go under /tmp instead. */}}
{{- define "framecast.scratchEnv" -}}
- {name: XDG_CACHE_HOME, value: /tmp/.cache}
- {name: KERAS_HOME, value: /tmp/.keras}
- {name: CUDA_CACHE_PATH, value: /tmp/.nv/ComputeCache}
{{- end -}}

{{/* Every Ray container: the scratch caches, and no usage-stats report (egress is denied). */}}
{{- define "framecast.rayEnv" -}}
env:
  {{- include "framecast.scratchEnv" . | nindent 2 }}
  - {name: RAY_USAGE_STATS_ENABLED, value: "0"}
{{- end -}}

{{- define "framecast.artifactVolume" -}}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "framecast.artifactsClaim" . }}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express. */}}
{{- define "framecast.validate" -}}
{{- if lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas) -}}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" -}}
{{- end -}}
{{- if lt (int .Values.serve.maxReplicas) (int .Values.serve.minReplicas) -}}
{{- fail "serve.maxReplicas must be >= serve.minReplicas" -}}
{{- end -}}
{{- if and .Values.streamClassifier.enabled (not .Values.serve.enabled) -}}
{{- fail "streamClassifier.enabled needs serve.enabled (the classifiers call the release's Serve app)" -}}
{{- end -}}
{{- if and .Values.serve.enabled (gt (float64 .Values.serve.numGpus) 0.0) (not .Values.serve.gpuWorkers.enabled) -}}
{{- fail "serve.numGpus > 0 needs serve.gpuWorkers.enabled=true" -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy egress rule: DNS (networkPolicy.dns). */}}
{{- define "framecast.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.dns -}}
- ports:
    {{- range $dns.ports }}
    - {protocol: UDP, port: {{ . }}}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- if $dns.namespace }}
  to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $dns.namespace }}
      {{- with $dns.podLabels }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
  {{- end }}
{{- end -}}

{{/* NetworkPolicy peer: the Ray pods of one Ray cluster of the release (serve or train). */}}
{{- define "framecast.rayClusterPeer" -}}
podSelector:
  matchLabels:
    app.kubernetes.io/instance: {{ .root.Release.Name }}
    framecast.io/ray: "true"
    framecast.io/ray-cluster: {{ .cluster }}
{{- end -}}
