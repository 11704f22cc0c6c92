#!/usr/bin/env bash
# Cuts the primary site (the local cluster) off from the standby site and the witness of e2e/sites-up.sh, or
# heals the cut:
#
#   e2e/partition.sh isolate-primary LB_IP...   the primary's pods (its operator included) cannot reach the
#                                              west and witness API servers; the west operator (user WEST_UID)
#                                              cannot reach the primary's API server nor its front ends at
#                                              the load-balancer addresses LB_IP...
#   e2e/partition.sh heal                      everything reaches everything again
#
# The rules are in an nftables table of their own (inet mailpod_e2e_cut) whose chains sit ahead of the
# iptables filter chains (priority -10 < 0): kube-router's NetworkPolicy chains ACCEPT pod traffic that
# complies with the policies, and an ACCEPT there would otherwise let the cut traffic through. A reject in
# any base chain is final. Every packet of a cut path is answered with a TCP reset, so new and established
# connections both end at once, as at a firewall that rejects.
set -euo pipefail
NODE_IP=${NODE_IP:-10.244.0.1}
BRIDGE=${BRIDGE:-mailpod0}
WEST_UID=${WEST_UID:-64010}
TABLE=mailpod_e2e_cut
say() { echo "partition: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
command -v nft >/dev/null || { say "nft is missing (Debian package nftables, e2e/packages.txt)"; exit 1; }
drop_table() { nft list table inet "$TABLE" >/dev/null 2>&1 && nft delete table inet "$TABLE" || true; }
case ${1:-} in
  isolate-primary)
    shift
    drop_table
    lbs=""
    for ip in "$@"; do lbs="$lbs${lbs:+, }$ip"; done
    {
      echo "table inet $TABLE {"
      echo "  chain in { type filter hook input priority -10; policy accept;"
      echo "    iifname \"$BRIDGE\" ip daddr $NODE_IP tcp dport { 7443, 8443 } reject with tcp reset"
      echo "  }"
      echo "  chain out { type filter hook output priority -10; policy accept;"
      echo "    meta skuid $WEST_UID ip daddr $NODE_IP tcp dport 6443 reject with tcp reset"
      # After kube-proxy's DNAT (output NAT runs at -100) the destination is a pod; the original
      # destination is the load balancer's.
      [ -z "$lbs" ] || echo "    meta skuid $WEST_UID meta l4proto tcp ct original ip daddr { $lbs } reject with tcp reset"
      echo "  }"
      echo "}"
    } | nft -f -
    say "primary isolated (front ends: ${*:-none})"
    ;;
  heal)
    drop_table
    say "healed"
    ;;
  *) say "usage: $0 isolate-primary LB_IP... | heal"; exit 1 ;;
esac
