#!/usr/bin/env bash
# Builds the programs of the local test cluster from their Go modules (e2e/cluster/go.mod pins them):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kubectl from
# k8s.io/kubernetes; csi-provisioner, csi-resizer, csi-snapshotter and snapshot-controller from the
# kubernetes-csi modules; CoreDNS with the cluster-DNS plugins (e2e/cluster/cmd/coredns) and the host-path
# CSI driver (e2e/cluster/cmd/csi-hostpath); kube-router, for its network policy controller. One `go build` for all of them, so shared packages compile once.
# Output: $BIN_DIR (target/e2e/bin). Warm (Go build cache filled) it takes seconds.
set -euo pipefail
cd "$(dirname "$0")/cluster"
BIN_DIR=${BIN_DIR:-$(cd ../.. && pwd)/target/e2e/bin}
mkdir -p "$BIN_DIR"

K8S_VERSION=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ver() { echo "-X $1.gitVersion=$K8S_VERSION -X $1.gitMajor=1 -X $1.gitMinor=$minor -X $1.gitTreeState=clean"; }
# -s -w: no symbol tables or DWARF, which roughly halves link time of these large programs.
LDFLAGS="-s -w $(ver k8s.io/component-base/version) $(ver k8s.io/client-go/pkg/version)"

programs=(
  k8s.io/kubernetes/cmd/kube-apiserver
  k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kube-scheduler
  k8s.io/kubernetes/cmd/kubelet
  k8s.io/kubernetes/cmd/kube-proxy
  k8s.io/kubernetes/cmd/kubectl
  github.com/kubernetes-csi/external-provisioner/v5/cmd/csi-provisioner
  github.com/kubernetes-csi/external-resizer/cmd/csi-resizer
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
  github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
  ./cmd/coredns
  ./cmd/csi-hostpath
)
start=$(date +%s)
go build -ldflags "$LDFLAGS" -o "$BIN_DIR/" "${programs[@]}"
echo "build-cluster: ${#programs[@]} programs in $BIN_DIR ($(($(date +%s) - start)) s, Kubernetes $K8S_VERSION)" >&2

# The VolumeSnapshot CRDs of the snapshot controller's client module, for cluster-up.sh.
crd_dir=$(go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)/config/crd
mkdir -p "$BIN_DIR/../snapshot-crds"
install -m 0644 "$crd_dir"/*.storage.k8s.io_*.yaml "$BIN_DIR/../snapshot-crds/"
