{{/* Names, labels and the values every template derives from the same place. */}}

{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.device) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* How many engine workers of a role pdserve runs: pods x engines per pod. */}}
{{- define "pdserve.engines" -}}
{{- $w := index .root.Values.workers .role -}}
{{- mul $w.replicas $w.enginesPerPod -}}
{{- end -}}

{{- define "pdserve.checkRoles" -}}
{{- $prefill := include "pdserve.engines" (dict "root" . "role" "prefill") | int -}}
{{- $decode := include "pdserve.engines" (dict "root" . "role" "decode") | int -}}
{{- $both := include "pdserve.engines" (dict "root" . "role" "both") | int -}}
{{- if ne (eq $prefill 0) (eq $decode 0) -}}
{{- fail "workers.prefill and workers.decode come together: give both replicas > 0, or set both to 0 and use workers.both" -}}
{{- end -}}
{{- if eq (add $prefill $decode $both) 0 -}}
{{- fail "no engine workers: set workers.prefill and workers.decode replicas, or workers.both replicas, above 0" -}}
{{- end -}}
{{- end -}}

{{/* Ray's head: the chart's own Service, or the one KubeRay makes for a RayCluster. */}}
{{- define "pdserve.rayHeadService" -}}
{{- if .Values.kuberay.enabled -}}
{{- printf "%s-head-svc" (include "pdserve.fullname" .) -}}
{{- else -}}
{{- printf "%s-ray-head" (include "pdserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-keys" (include "pdserve.fullname" .)) -}}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redisUrl -}}
{{- .Values.redisUrl -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "pdserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* pdserve's settings file: the chart's keys, then the user's extraConfig. */}}
{{- define "pdserve.config" -}}
{{- include "pdserve.checkRoles" . -}}
{{- $c := dict
  "address" "auto"
  "host" "0.0.0.0"
  "port" (int .Values.gateway.port)
  "router_host" "0.0.0.0"
  "router_port" (int .Values.gateway.routerPort)
  "model" .Values.pdserve.model
  "policy" .Values.pdserve.policy
  "device" .Values.device
  "prefill" (include "pdserve.engines" (dict "root" . "role" "prefill") | int)
  "decode" (include "pdserve.engines" (dict "root" . "role" "decode") | int)
  "both" (include "pdserve.engines" (dict "root" . "role" "both") | int)
-}}
{{- with include "pdserve.redisUrl" . }}{{ $_ := set $c "redis_url" . }}{{ end -}}
{{- toYaml (merge (deepCopy .Values.pdserve.extraConfig) $c) -}}
{{- end -}}

{{/* The head container's command: Ray's head (no CPUs, so engines go to worker pods), then pdserve. */}}
{{- define "pdserve.headCommand" -}}
- /bin/bash
- -c
- ulimit -n 65536; RAY_worker_niceness=0 ray start --head --port=6379 --num-cpus=0 --dashboard-host=0.0.0.0 --disable-usage-stats && exec pdserve up
{{- end -}}

{{/* A worker pod's command: a Ray node with one CPU slot per engine (Ray's CPUs are slots that
pdserve's workers ask for, not cores), a GPU per engine with device cuda, and its role's resource. */}}
{{- define "pdserve.workerCommand" -}}
{{- $w := index .root.Values.workers .role -}}
{{- $gpus := ternary $w.enginesPerPod 0 (eq .root.Values.device "cuda") -}}
- /bin/bash
- -c
- >-
  ulimit -n 65536; RAY_worker_niceness=0 exec ray start --address="$RAY_HEAD_ADDRESS" --block --disable-usage-stats
  --num-cpus={{ $w.enginesPerPod }} --num-gpus={{ $gpus }} --resources='{"pdserve_{{ .role }}": {{ $w.enginesPerPod }}}'
{{- end -}}

{{/* The head container's environment: pdserve's settings file and its keys. */}}
{{- define "pdserve.headEnv" -}}
- name: PDSERVE_CONFIG
  value: /etc/pdserve/config.yaml
{{- if .Values.auth.enabled }}
- name: PDSERVE_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "pdserve.secretName" . }}, key: api-key}
{{- end }}
{{- if and .Values.auth.enabled .Values.auth.adminKey.enabled }}
- name: PDSERVE_ADMIN_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "pdserve.secretName" . }}, key: admin-key}
{{- end }}
{{- end -}}


{{/* The head pod's spec, for a Deployment or a RayCluster's head group. */}}
{{- define "pdserve.headPodSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
containers:
  - name: ray-head
    image: {{ include "pdserve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: {{- include "pdserve.headCommand" . | nindent 6 }}
    env: {{- include "pdserve.headEnv" . | nindent 6 }}
    ports:
      - {name: gcs-server, containerPort: 6379}
      - {name: dashboard, containerPort: 8265}
      - {name: client, containerPort: 10001}
      - {name: http, containerPort: {{ .Values.gateway.port }}}
      - {name: grpc, containerPort: {{ .Values.gateway.routerPort }}}
    startupProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 10
      failureThreshold: {{ div .Values.head.startupSeconds 10 }}
    readinessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 5
    livenessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 10
      failureThreshold: 6
    resources: {{- toYaml .Values.head.resources | nindent 6 }}
    volumeMounts:
      - {name: config, mountPath: /etc/pdserve, readOnly: true}
      - {name: dshm, mountPath: /dev/shm}
volumes:
  - name: config
    configMap: {name: {{ include "pdserve.fullname" . }}-config}
  - name: dshm  # Ray's object store
    emptyDir: {medium: Memory}
{{- with .Values.head.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.head.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.head.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A worker pod's spec for one role. */}}
{{- define "pdserve.workerPodSpec" -}}
{{- $w := index .root.Values.workers .role -}}
{{- $resources := deepCopy $w.resources -}}
{{- if eq .root.Values.device "cuda" -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" $w.enginesPerPod -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: ray-worker
    image: {{ include "pdserve.image" .root }}
    imagePullPolicy: {{ .root.Values.image.pullPolicy }}
    command: {{- include "pdserve.workerCommand" . | nindent 6 }}
    env:
      - name: RAY_HEAD_ADDRESS
        value: {{ include "pdserve.rayHeadService" .root }}:6379
    resources: {{- toYaml $resources | nindent 6 }}
    volumeMounts:
      - {name: dshm, mountPath: /dev/shm}
volumes:
  - name: dshm  # Ray's object store
    emptyDir: {medium: Memory}
{{- with $w.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
