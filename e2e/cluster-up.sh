#!/usr/bin/env bash
# Brings up a real single-node Kubernetes on this machine, from the programs e2e/build-cluster.sh builds
# and Debian's etcd, containerd, runc and CNI plugins, then prints the KUBECONFIG to export.
#
#   etcd (127.0.0.1:2379) -> kube-apiserver (NODE_IP:6443, Node,RBAC, audit log) -> controller-manager,
#   scheduler; containerd + runc (cgroupfs) -> kubelet (node IP on the bridge) with the CNI bridge plugin;
#   kube-proxy (iptables); kube-router's network policy controller, so NetworkPolicies are enforced
#   (iptables and ipsets; it neither routes nor proxies); CoreDNS on NODE_IP:53 as the cluster DNS; the host-path CSI driver with
#   csi-provisioner, csi-resizer, csi-snapshotter and snapshot-controller; StorageClass `csi-hostpath-sc`
#   and VolumeSnapshotClass `csi-hostpath-snapclass`.
#
# Everything listens on loopback or on the bridge, which has no route off the machine: FORWARD accepts
# only bridge-to-bridge traffic and nothing is masqueraded. The components run on the host as processes
# (PIDs in $STATE/pids); e2e/cluster-down.sh removes all of it.
#
# Settings (env): STATE (/var/lib/mailpod-e2e), BIN_DIR (target/e2e/bin), IMAGES (target/e2e/images: every
# *.tar there is imported into containerd), BRIDGE (mailpod0), POD_CIDR (10.244.0.0/24), NODE_IP
# (10.244.0.1), SERVICE_CIDR (10.96.0.0/16), NODE_NAME (mailpod-node).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-/var/lib/mailpod-e2e}
BIN_DIR=${BIN_DIR:-$ROOT/target/e2e/bin}
IMAGES=${IMAGES:-$ROOT/target/e2e/images}
BRIDGE=${BRIDGE:-mailpod0}
POD_CIDR=${POD_CIDR:-10.244.0.0/24}
NODE_IP=${NODE_IP:-10.244.0.1}
SERVICE_CIDR=${SERVICE_CIDR:-10.96.0.0/16}
API_SERVICE_IP=${API_SERVICE_IP:-10.96.0.1}
NODE_NAME=${NODE_NAME:-mailpod-node}
CLUSTER_DOMAIN=cluster.local
API_PORT=6443
API_URL=https://$NODE_IP:$API_PORT
RUN=/run/mailpod-e2e
KUBECONFIG_OUT=$STATE/admin.kubeconfig
start=$(date +%s)

NAME=cluster-up
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root (kubelet, containerd, mounts, iptables)"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kube-router kubectl coredns \
  csi-hostpath csi-provisioner csi-resizer csi-snapshotter snapshot-controller; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: run e2e/build-cluster.sh"
done
for b in etcd containerd runc ctr iptables ipset openssl; do
  command -v "$b" >/dev/null || die "$b is missing: apt-get install etcd-server containerd runc containernetworking-plugins iptables ipset conntrack openssl"
done
[ -x /usr/lib/cni/bridge ] || die "the CNI plugins are missing: apt-get install containernetworking-plugins"
KUBECTL=$BIN_DIR/kubectl
export KUBECONFIG=$KUBECONFIG_OUT

mkdir -p "$STATE"/{pids,logs,pki,kubelet,cni/net.d,cni/ipam,csi-data,etcd,containerd,audit} "$RUN"

# ---- network: the bridge, forwarding limited to it ----
if [ ! -f "$STATE/ip_forward.before" ]; then cat /proc/sys/net/ipv4/ip_forward >"$STATE/ip_forward.before"; fi
if [ ! -f "$STATE/netns.before" ]; then (ip netns list 2>/dev/null | awk '{print $1}') >"$STATE/netns.before"; fi
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
fi
ip addr replace "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
ip link set "$BRIDGE" up
# Pods on the bridge reach Services on the bridge: bridged packets go through iptables (kube-proxy's DNAT).
echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
chain=MAILPOD-E2E-FORWARD
iptables -N "$chain" 2>/dev/null || iptables -F "$chain"
iptables -A "$chain" -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
iptables -A "$chain" -i "$BRIDGE" -j DROP
iptables -A "$chain" -o "$BRIDGE" -j DROP
iptables -C FORWARD -j "$chain" 2>/dev/null || iptables -I FORWARD 1 -j "$chain"
# The CNI bridge plugin (isGateway) switches forwarding on; only the chain above lets anything through.
echo 1 >/proc/sys/net/ipv4/ip_forward

