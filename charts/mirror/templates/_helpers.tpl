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

{{/* The runtime the init container and the hooks configure (configure.runtime): containerd
(hosts.toml files) or containers (a registries.conf.d drop-in for CRI-O, Podman, Buildah,
skopeo). Anything else fails the render. */}}
{{- define "mirror.runtime" -}}
{{- $runtime := .Values.configure.runtime }}
{{- if not (has $runtime (list "containerd" "containers")) }}
{{- fail (printf "configure.runtime must be containerd or containers, not %q" $runtime) }}
{{- end }}
{{- $runtime }}
{{- end }}

{{/* The node directory that runtime reads its mirror configuration from: mounted read-write at
the same path into the init container and, with cleanup.onStop, the mirror container. */}}
{{- define "mirror.runtimeConfigDir" -}}
{{- if eq (include "mirror.runtime" .) "containers" }}
{{- .Values.containers.registriesDir }}
{{- else }}
{{- .Values.containerd.certsDir }}
{{- end }}
{{- end }}

{{/* The name of that volume. */}}
{{- define "mirror.runtimeConfigVolume" -}}
{{- if eq (include "mirror.runtime" .) "containers" }}containers-registries{{ else }}containerd-certs{{ end }}
{{- end }}

{{/* The mounts of the containers that run `mirror configure|cleanup`. containers: the drop-in
directory read-write, and its parent (/etc/containers) read-only under it, for registries.conf:
configure carries over what that file says about each registry it names (blocked, insecure,
other mirrors), and would otherwise not see it. */}}
{{- define "mirror.runtimeConfigMounts" -}}
{{- if eq (include "mirror.runtime" .) "containers" -}}
- name: containers-config
  mountPath: {{ dir .Values.containers.registriesDir }}
  readOnly: true
{{ end -}}
- name: {{ include "mirror.runtimeConfigVolume" . }}
  mountPath: {{ include "mirror.runtimeConfigDir" . }}
{{- end }}

{{/* The volumes of those mounts: host directories, made when missing. */}}
{{- define "mirror.runtimeConfigVolumes" -}}
{{- if eq (include "mirror.runtime" .) "containers" -}}
- name: containers-config
  hostPath:
    path: {{ dir .Values.containers.registriesDir }}
    type: DirectoryOrCreate
{{ end -}}
- name: {{ include "mirror.runtimeConfigVolume" . }}
  hostPath:
    path: {{ include "mirror.runtimeConfigDir" . }}
    type: DirectoryOrCreate
{{- end }}

{{/* The URL the runtime is given for the mirror; may hold $(HOST_IP), which Kubernetes expands
in env values and args (RUNTIME_MIRROR_URL in the containers). */}}
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
- name: RUNTIME_MIRROR_URL
  value: {{ include "mirror.mirrorUrl" . | quote }}
{{- end }}

{{/* Arguments of `mirror configure RUNTIME` after the subcommand, without --mirror: the
runtime's directory, then the same for both runtimes. --resolve-tags is always given: the mirror
container's MIRROR_RESOLVE_TAGS (a `mirror run` flag with another meaning) would otherwise become
its default in the postStart hook. */}}
{{- define "mirror.configureArgs" -}}
{{- if eq (include "mirror.runtime" .) "containers" -}}
- {{ printf "--registries-dir=%s" .Values.containers.registriesDir | quote }}
{{- else -}}
- {{ printf "--config-path=%s" .Values.containerd.certsDir | quote }}
{{- end }}
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

{{/* Arguments of `mirror cleanup RUNTIME` after the subcommand: it removes what configure wrote
(containerd: restores the originals it recorded under --config-path), so it needs only the
directory. */}}
{{- define "mirror.cleanupArgs" -}}
{{- if eq (include "mirror.runtime" .) "containers" -}}
- {{ printf "--registries-dir=%s" .Values.containers.registriesDir | quote }}
{{- else -}}
- {{ printf "--config-path=%s" .Values.containerd.certsDir | quote }}
{{- end }}
{{- range .Values.cleanup.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The postStart hook: `mirror configure RUNTIME ARGS --mirror=$RUNTIME_MIRROR_URL`. Hooks get
no $(VAR) expansion from Kubernetes, so a shell adds the URL; the other arguments are passed as
positional parameters and never parsed by the shell. */}}
{{- define "mirror.configureHook" -}}
- /bin/sh
- -c
- 'exec mirror "$@" --mirror="$RUNTIME_MIRROR_URL"'
- mirror-configure
- configure
- {{ include "mirror.runtime" . }}
{{ include "mirror.configureArgs" . }}
{{- end }}

