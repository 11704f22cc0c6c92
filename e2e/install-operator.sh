#!/usr/bin/env bash
# Installs the chart (charts/mailpod-operator) with Helm into the cluster KUBECONFIG names, with the images
# e2e/build-images.sh made (`mailpod-operator:e2e`, `mailpod:e2e`, never pulled), and waits until the
# operator runs under the chart's ServiceAccount and RBAC.
#
# Settings (env): KUBECONFIG (required), RELEASE_NAMESPACE (mailpod-system), SITE (e2e), REPLICAS (1),
# HELM (installed by scripts/install-helm.sh when unset), HELM_ARGS (extra arguments for helm).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${KUBECONFIG:?export KUBECONFIG (e2e/cluster-up.sh prints it)}"
NS=${RELEASE_NAMESPACE:-mailpod-system}
HELM=${HELM:-$(bash "$ROOT/scripts/install-helm.sh")}
KUBECTL=${KUBECTL:-$(command -v kubectl || echo "$ROOT/target/e2e/bin/kubectl")}

# The chart's CRDs are applied server-side first: Helm installs crds/ only on the first install and never
# upgrades them, and a CRD the API server refuses must fail here, loudly.
"$KUBECTL" apply --server-side --force-conflicts -f "$ROOT/charts/mailpod-operator/crds/"
# docs/security.md: the operator meets the restricted Pod Security Standard; the API server enforces it.
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" label --overwrite namespace "$NS" pod-security.kubernetes.io/enforce=restricted >/dev/null
# shellcheck disable=SC2086
"$HELM" upgrade --install mailpod-operator "$ROOT/charts/mailpod-operator" \
  --namespace "$NS" --create-namespace --skip-crds \
  --set image.repository=mailpod-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --set mailImage.repository=mailpod --set mailImage.tag=e2e \
  --set site="${SITE:-e2e}" --set logFormat=text --set replicaCount="${REPLICAS:-1}" \
  ${HELM_ARGS:-} --wait --timeout 5m
"$KUBECTL" -n "$NS" get pods -l app.kubernetes.io/name=mailpod-operator -o wide