# ---- certificates ----
gen_ca
cert apiserver kube-apiserver "" \
  "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost"
cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
cert admin kubernetes-admin system:masters
cert controller-manager system:kube-controller-manager
cert scheduler system:kube-scheduler
cert kube-proxy system:kube-proxy
cert kubelet "system:node:$NODE_NAME" system:nodes
service_account_key sa
kubeconfig "$STATE/admin.kubeconfig" "$API_URL" admin admin
kubeconfig "$STATE/controller-manager.kubeconfig" "$API_URL" controller-manager controller-manager
kubeconfig "$STATE/scheduler.kubeconfig" "$API_URL" scheduler scheduler
kubeconfig "$STATE/kube-proxy.kubeconfig" "$API_URL" kube-proxy kube-proxy
kubeconfig "$STATE/kubelet.kubeconfig" "$API_URL" kubelet kubelet

# ---- etcd, API server, controllers ----
launch etcd etcd --name mailpod-e2e --data-dir "$STATE/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster mailpod-e2e=http://127.0.0.1:2380 --quota-backend-bytes 4294967296
wait_for etcd etcd 30 curl -fsS http://127.0.0.1:2379/health

# Everything the API server does is audited at Metadata level: the tests count the operator's writes.
cat >"$STATE/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
EOF
launch kube-apiserver "$BIN_DIR/kube-apiserver" \
  --etcd-servers http://127.0.0.1:2379 \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$API_PORT" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP \
  --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/audit/audit.log" \
  --audit-log-maxsize 200 --audit-log-maxbackup 3 \
  --profiling=false --v 1
wait_for kube-apiserver kube-apiserver 120 "$KUBECTL" get --raw /readyz

launch kube-controller-manager "$BIN_DIR/kube-controller-manager" \
  --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" --controllers '*,bootstrapsigner,tokencleaner' --v 1
launch kube-scheduler "$BIN_DIR/kube-scheduler" \
  --kubeconfig "$STATE/scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --v 1

# ---- containerd and the kubelet ----
cat >"$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$RUN/containerd"
[grpc]
  address = "$RUN/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  # Built locally by e2e/build-images.sh: nothing is pulled.
  sandbox_image = "registry.k8s.io/pause:3.10"
  # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
cat >"$STATE/cni/net.d/10-mailpod.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "mailpod-e2e",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
launch containerd containerd --config "$STATE/containerd/config.toml"
wait_for containerd containerd 30 ctr --address "$RUN/containerd.sock" version