{{/* Where the prefetch ConfigMap is mounted in the mirror container. The directory is mounted,
not the file (no subPath): a ConfigMap update then reaches the pod as kubelet's symlink swap,
which the mirror's poll of the file sees. */}}
{{- define "mirror.prefetchDir" -}}
/etc/mirror/prefetch
{{- end }}

{{/* The prefetch file in that directory (MIRROR_PREFETCH_FILE). */}}
{{- define "mirror.prefetchFile" -}}
{{ include "mirror.prefetchDir" . }}/prefetch.toml
{{- end }}

{{/* The ConfigMap holding the prefetch file. */}}
{{- define "mirror.prefetchConfigMap" -}}
{{- printf "%s-prefetch" (include "mirror.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ClusterRole (and its binding) of prefetch.fromWorkloads: cluster-scoped, so named after
the release namespace too. */}}
{{- define "mirror.prefetchClusterRole" -}}
{{- printf "%s-%s-prefetch" .Release.Namespace (include "mirror.fullname" .) }}
{{- end }}

{{/* prefetch.images as the prefetch file (docs/prefetch.md): one [[image]] table per entry.
Every string goes through toJson: Go's JSON strings (quotes, backslashes and control characters
escaped, everything else UTF-8, never a surrogate pair) are valid TOML basic strings. Label
values are made strings, so a YAML 1 or true matches the node label "1" or "true". An entry
that is not a map, lacks a ref or has another key fails the render rather than pinning
something else than meant. */}}
{{- define "mirror.prefetchToml" -}}
{{- range $index, $image := .Values.prefetch.images }}
{{- if not (kindIs "map" $image) }}
{{- fail (printf "prefetch.images[%d] must be a map with ref, source and nodes" $index) }}
{{- end }}
{{- range $key, $_ := $image }}
{{- if not (has $key (list "ref" "source" "nodes")) }}
{{- fail (printf "prefetch.images[%d]: unknown key %q (expected ref, source, nodes)" $index $key) }}
{{- end }}
{{- end }}
[[image]]
ref = {{ required (printf "prefetch.images[%d] needs a ref" $index) $image.ref | toString | toJson }}
{{- with $image.source }}
source = {{ toString . | toJson }}
{{- end }}
{{- with $image.nodes }}
{{- if not (kindIs "map" .) }}
{{- fail (printf "prefetch.images[%d].nodes must be a map of label: value" $index) }}
{{- end }}
{{- $pairs := list }}
{{- range $label, $value := . }}
{{- if kindIs "invalid" $value }}
{{- fail (printf "prefetch.images[%d].nodes.%s has no value (\"\" for an empty one)" $index $label) }}
{{- end }}
{{- $pairs = append $pairs (printf "%s = %s" (toJson $label) (toString $value | toJson)) }}
{{- end }}
nodes = { {{ join ", " $pairs }} }
{{- end }}
{{- end }}
{{- end }}

{{/* prefetch.nodeLabels as --node-label KEY=VALUE entries, space-separated (MIRROR_NODE_LABEL).
A key or value with '=' or whitespace cannot be one: the render fails instead of every pod. */}}
{{- define "mirror.nodeLabels" -}}
{{- $labels := list }}
{{- range $key, $value := .Values.prefetch.nodeLabels }}
{{- if or (regexMatch "[=\\s]" $key) (regexMatch "[=\\s]" (toString $value)) }}
{{- fail (printf "prefetch.nodeLabels: %s=%v is not a KEY=VALUE label (no '=' or whitespace in either)" $key $value) }}
{{- end }}
{{- $labels = append $labels (printf "%s=%s" $key (toString $value)) }}
{{- end }}
{{- join " " $labels }}
{{- end }}

{{/* The prefetch settings of the mirror container (docs/prefetch.md), each only when its value
is set: nothing at all with the defaults. */}}
{{- define "mirror.prefetchEnv" -}}
{{- if .Values.prefetch.images }}
- name: MIRROR_PREFETCH_FILE
  value: {{ include "mirror.prefetchFile" . | quote }}
{{- end }}
{{- if .Values.prefetch.fromWorkloads }}
- name: MIRROR_PREFETCH_FROM
  value: "kubernetes"
# The node the pod runs on: the mirror reads its labels from the API, for the workloads'
# nodeSelector.
- name: MIRROR_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- with .Values.prefetch.namespace }}
- name: MIRROR_KUBERNETES_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.prefetch.nodeLabels }}
- name: MIRROR_NODE_LABEL
  value: {{ include "mirror.nodeLabels" $ | quote }}
{{- end }}
{{- with .Values.prefetch.interval }}
- name: MIRROR_PREFETCH_INTERVAL
  value: {{ . | quote }}
{{- end }}
{{- end }}
