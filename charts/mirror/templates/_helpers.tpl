{{/* Names, labels and the pieces of the pod spec shared by several templates. */}}

{{- define "mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mirror.fullname" -}}
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

{{- define "mirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mirror.labels" -}}
helm.sh/chart: {{ include "mirror.chart" . }}
{{ include "mirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mirror.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The headless Service: bootstrap source and scrape target. */}}
{{- define "mirror.serviceName" -}}
{{- include "mirror.fullname" . }}
{{- end }}

{{- define "mirror.image" -}}
{{- $repository := required "image.repository is required: build the image with the repository's Dockerfile and push it to a registry the nodes can pull from" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the cluster key. */}}
{{- define "mirror.clusterKeySecret" -}}
{{- default (printf "%s-cluster-key" (include "mirror.fullname" .)) .Values.cluster.existingSecret }}
{{- end }}

{{/* Where the cluster key file is mounted in the mirror container. */}}
{{- define "mirror.clusterKeyFile" -}}
/etc/mirror/cluster/{{ .Values.cluster.secretKey }}
{{- end }}

{{/* --bootstrap entries, whitespace-separated (MIRROR_BOOTSTRAP). */}}
{{- define "mirror.bootstrap" -}}
{{- $entries := list }}
{{- $mode := .Values.cluster.bootstrap.mode }}
{{- if eq $mode "kubernetes" }}
{{- $entries = append $entries (printf "kubernetes:%s/%s:%d" .Release.Namespace (include "mirror.serviceName" .) (int .Values.ports.router)) }}
{{- else if eq $mode "dns" }}
{{- $entries = append $entries (printf "dns:%s.%s.svc.%s:%d" (include "mirror.serviceName" .) .Release.Namespace .Values.cluster.bootstrap.clusterDomain (int .Values.ports.router)) }}
{{- else if ne $mode "none" }}
{{- fail (printf "cluster.bootstrap.mode must be kubernetes, dns or none, not %q" $mode) }}
{{- end }}
{{- range .Values.cluster.bootstrap.extra }}
{{- $entries = append $entries . }}
{{- end }}
{{- join " " $entries }}
{{- end }}

{{/* The URL containerd is given for the mirror; may hold $(HOST_IP), which Kubernetes expands
in env values and args (CONTAINERD_MIRROR_URL in the containers). */}}
{{- define "mirror.mirrorUrl" -}}
{{- if .Values.configure.mirrorUrl }}
{{- .Values.configure.mirrorUrl }}
{{- else if .Values.network.hostNetwork }}
{{- printf "http://127.0.0.1:%d" (int .Values.ports.registry) }}
{{- else }}
{{- printf "http://$(HOST_IP):%d" (int .Values.ports.registry) }}
{{- end }}
{{- end }}

{{/* Env of every container that runs `mirror configure|cleanup`: the node IP and the mirror URL. */}}
{{- define "mirror.runtimeEnv" -}}
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: CONTAINERD_MIRROR_URL
  value: {{ include "mirror.mirrorUrl" . | quote }}
{{- end }}

{{/* Arguments of `mirror configure containerd` after the subcommand, without --mirror.
--resolve-tags is always given: the mirror container's MIRROR_RESOLVE_TAGS (a `mirror run` flag
with another meaning) would otherwise become its default in the postStart hook. */}}
{{- define "mirror.configureArgs" -}}
- {{ printf "--config-path=%s" .Values.containerd.certsDir | quote }}
- {{ printf "--resolve-tags=%t" .Values.configure.resolveTags | quote }}
{{- range .Values.mirror.mirroredRegistries }}
- {{ printf "--mirrored-registries=%s" . | quote }}
{{- end }}
{{- range .Values.mirror.upstreams }}
- {{ printf "--upstream=%s" . | quote }}
{{- end }}
{{- range .Values.configure.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Arguments of `mirror cleanup containerd` after the subcommand: it restores the originals
that configure recorded under --config-path, so it needs nothing else. */}}
{{- define "mirror.cleanupArgs" -}}
- {{ printf "--config-path=%s" .Values.containerd.certsDir | quote }}
{{- range .Values.cleanup.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The postStart hook: `mirror configure containerd ARGS --mirror=$CONTAINERD_MIRROR_URL`.
Hooks get no $(VAR) expansion from Kubernetes, so a shell adds the URL; the other arguments are
passed as positional parameters and never parsed by the shell. */}}
{{- define "mirror.configureHook" -}}
- /bin/sh
- -c
- 'exec mirror "$@" --mirror="$CONTAINERD_MIRROR_URL"'
- mirror-configure
- configure
- containerd
{{ include "mirror.configureArgs" . }}
{{- end }}