shopt -s nullglob
for img in "$IMAGES"/*.tar; do
  ctr --address "$RUN/containerd.sock" -n k8s.io images import "$img" >/dev/null \
    || die "could not import $img"
done
shopt -u nullglob
# The list is read whole before it is searched: `ctr ... | grep -q` under pipefail fails when grep exits on the
# first match and ctr is killed by SIGPIPE writing the next line.
images=$(ctr --address "$RUN/containerd.sock" -n k8s.io images ls -q)
grep -qx 'registry.k8s.io/pause:3.10' <<<"$images" \
  || die "the pause image is not in containerd: run e2e/build-images.sh first"

cat >"$STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$RUN/containerd.sock
clusterDNS: [$NODE_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: /etc/resolv.conf
failSwapOn: false
# Images exist only locally: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
serializeImagePulls: false
maxPods: 110
EOF
launch kubelet "$BIN_DIR/kubelet" --config "$STATE/kubelet/config.yaml" \
  --kubeconfig "$STATE/kubelet.kubeconfig" --root-dir "$STATE/kubelet" \
  --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
launch kube-proxy "$BIN_DIR/kube-proxy" --kubeconfig "$STATE/kube-proxy.kubeconfig" \
  --hostname-override "$NODE_NAME" --proxy-mode iptables --cluster-cidr "$POD_CIDR" \
  --bind-address 127.0.0.1 --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 \
  --conntrack-max-per-core 0 --v 1
wait_for "node $NODE_NAME Ready" kubelet 120 \
  "$KUBECTL" wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s

# ---- NetworkPolicy enforcement ----
# kube-router's network policy controller alone: pods' traffic on the bridge (br_netfilter, physdev) and
# from the node passes its KUBE-ROUTER-FORWARD/-OUTPUT chains, which come ahead of MAILPOD-E2E-FORWARD.
# Traffic from the node itself (kubelet probes, the tests on the host) is admitted, as on real clusters.
launch kube-router "$BIN_DIR/kube-router" --kubeconfig "$KUBECONFIG_OUT" --hostname-override "$NODE_NAME" \
  --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
  --enable-pod-egress=false --health-port=0 --metrics-port=0 \
  --service-cluster-ip-range "$SERVICE_CIDR" --v 1
# Up when its jump is in FORWARD ahead of MAILPOD-E2E-FORWARD (which accepts bridge-to-bridge traffic).
wait_for "kube-router's firewall chains" kube-router 60 \
  sh -c "iptables -S FORWARD | awk '/-j KUBE-ROUTER-FORWARD/ {k = NR} /-j MAILPOD-E2E-FORWARD/ {m = NR} END {exit !(k && k < m)}'"

# ---- cluster DNS ----
cat >"$STATE/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:8180
    ready 127.0.0.1:8181
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $KUBECONFIG_OUT
        pods insecure
    }
    cache 5
    loadbalance
}
EOF
launch coredns "$BIN_DIR/coredns" -conf "$STATE/Corefile"
wait_for coredns coredns 30 curl -fsS http://127.0.0.1:8181/ready

# ---- storage: host-path CSI driver, sidecars, snapshot controller ----
CSI_SOCK=$STATE/kubelet/plugins/hostpath.csi.k8s.io/csi.sock
launch csi-hostpath "$BIN_DIR/csi-hostpath" --endpoint "$CSI_SOCK" \
  --registration-dir "$STATE/kubelet/plugins_registry" --nodeid "$NODE_NAME" --statedir "$STATE/csi-data"
wait_for "the CSI socket" csi-hostpath 30 test -S "$CSI_SOCK"
"$KUBECTL" apply --server-side -f "$BIN_DIR/../snapshot-crds/" >/dev/null
cat <<EOF | "$KUBECTL" apply --server-side -f - >/dev/null
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {name: hostpath.csi.k8s.io}
spec:
  attachRequired: false
  podInfoOnMount: true
  fsGroupPolicy: File
  volumeLifecycleModes: [Persistent]
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: csi-hostpath-sc
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: hostpath.csi.k8s.io
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: csi-hostpath-snapclass}
driver: hostpath.csi.k8s.io
deletionPolicy: Delete
EOF
launch csi-provisioner "$BIN_DIR/csi-provisioner" --kubeconfig "$KUBECONFIG_OUT" --csi-address "$CSI_SOCK" \
  --leader-election=false --extra-create-metadata --timeout 120s --v 1
launch csi-resizer "$BIN_DIR/csi-resizer" --kubeconfig "$KUBECONFIG_OUT" --csi-address "$CSI_SOCK" \
  --leader-election=false --timeout 120s --v 1
launch csi-snapshotter "$BIN_DIR/csi-snapshotter" --kubeconfig "$KUBECONFIG_OUT" --csi-address "$CSI_SOCK" \
  --leader-election=false --timeout 120s --v 1
launch snapshot-controller "$BIN_DIR/snapshot-controller" --kubeconfig "$KUBECONFIG_OUT" \
  --leader-election=false --v 1
wait_for "the kubelet's CSI registration" kubelet 60 \
  sh -c "'$KUBECTL' get csinode '$NODE_NAME' -o jsonpath='{.spec.drivers[*].name}' | grep -q hostpath.csi.k8s.io"

cp "$KUBECONFIG_OUT" "$ROOT/target/e2e/kubeconfig" 2>/dev/null || true
say "up in $(($(date +%s) - start)) s"
echo "export KUBECONFIG=$KUBECONFIG_OUT"
