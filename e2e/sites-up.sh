#!/usr/bin/env bash
# Adds two control planes beside the local cluster of e2e/cluster-up.sh, for site failover against real API
# servers:
#
#   site `west`: kube-apiserver on NODE_IP:7443 (etcd prefix /registry-west) and kube-controller-manager,
#                no node: the standby site's control plane. The chart is installed there with Helm (its
#                ServiceAccount and RBAC; no operator replica can run without a node), and the operator runs
#                on the host as that ServiceAccount, with --site west, under its own user id WEST_UID.
#   witness:     kube-apiserver on NODE_IP:8443 (etcd prefix /registry-witness) and kube-controller-manager:
#                the third cluster, which holds the witness Lease.
#
# The local cluster is the primary site (its operator runs in it with --site e2e). Each API server signs its
# own ServiceAccount tokens; all three share the local cluster's CA and etcd. e2e/partition.sh cuts the
# primary site off from the other two; e2e/component.sh stops and starts single components;
# e2e/cluster-down.sh removes all of it. Prints the kubeconfigs to export.
#
# Settings (env): STATE (/var/lib/mailpod-e2e), BIN_DIR (target/e2e/bin), OPERATOR (target/e2e/mailpod-operator),
# NODE_IP (10.244.0.1), WEST_UID (64010), HELM.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-/var/lib/mailpod-e2e}
BIN_DIR=${BIN_DIR:-$ROOT/target/e2e/bin}
OPERATOR=${OPERATOR:-$ROOT/target/e2e/mailpod-operator}
NODE_IP=${NODE_IP:-10.244.0.1}
WEST_UID=${WEST_UID:-64010}
WEST_PORT=7443
WITNESS_PORT=8443
SITES=$STATE/sites
NAME=sites-up
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
start=$(date +%s)
[ "$(id -u)" = 0 ] || die "must run as root (iptables, a user id for the standby's operator)"
[ -f "$PKI/ca.crt" ] && alive etcd && alive kube-apiserver || die "the local cluster is not up: run e2e/cluster-up.sh"
[ -x "$OPERATOR" ] || die "$OPERATOR is missing: run e2e/build-operator-images.sh"
KUBECTL=$BIN_DIR/kubectl
HELM=${HELM:-$(bash "$ROOT/scripts/install-helm.sh")}
mkdir -p "$SITES" "$STATE/audit-west"

# One control plane: NAME PORT PREFIX SERVICE_CIDR.
apiserver() {
  local name=$1 port=$2 prefix=$3 cidr=$4
  service_account_key "sa-$name"
  kubeconfig "$SITES/$name-admin.kubeconfig" "https://$NODE_IP:$port" admin admin
  local audit=()
  if [ "$name" = west ]; then
    audit=(--audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/audit-west/audit.log"
      --audit-log-maxsize 200 --audit-log-maxbackup 3)
  fi
  launch "kube-apiserver-$name" "$BIN_DIR/kube-apiserver" \
    --etcd-servers http://127.0.0.1:2379 --etcd-prefix "$prefix" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$port" \
    --service-cluster-ip-range "$cidr" \
    --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --service-account-issuer "https://$name.mailpod-e2e.invalid" \
    --service-account-key-file "$PKI/sa-$name.pub" --service-account-signing-key-file "$PKI/sa-$name.key" \
    --authorization-mode RBAC "${audit[@]}" --profiling=false --v 1
}
apiserver west "$WEST_PORT" /registry-west 10.97.0.0/16
apiserver witness "$WITNESS_PORT" /registry-witness 10.98.0.0/16
WEST=$SITES/west-admin.kubeconfig
WITNESS=$SITES/witness-admin.kubeconfig
wait_for "the west API server" kube-apiserver-west 120 "$KUBECTL" --kubeconfig "$WEST" get --raw /readyz
wait_for "the witness API server" kube-apiserver-witness 120 "$KUBECTL" --kubeconfig "$WITNESS" get --raw /readyz

