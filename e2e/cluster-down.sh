#!/usr/bin/env bash
# Removes everything e2e/cluster-up.sh made: the pods' containers and their shims, the components (by
# the PIDs cluster-up.sh recorded), kube-proxy's, kube-router's and the CNI plugins' iptables rules, kube-router's ipsets, the forwarding chain,
# the pods' network namespaces, every mount under the state directory, the kubepods cgroups, the bridge,
# and the state directory itself. ip_forward goes back to what it was. The built programs and images
# (target/e2e) are kept. Safe to run twice.
#
# Settings (env): the same STATE, BIN_DIR and BRIDGE as cluster-up.sh; KEEP_STATE=1 keeps $STATE (logs,
# audit log) for inspection.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-/var/lib/mailpod-e2e}
BIN_DIR=${BIN_DIR:-$ROOT/target/e2e/bin}
BRIDGE=${BRIDGE:-mailpod0}
SOCK=/run/mailpod-e2e/containerd.sock
NAME=cluster-down
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root"
stop() { stop_component "$1"; }

# The sites of e2e/sites-up.sh, if any: their operator first, then their control planes.
for c in west-operator kube-controller-manager-west kube-controller-manager-witness kube-apiserver-west \
  kube-apiserver-witness; do stop "$c"; done
# The kubelet first, so nothing restarts what is removed next.
stop kubelet
for c in snapshot-controller csi-snapshotter csi-resizer csi-provisioner coredns kube-router kube-proxy \
  kube-scheduler kube-controller-manager; do stop "$c"; done

# Pod containers: kill the tasks through containerd, then the shims (found by this containerd's socket
# on their command line: they outlive containerd and belong to no recorded session).
if [ -S "$SOCK" ]; then
  for t in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1
  done
  sleep 1
  for t in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$SOCK" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1
  done
fi
for p in /proc/[0-9]*; do
  cmdline=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
  case $cmdline in *"-address $SOCK"*) kill -KILL "${p#/proc/}" 2>/dev/null ;; esac
done
stop containerd
stop csi-hostpath
stop kube-apiserver
# Anything else recorded (a component started by hand with e2e/component.sh), then etcd last.
for f in "$STATE"/pids/*; do [ -e "$f" ] && [ "${f##*/}" != etcd ] && stop "${f##*/}"; done
stop etcd

# iptables: kube-proxy's chains, the portmap plugin's, and the forwarding chain.
if [ -x "$BIN_DIR/kube-proxy" ]; then "$BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1; fi
for table in nat filter mangle; do
  for ch in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 ~ /^CNI-/ || $2 ~ /^MAILPOD-E2E-/) {print $2}'); do
    iptables -t "$table" -S 2>/dev/null | awk -v c="$ch" '$1 == "-A" && $0 ~ ("-j " c "( |$)") {sub(/^-A/, "-D"); print}' |
      while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null; done
    iptables -t "$table" -F "$ch" 2>/dev/null
  done
  for ch in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 ~ /^CNI-/ || $2 ~ /^MAILPOD-E2E-/) {print $2}'); do
    iptables -t "$table" -X "$ch" 2>/dev/null
  done
done

# e2e/partition.sh's nftables table.
if command -v nft >/dev/null 2>&1 && nft list table inet mailpod_e2e_cut >/dev/null 2>&1; then
  nft delete table inet mailpod_e2e_cut
fi

# kube-router's ipsets, now that no rule refers to them.
if command -v ipset >/dev/null 2>&1; then
  for set in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-'); do ipset destroy "$set" 2>/dev/null; done
fi

# Network namespaces the CNI plugin made for pods (those that did not exist before cluster-up.sh).
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cni-'); do
  if ! grep -qx "$ns" "$STATE/netns.before" 2>/dev/null; then ip netns delete "$ns" 2>/dev/null; fi
done

# Mounts under the state and run directories, deepest first.
for dir in "$STATE" "$RUN"; do
  findmnt -rn -o TARGET 2>/dev/null | awk -v d="$dir" 'index($0, d) == 1' | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done

# The kubelet's cgroups (cgroupfs driver), leaves first.
for hier in /sys/fs/cgroup/*/; do
  [ -d "$hier/kubepods" ] && find "$hier/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
done

# Veths the bridge plugin made whose namespace is already gone.
for v in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^veth'); do
  ip link show "$v" 2>/dev/null | grep -q "master $BRIDGE" && ip link delete "$v" 2>/dev/null
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
if [ -f "$STATE/ip_forward.before" ]; then cat "$STATE/ip_forward.before" >/proc/sys/net/ipv4/ip_forward; fi

if [ "${KEEP_STATE:-}" != 1 ]; then rm -rf "$STATE" "$RUN"; fi
say "done"
