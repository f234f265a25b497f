{{/* vim: set filetype=mustache: */}}

{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name. Truncated to 57 characters so that suffixed names
("-redis", "-smoke") stay within the 63-character DNS label limit.
*/}}
{{- define "gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 57 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels shared by every object of the release. */}}
{{- define "gateway.commonLabels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gateway.labels" -}}
{{ include "gateway.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* Selector of the gateway pods (never matches the in-chart Redis). */}}
{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "gateway.redis.fullname" -}}
{{- printf "%s-redis" (include "gateway.fullname" .) -}}
{{- end -}}

{{- define "gateway.redis.labels" -}}
{{ include "gateway.commonLabels" . }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "gateway.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Name of the Secret holding the JWT secret (existing or chart-created). */}}
{{- define "gateway.jwtSecretName" -}}
{{- if .Values.jwt.existingSecret -}}
{{- .Values.jwt.existingSecret -}}
{{- else -}}
{{- printf "%s-jwt" (include "gateway.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the nodes have a Redis (in-chart, URL or URL Secret). */}}
{{- define "gateway.hasRedis" -}}
{{- if or .Values.redis.enabled .Values.redis.url .Values.redis.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* updateStrategy.minReadySeconds, or preStop sleep + drain grace. */}}
{{- define "gateway.minReadySeconds" -}}
{{- if not (kindIs "invalid" .Values.updateStrategy.minReadySeconds) -}}
{{- int .Values.updateStrategy.minReadySeconds -}}
{{- else -}}
{{- $preStop := 0 -}}
{{- if .Values.preStop.enabled -}}{{- $preStop = int .Values.preStop.seconds -}}{{- end -}}
{{- add (int .Values.gateway.drainGraceSeconds) $preStop -}}
{{- end -}}
{{- end -}}

{{/* Drain grace + preStop sleep + margin. */}}
{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- $preStop := 0 -}}
{{- if .Values.preStop.enabled -}}{{- $preStop = int .Values.preStop.seconds -}}{{- end -}}
{{- add (int .Values.gateway.drainGraceSeconds) $preStop (int .Values.terminationGraceMarginSeconds) -}}
{{- end -}}

{{/*
Checks of value combinations that the schema cannot express. Included by
every template that renders, so a bad combination fails the whole render.
*/}}
{{- define "gateway.validate" -}}
{{- $multi := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}
{{- if and $multi (not (include "gateway.hasRedis" .)) -}}
{{- fail "\n\nMore than one gateway node (replicaCount > 1 or autoscaling.enabled) needs a shared Redis: without one every node keeps its own sessions and channels (in-memory broker), so clients could not see each other or resume on another node.\nSet one of:\n  --set redis.url=redis://HOST:6379          (your Redis)\n  --set redis.existingSecret=NAME            (Secret holding the URL under redis.existingSecretKey)\n  --set redis.enabled=true                   (in-chart single Redis, for trying it out)\nor keep replicaCount=1 with autoscaling.enabled=false.\n" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.cluster -}}
{{- fail "\n\nredis.cluster=true needs a Redis Cluster; the in-chart Redis (redis.enabled=true) is a single node. Point redis.url at a Redis Cluster instead.\n" -}}
{{- end -}}
{{- if and .Values.redis.url .Values.redis.existingSecret (not .Values.redis.enabled) -}}
{{- fail "\n\nSet either redis.url or redis.existingSecret, not both.\n" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.sessions.enabled) (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- fail "\n\nautoscaling.enabled=true needs at least one metric: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or sessions.enabled.\n" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "\n\nautoscaling.minReplicas must not exceed autoscaling.maxReplicas.\n" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) -}}
{{- fail "\n\npodDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null).\n" -}}
{{- end -}}
{{- if and .Values.preStop.enabled (eq .Values.preStop.mode "sleep") (semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "\n\npreStop.mode=sleep uses the Kubernetes `sleep` lifecycle action, which needs Kubernetes 1.30+ (alpha and off by default in 1.29, beta and on in 1.30, GA in 1.34); this cluster is %s. Use preStop.mode=exec with an image that has `sleep`, or preStop.enabled=false.\n" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if and .Values.jwt.previousSecretKey (not .Values.jwt.existingSecret) -}}
{{- fail "\n\njwt.previousSecretKey needs jwt.existingSecret: put the new and the previous secret in a Secret you manage, under jwt.secretKey and jwt.previousSecretKey.\n" -}}
{{- end -}}
{{- if and .Values.jwt.previousSecretKey (eq .Values.jwt.previousSecretKey .Values.jwt.secretKey) -}}
{{- fail "\n\njwt.previousSecretKey must differ from jwt.secretKey.\n" -}}
{{- end -}}
{{- if and .Values.api.keysSecret .Values.ingress.enabled -}}
{{- range .Values.ingress.hosts -}}
{{- range .paths -}}
{{- $p := .path | trimSuffix "/" -}}
{{- $exposes := false -}}
{{- if eq .pathType "Exact" -}}
{{- $exposes = hasPrefix "/api/" (printf "%s/" .path) -}}
{{- else if eq .pathType "Prefix" -}}
{{- /* Prefix matches whole path elements: /a does not reach /api. */ -}}
{{- $exposes = or (eq $p "") (eq $p "/api") (eq $p "/api/v1") (hasPrefix "/api/" $p) -}}
{{- else -}}
{{- /* ImplementationSpecific is up to the controller: ingress-nginx takes
  it as a string prefix (/a reaches /api/v1/…) or, with use-regex on the
  ingress, every path of it as an unanchored, case-insensitive regular
  expression (/API/v1/, /ap. and /(.*) too). Refuse either reading that
  reaches one of the API's routes. */ -}}
{{- $path := .path -}}
{{- $exposes = hasPrefix "/api/" $path -}}
{{- range $route := list "/api/v1/openapi.json" "/api/v1/cluster" "/api/v1/channels/c/presence" "/api/v1/channels/c/messages/1" "/api/v1/bans/u" "/api/v1/users/u/disconnect" -}}
{{- if or (hasPrefix $path $route) (regexMatch (printf "(?i)%s" $path) $route) -}}
{{- $exposes = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $exposes -}}
{{- fail (printf "\n\nThe ingress path %s (%s) would expose the server API (/api/v1/) publicly while api.keysSecret is set. Route only /gateway (and / Exact) on the public ingress and call the API through the Service from inside the cluster (docs/DEPLOY.md).\n" .path .pathType) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.jwt.existingSecret) .Values.jwt.secret (lt (len .Values.jwt.secret) 32) -}}
{{- fail "\n\njwt.secret must be at least 32 bytes.\n" -}}
{{- end -}}
{{- end -}}