# Each control plane's controllers (StatefulSets, garbage collection, namespaces, ServiceAccount tokens); with
# no node the west site's pods stay Pending, as on a standby site without capacity.
controllers() {
  local name=$1 port=$2 secure_port=$3 cidr=$4
  kubeconfig "$SITES/$name-controller-manager.kubeconfig" "https://$NODE_IP:$port" controller-manager controller-manager
  launch "kube-controller-manager-$name" "$BIN_DIR/kube-controller-manager" \
    --kubeconfig "$SITES/$name-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$SITES/$name-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$SITES/$name-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$secure_port" --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa-$name.key" --root-ca-file "$PKI/ca.crt" \
    --service-cluster-ip-range "$cidr" --controllers '*,-csrsigning,-nodeipam' --v 1
}
controllers west "$WEST_PORT" 10357 10.97.0.0/16
controllers witness "$WITNESS_PORT" 10358 10.98.0.0/16

# The standby site as a user installs it: the CRDs (and the snapshot CRDs its StorageLUNs use), then the chart.
"$KUBECTL" --kubeconfig "$WEST" apply --server-side --force-conflicts -f "$ROOT/charts/mailpod-operator/crds/" >/dev/null
"$KUBECTL" --kubeconfig "$WEST" apply --server-side -f "$BIN_DIR/../snapshot-crds/" >/dev/null
"$HELM" --kubeconfig "$WEST" upgrade --install mailpod-operator "$ROOT/charts/mailpod-operator" \
  --namespace mailpod-system --create-namespace --skip-crds \
  --set image.repository=mailpod-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --set mailImage.repository=mailpod --set mailImage.tag=e2e \
  --set site=west --set logFormat=text --set replicaCount=0 >/dev/null

# The west operator: the chart's ServiceAccount, through a token, as an unprivileged host user.
token=$("$KUBECTL" --kubeconfig "$WEST" -n mailpod-system create token mailpod-operator --duration 48h)
cat >"$SITES/west-operator.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: west
  cluster:
    server: https://$NODE_IP:$WEST_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: mailpod-operator
  user: {token: $token}
contexts:
- name: west
  context: {cluster: west, user: mailpod-operator, namespace: mailpod-system}
current-context: west
EOF
install -m 0755 "$OPERATOR" "$SITES/mailpod-operator"
chown "$WEST_UID:$WEST_UID" "$SITES/west-operator.kubeconfig"
chmod 0400 "$SITES/west-operator.kubeconfig"
launch west-operator env -i PATH=/usr/bin:/bin HOME=/nonexistent \
  KUBECONFIG="$SITES/west-operator.kubeconfig" POD_NAMESPACE=mailpod-system POD_NAME=west-operator-host \
  setpriv --reuid "$WEST_UID" --regid "$WEST_UID" --clear-groups --no-new-privs \
  "$SITES/mailpod-operator" run --site west --metrics-addr 127.0.0.1:18080 \
  --lease-name mailpod-operator --leader-election-namespace mailpod-system \
  --mail-image mailpod:e2e --cluster-domain cluster.local --log-format text
wait_for "the west operator" west-operator 60 curl -fsS http://127.0.0.1:18080/readyz

# No cut left from an earlier run (e2e/partition.sh keeps its rules in an nftables table of its own).
bash "$ROOT/e2e/partition.sh" heal 2>/dev/null || true

cat >"$SITES/env" <<EOF
MAILPOD_E2E_WEST_KUBECONFIG=$WEST
MAILPOD_E2E_WITNESS_KUBECONFIG=$WITNESS
MAILPOD_E2E_WEST_SERVER=https://$NODE_IP:$WEST_PORT
MAILPOD_E2E_WITNESS_SERVER=https://$NODE_IP:$WITNESS_PORT
MAILPOD_E2E_PRIMARY_SERVER=https://$NODE_IP:6443
MAILPOD_E2E_CA_FILE=$PKI/ca.crt
MAILPOD_E2E_WEST_AUDIT_LOG=$STATE/audit-west/audit.log
EOF
say "up in $(($(date +%s) - start)) s"
sed 's/^/export /' "$SITES/env"
