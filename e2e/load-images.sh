#!/usr/bin/env bash
# Imports the images e2e/build-images.sh made (every *.tar in IMAGES, default target/e2e/images) into the
# local cluster's containerd, for a cluster that is already up (cluster-up.sh imports them when it starts).
# Pods started afterwards use them; restart the operator with
#   kubectl -n mailpod-system rollout restart deployment/mailpod-operator
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGES=${IMAGES:-$ROOT/target/e2e/images}
SOCK=/run/mailpod-e2e/containerd.sock
[ -S "$SOCK" ] || { echo "load-images: no local cluster (run e2e/cluster-up.sh)" >&2; exit 1; }
for img in "$IMAGES"/*.tar; do
  ctr --address "$SOCK" -n k8s.io images import "$img" >/dev/null
  echo "load-images: $(basename "$img")" >&2
done
