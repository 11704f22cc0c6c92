{{/* Chart name, cut to the 63 characters a label value may have. */}}
{{- define "mailpod-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "mailpod-operator.fullname" -}}
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

{{- define "mailpod-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. app.kubernetes.io/name is always `mailpod-operator`, whatever nameOverride says: the
NetworkPolicies the operator writes for each MailPod let only pods with this label reach the stores'
control port (8081).
*/}}
{{- define "mailpod-operator.selectorLabels" -}}
app.kubernetes.io/name: mailpod-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mailpod-operator.labels" -}}
helm.sh/chart: {{ include "mailpod-operator.chart" . }}
{{ include "mailpod-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mailpod
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mailpod-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailpod-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailpod-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "mailpod-operator.mailImage" -}}
{{- printf "%s:%s" .Values.mailImage.repository (default .Chart.AppVersion .Values.mailImage.tag | toString) }}
{{- end }}

{{/*
Rules on namespaced objects: everything the controllers read and write in the namespaces they watch.
docs/security.md gives the reason for each rule. No wildcards.
*/}}
{{- define "mailpod-operator.namespacedRules" -}}
# The three resources: watched, finalized, status written. A standby site creates the MailPods it mirrors
# from the active site (Server-Side Apply of an absent object needs create).
- apiGroups: ["mailpod.io"]
  resources: ["mailpods"]
  verbs: ["get", "list", "watch", "create", "patch", "update"]
- apiGroups: ["mailpod.io"]
  resources: ["sitefailovers"]
  verbs: ["get", "list", "watch", "patch", "update"]
# StorageLUNs are children of MailPods: applied, and deleted when orphaned.
- apiGroups: ["mailpod.io"]
  resources: ["storageluns"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["mailpod.io"]
  resources: ["mailpods/status", "storageluns/status", "sitefailovers/status"]
  verbs: ["get", "patch", "update"]
# Owner references with blockOwnerDeletion need update on the owner's finalizers subresource.
- apiGroups: ["mailpod.io"]
  resources: ["mailpods/finalizers", "storageluns/finalizers", "sitefailovers/finalizers"]
  verbs: ["update"]
# Children applied with Server-Side Apply and deleted when orphaned.
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["cronjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Restore jobs.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The snapshot jobs' Role and RoleBinding.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Store pods: the mailpod.io/role label (active/standby) is how the LUN's Service follows the active replica.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
# Store pods are replaced, one at a time and the active after a switchover, by eviction: a new pod
# template reaches them on the operator's schedule (the store StatefulSets are OnDelete). Never delete.
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
# Restores clone a VolumeSnapshot into a new PVC; a standby site with block replication creates the
# claims bound to the mirrored images. PVCs are mail: the operator never deletes one.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create"]
# Mailbox lists and passwd files, the peer site's kubeconfig (read); each LUN's replication password (created
# once) and the DKIM keys of spec.dkim (created, keys the Secret lacks added; never replaced); at a standby site, the copies of the active site's passwd files and replication passwords (patch: the
# mirror updates only copies it made, never a Secret someone else made). list and watch only to follow
# Secret mailbox lists labelled mailpod.io/mailbox-source=true (mailboxSources.watchSecrets).
- apiGroups: [""]
  resources: ["secrets"]
  {{- if .Values.mailboxSources.watchSecrets }}
  verbs: ["get", "list", "watch", "create", "patch"]
  {{- else }}
  verbs: ["get", "create", "patch"]
  {{- end }}
# Events on the resources. Core events: create only, because the snapshot jobs' Role grants it and RBAC lets
# the operator grant only what it holds.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Snapshots: taken by the snapshot jobs (whose Role the operator grants), listed for status, restored from.
- apiGroups: ["snapshot.storage.k8s.io"]
  resources: ["volumesnapshots"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Block replication between store replicas (spec.replication.method: Volume), through csi-addons.
- apiGroups: ["replication.storage.openshift.io"]
  resources: ["volumereplications"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# SiteFailover points DNS names at the active site through external-dns.
- apiGroups: ["externaldns.k8s.io"]
  resources: ["dnsendpoints"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}

{{/* Rules on cluster-scoped objects: the classes that snapshots and volume replication name, and the
PersistentVolumes a standby site creates for the images its storage mirrors. */}}
{{- define "mailpod-operator.clusterRules" -}}
- apiGroups: ["snapshot.storage.k8s.io"]
  resources: ["volumesnapshotclasses"]
  verbs: ["get", "list"]
- apiGroups: ["replication.storage.openshift.io"]
  resources: ["volumereplicationclasses"]
  verbs: ["get", "list"]
# SiteFailover with replication method Volume: the standby's PVs pointing at the mirrored images
# (Retain). Created only; the operator never changes or deletes a PersistentVolume.
- apiGroups: [""]
  resources: ["persistentvolumes"]
  verbs: ["get", "create"]
{{- end }}
