{{/*
Object names: the release name when it contains "etcd-autodefrag" (`helm install etcd-autodefrag`
gives the names deploy/ uses), else "<release>-etcd-autodefrag".
*/}}
{{- define "etcd-autodefrag.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Labels of every object. app.kubernetes.io/name is fixed: the ServiceMonitor's jobLabel makes it the
scrape job the alert rules select (job="etcd-autodefrag"), whatever the release is called.
*/}}
{{- define "etcd-autodefrag.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The service's Pods. Never the defrag Jobs' labels (component "defrag"), which the Job watch selects.
The selector stays these two labels: a Deployment's selector cannot change after it is created.
*/}}
{{- define "etcd-autodefrag.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/component: service
{{- end -}}

{{- define "etcd-autodefrag.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "etcd-autodefrag.webhookSecret" -}}
{{- if and .Values.webhook.token .Values.webhook.existingSecret -}}
{{- fail "webhook: set token (the chart creates the Secret) or existingSecret, not both" -}}
{{- end -}}
{{- .Values.webhook.existingSecret | default (printf "%s-webhook" (include "etcd-autodefrag.fullname" .)) -}}
{{- end -}}

{{- define "etcd-autodefrag.validate" -}}
{{- $variants := list "plain" "talos" "kamaji" "kubeadm" -}}
{{- if not (has .Values.variant $variants) -}}
{{- fail (printf "variant %q: must be one of %s" .Values.variant (join ", " $variants)) -}}
{{- end -}}
{{- if and .Values.sharding.enabled (lt (int .Values.sharding.totalShards) 1) -}}
{{- fail (printf "sharding.totalShards %v: must be at least 1" .Values.sharding.totalShards) -}}
{{- end -}}
{{- end -}}

{{/* The clusters of config.yaml: the values', or the variant's own when none are listed. */}}
{{- define "etcd-autodefrag.clusters" -}}
{{- if .Values.clusters -}}
{{- toYaml .Values.clusters -}}
{{- else if eq .Values.variant "kamaji" -}}
# Kamaji's default datastore: the kamaji-etcd chart's StatefulSet in kamaji-system (docs/kamaji.md).
- name: kamaji-etcd
  discover_members: true
  tls:
    ca_file: /etc/etcd-autodefrag/tls/ca.crt
    cert_file: /etc/etcd-autodefrag/tls/tls.crt
    key_file: /etc/etcd-autodefrag/tls/tls.key
  kubernetes:
    namespace: kamaji-system
    variant: kamaji
    etcd_name: kamaji-etcd
    discover_endpoints: true
{{- else if eq .Values.variant "kubeadm" -}}
# This cluster's etcd: kubeadm's static pods in kube-system, one member per control-plane node.
- name: kubeadm
  discover_members: true
  tls:
    ca_file: /etc/etcd-autodefrag/tls/ca.crt
    cert_file: /etc/etcd-autodefrag/tls/tls.crt
    key_file: /etc/etcd-autodefrag/tls/tls.key
  kubernetes:
    namespace: kube-system
    variant: kubeadm
    discover_endpoints: true
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* config.yaml: `config`, the clusters, the webhook token's path and the discovery section. */}}
{{- define "etcd-autodefrag.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $webhook := get $config "webhook" | default dict -}}
{{- $_ := set $webhook "token_file" "/etc/etcd-autodefrag/webhook/token" -}}
{{- $_ = set $config "webhook" $webhook -}}
{{- $_ = set $config "clusters" (include "etcd-autodefrag.clusters" . | fromYamlArray) -}}
{{- with .Values.discovery.kamajiDataStores -}}
{{- if .enabled -}}
{{- $found := dict "enabled" true -}}
{{- if .labelSelector -}}{{- $_ = set $found "label_selector" .labelSelector -}}{{- end -}}
{{- $_ = set $config "discover" (dict "kamaji_datastores" $found) -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
The namespaces the configured clusters' Jobs run in, each with "kamaji" when a kamaji cluster's
etcd lives there (its Role then also reads the StatefulSet): a dict namespace -> list of variants.
*/}}
{{- define "etcd-autodefrag.jobNamespaces" -}}
{{- $namespaces := dict -}}
{{- range (include "etcd-autodefrag.clusters" . | fromYamlArray) -}}
{{- with .kubernetes -}}
{{- $variants := get $namespaces .namespace | default list -}}
{{- $_ := set $namespaces .namespace (append $variants (.variant | default "plain") | uniq) -}}
{{- end -}}
{{- end -}}
{{- toYaml $namespaces -}}
{{- end -}}

{{/* The Secret with the service's etcd client certificate; empty: none. */}}
{{- define "etcd-autodefrag.clientSecret" -}}
{{- if ne .Values.variant "kubeadm" -}}
{{- .Values.etcdClient.secretName | default (has .Values.variant (list "kamaji" "talos") | ternary "etcd-autodefrag-etcd-client" "") -}}
{{- end -}}
{{- end -}}

{{/* The etcd client certificate's keys in etcdClient.secretName. */}}
{{- define "etcd-autodefrag.clientKeys" -}}
{{- $default := dict "ca" "ca.crt" "cert" "tls.crt" "key" "tls.key" -}}
{{- if eq .Values.variant "talos" -}}
{{- $default = dict "ca" "ca" "cert" "crt" "key" "key" -}}
{{- end -}}
{{- toYaml (merge (deepCopy .Values.etcdClient.keys) $default) -}}
{{- end -}}
