#!/usr/bin/env bash
# Stops or starts one component of the local cluster (or of e2e/sites-up.sh's sites) by its recorded PID and
# command line, as the failure scenarios do: `e2e/component.sh stop kube-apiserver`, then `start`.
#
#   e2e/component.sh stop|start|restart NAME     (NAME: a file in $STATE/cmds)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-/var/lib/mailpod-e2e}
NAME=component
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
[ $# = 2 ] || die "usage: $0 stop|start|restart NAME"
action=$1 component=$2
[ -f "$STATE/cmds/$component" ] || die "no component $component in $STATE/cmds"
case $action in
  stop) stop_component "$component" ;;
  start)
    eval "set -- $(cat "$STATE/cmds/$component")"
    launch "$component" "$@"
    ;;
  restart) "$0" stop "$component" && "$0" start "$component" ;;
  *) die "usage: $0 stop|start|restart NAME" ;;
esac
