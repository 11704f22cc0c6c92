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
# Rules go into the chains sites-up.sh made (MAILPOD-E2E-CUT-IN from INPUT, MAILPOD-E2E-CUT-OUT from OUTPUT);
# every packet of a cut path is answered with a TCP reset, so new and established connections both end at
# once, as at a firewall that rejects.
set -euo pipefail
NODE_IP=${NODE_IP:-10.244.0.1}
BRIDGE=${BRIDGE:-mailpod0}
WEST_UID=${WEST_UID:-64010}
say() { echo "partition: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
for ch in MAILPOD-E2E-CUT-IN MAILPOD-E2E-CUT-OUT; do
  iptables -n -L "$ch" >/dev/null 2>&1 || { say "chain $ch is missing: run e2e/sites-up.sh"; exit 1; }
done
case ${1:-} in
  isolate-primary)
    shift
    iptables -F MAILPOD-E2E-CUT-IN
    iptables -F MAILPOD-E2E-CUT-OUT
    iptables -A MAILPOD-E2E-CUT-IN -i "$BRIDGE" -d "$NODE_IP" -p tcp -m multiport --dports 7443,8443 \
      -j REJECT --reject-with tcp-reset
    iptables -A MAILPOD-E2E-CUT-OUT -m owner --uid-owner "$WEST_UID" -d "$NODE_IP" -p tcp --dport 6443 \
      -j REJECT --reject-with tcp-reset
    for ip in "$@"; do
      # After kube-proxy's DNAT the destination is a pod; the original destination is the load balancer's.
      iptables -A MAILPOD-E2E-CUT-OUT -m owner --uid-owner "$WEST_UID" -p tcp -m conntrack --ctorigdst "$ip" \
        -j REJECT --reject-with tcp-reset
    done
    say "primary isolated (front ends: ${*:-none})"
    ;;
  heal)
    iptables -F MAILPOD-E2E-CUT-IN
    iptables -F MAILPOD-E2E-CUT-OUT
    say "healed"
    ;;
  *) say "usage: $0 isolate-primary LB_IP... | heal"; exit 1 ;;
esac
