#!/usr/bin/env bash
# Creates a kind cluster ready for the e2e tests (tests/e2e.rs), where Docker is available:
#   1. a kind cluster (kindnet enforces NetworkPolicies since kind v0.24),
#   2. the operator and mail images built from mail-image/Dockerfile and loaded into the nodes,
#   3. the external-snapshotter CRDs and controller, and the csi-hostpath driver with its StorageClass
#      `csi-hostpath-sc` and VolumeSnapshotClass `csi-hostpath-snapclass` (what the e2e tests use by default),
#   4. the chart, from charts/mailpod-operator, with those images.
# Then prints the KUBECONFIG to export. Re-running reuses what exists.
#
# Settings (env): CLUSTER_NAME (mailpod-e2e), KUBECONFIG_OUT (target/e2e/kubeconfig), SKIP_BUILD=1 (images
# already loaded), SNAPSHOTTER_VERSION (v8.2.0), HOSTPATH_VERSION (v1.15.0).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER_NAME=${CLUSTER_NAME:-mailpod-e2e}
KUBECONFIG_OUT=${KUBECONFIG_OUT:-$PWD/target/e2e/kubeconfig}
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.2.0}
HOSTPATH_VERSION=${HOSTPATH_VERSION:-v1.15.0}
OPERATOR_IMAGE=mailpod-operator:e2e
MAIL_IMAGE=mailpod:e2e

say() { echo "kind-up: $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { say "$1 is required ($2)"; exit 1; }; }
need docker "the image build and kind's nodes"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need git "to fetch the csi-hostpath deployment"
docker info >/dev/null 2>&1 || { say "docker is installed but its engine does not answer"; exit 1; }
HELM=${HELM:-$(bash scripts/install-helm.sh)}

mkdir -p "$(dirname "$KUBECONFIG_OUT")"
if ! kind get clusters | grep -qx "$CLUSTER_NAME"; then
  say "creating kind cluster $CLUSTER_NAME"
  kind create cluster --name "$CLUSTER_NAME" --wait 120s
fi
kind get kubeconfig --name "$CLUSTER_NAME" >"$KUBECONFIG_OUT"
export KUBECONFIG=$KUBECONFIG_OUT

if [ "${SKIP_BUILD:-}" != 1 ]; then
  say "building images (operator and mail targets of mail-image/Dockerfile)"
  docker build -f mail-image/Dockerfile --target operator -t "$OPERATOR_IMAGE" .
  docker build -f mail-image/Dockerfile --target mail -t "$MAIL_IMAGE" .
fi
kind load docker-image --name "$CLUSTER_NAME" "$OPERATOR_IMAGE" "$MAIL_IMAGE"

say "external-snapshotter $SNAPSHOTTER_VERSION: CRDs and controller"
snap="https://github.com/kubernetes-csi/external-snapshotter"
kubectl apply --server-side -k "$snap/client/config/crd?ref=$SNAPSHOTTER_VERSION"
kubectl apply --server-side -k "$snap/deploy/kubernetes/snapshot-controller?ref=$SNAPSHOTTER_VERSION"
kubectl -n kube-system rollout status deployment/snapshot-controller --timeout=180s

say "csi-hostpath driver $HOSTPATH_VERSION"
src=target/e2e/csi-driver-host-path
if [ ! -d "$src" ]; then
  git clone --depth 1 --branch "$HOSTPATH_VERSION" https://github.com/kubernetes-csi/csi-driver-host-path "$src"
fi
"$src/deploy/kubernetes-latest/deploy.sh"
kubectl apply -f "$src/examples/csi-storageclass.yaml"
kubectl apply -f "$src/deploy/kubernetes-latest/hostpath/csi-hostpath-snapshotclass.yaml"

say "installing the chart"
"$HELM" upgrade --install mailpod-operator charts/mailpod-operator \
  --namespace mailpod-system --create-namespace \
  --set image.repository=mailpod-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --set mailImage.repository=mailpod --set mailImage.tag=e2e \
  --set site=e2e --set logFormat=text \
  --wait --timeout 5m
kubectl -n mailpod-system get pods -l app.kubernetes.io/name=mailpod-operator

say "ready. Run the tests with:"
echo "export KUBECONFIG=$KUBECONFIG_OUT"
echo "MAILPOD_E2E_REQUIRED=1 cargo test --test e2e -- --nocapture"
