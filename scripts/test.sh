#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine and runs every test, the real-cluster ones included.
# The mail software comes from mail-image/packages.txt, the same list the image installs; the cluster's
# Debian packages from e2e/packages.txt; Go modules and crates from their registries.
#
# Steps: packages -> fmt, clippy, go vet -> every cargo test (the e2e ones skip here: no KUBECONFIG) ->
# the local cluster (e2e/build-cluster.sh, the images, e2e/cluster-up.sh, the chart) -> tests/e2e.rs against
# it with MAILPOD_E2E_REQUIRED=1 -> a standby site's control plane and a witness beside it (e2e/sites-up.sh)
# -> tests/e2e_sites.rs -> e2e/cluster-down.sh.
#
# MAILPOD_E2E: `local` (default; needs root) builds and runs the local cluster; `kubeconfig` runs tests/e2e.rs
# against the cluster KUBECONFIG names (chart installed, e.g. by e2e/kind-up.sh); `skip` runs no cluster test.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
E2E=${MAILPOD_E2E:-local}
t0=$(date +%s)
phase() { echo "test.sh: [$(($(date +%s) - t0)) s] $*" >&2; }

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
install_listed() {
  local missing=() pkg
  while read -r pkg; do
    pkg=${pkg%%#*}; pkg=$(echo "$pkg" | xargs)
    [ -n "$pkg" ] || continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done < <(cat "$@")
  if [ ${#missing[@]} -gt 0 ]; then
    phase "installing: ${missing[*]}"
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
lists=(mail-image/packages.txt tests/packages.txt)
[ "$E2E" = local ] && lists+=(e2e/packages.txt)
install_listed "${lists[@]}"

phase "fmt, clippy, go vet"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
if [ "$E2E" = local ] || command -v go >/dev/null 2>&1; then
  (cd e2e/cluster && test -z "$(gofmt -l .)" && go vet ./cmd/...)
fi

phase "cargo tests"
# The e2e tests skip in this pass (KUBECONFIG unset) and run against the cluster below.
env -u KUBECONFIG -u MAILPOD_E2E_REQUIRED cargo test --locked --no-fail-fast

run_e2e() {
  phase "tests/e2e.rs against $KUBECONFIG"
  MAILPOD_E2E_REQUIRED=1 cargo test --locked --test e2e -- --test-threads=1
}
case $E2E in
  skip) phase "MAILPOD_E2E=skip: no real-cluster tests"; exit 0 ;;
  kubeconfig) run_e2e; phase "done"; exit 0 ;;
  local) ;;
  *) echo "MAILPOD_E2E must be local, kubeconfig or skip" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "test.sh: the local cluster needs root (MAILPOD_E2E=skip runs the rest)" >&2; exit 1; }
phase "building the cluster's programs"
bash e2e/build-cluster.sh
phase "building the operator binary and the images"
bash e2e/build-operator-images.sh

phase "cluster up"
down() {
  local rc=$?
  if [ $rc != 0 ] && [ -n "${KUBECONFIG:-}" ]; then bash e2e/diagnose.sh || true; fi
  bash e2e/cluster-down.sh || true
  exit $rc
}
trap down EXIT
eval "$(bash e2e/cluster-up.sh | grep '^export KUBECONFIG=')"
export KUBECONFIG
export PATH=$ROOT/target/e2e/bin:$PATH
# The quiet-minute test counts the operator's writes in the API server's audit log.
export MAILPOD_E2E_AUDIT_LOG=${STATE:-/var/lib/mailpod-e2e}/audit/audit.log MAILPOD_E2E_REQUIRE_AUDIT=1
bash e2e/install-operator.sh
run_e2e
phase "sites up: a standby control plane and a witness"
eval "$(bash e2e/sites-up.sh | grep '^export ')"
phase "tests/e2e_sites.rs: site failover against real API servers"
MAILPOD_E2E_REQUIRED=1 cargo test --locked --test e2e_sites -- --test-threads=1
phase "done"
