#!/usr/bin/env bash
# Prints what helps after a failed real-cluster run: nodes, every pod, recent events, the operator's log,
# and the last lines of each local component's log (e2e/cluster-up.sh's state directory).
set -uo pipefail
STATE=${STATE:-/var/lib/mailpod-e2e}
K=${KUBECTL:-kubectl}
section() { echo; echo "==== $*"; }
section nodes; $K get nodes -o wide
section pods; $K get pods -A -o wide
section "MailPods, StorageLUNs, SiteFailovers"; $K get mailpods,storageluns,sitefailovers -A -o wide
section "events (last 60)"; $K get events -A --sort-by=.lastTimestamp | tail -n 60
section "operator log"; $K -n "${RELEASE_NAMESPACE:-mailpod-system}" logs -l app.kubernetes.io/name=mailpod-operator --tail=200 --prefix
for ns in $($K get ns -o name | sed 's#namespace/##' | grep '^mailpod-e2e-'); do
  for p in $($K -n "$ns" get pods -o name); do
    section "$ns $p (last 40 lines)"; $K -n "$ns" logs "$p" --all-containers --tail=40
  done
done
if [ -d "$STATE/logs" ]; then
  for f in "$STATE"/logs/*.log; do section "$f (last 20 lines)"; tail -n 20 "$f"; done
fi
