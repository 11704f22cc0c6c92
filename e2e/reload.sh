#!/usr/bin/env bash
# For a change to the operator or agent while the local cluster runs: rebuilds the binary, the mail and
# operator images, imports them into the cluster's containerd and restarts the operator. MailPods created
# afterwards run the new agent; existing mail pods keep theirs until they restart.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
: "${KUBECONFIG:?export KUBECONFIG (e2e/cluster-up.sh prints it)}"
KUBECTL=${KUBECTL:-$(command -v kubectl || echo "$ROOT/target/e2e/bin/kubectl")}
bash e2e/build-operator-images.sh --only mail,operator
bash e2e/load-images.sh
"$KUBECTL" -n "${RELEASE_NAMESPACE:-mailpod-system}" rollout restart deployment/mailpod-operator
"$KUBECTL" -n "${RELEASE_NAMESPACE:-mailpod-system}" rollout status deployment/mailpod-operator --timeout=180s
