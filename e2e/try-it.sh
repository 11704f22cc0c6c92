#!/usr/bin/env bash
# Runs the product for real in one command: the local cluster (built here from upstream Kubernetes, see
# e2e/README.md), the chart, and examples/mailpod-small.yaml in namespace `mail` with a self-signed
# certificate and a password for each mailbox; then prints how to send a message and read it back.
#
# With KUBECONFIG set to a cluster of your own (kind, or any with a CSI driver that takes snapshots and the
# chart's images loadable), it uses that cluster and skips building the local one: the chart must then be
# installed already (docs/install.md, or e2e/kind-up.sh for kind).
#
# Needs root for the local cluster. Remove it with: sudo bash e2e/cluster-down.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
NS=${NS:-mail}
say() { echo "try-it: $*" >&2; }

if [ -z "${KUBECONFIG:-}" ]; then
  [ "$(id -u)" = 0 ] || { say "the local cluster needs root (or export KUBECONFIG for a cluster of yours)"; exit 1; }
  missing=$(grep -hv '^\s*#' mail-image/packages.txt tests/packages.txt e2e/packages.txt | xargs -n1 | while read -r p; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
  if [ -n "$missing" ]; then
    say "installing Debian packages: $(echo $missing)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  say "building the cluster's programs (first time: about 11 minutes)"
  bash e2e/build-cluster.sh
  say "building the operator and the images"
  bash e2e/build-operator-images.sh
  eval "$(bash e2e/cluster-up.sh | grep '^export KUBECONFIG=')"
  export KUBECONFIG
  export PATH=$ROOT/target/e2e/bin:$PATH
  bash e2e/install-operator.sh >/dev/null
fi

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if ! kubectl -n "$NS" get secret small-tls >/dev/null 2>&1; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=mail.example.com" \
    -addext "subjectAltName=DNS:mail.example.com" -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
  kubectl -n "$NS" create secret tls small-tls --cert "$tmp/tls.crt" --key "$tmp/tls.key" >/dev/null
fi
if ! kubectl -n "$NS" get secret small-passwd >/dev/null 2>&1; then
  password=$(openssl rand -hex 12)
  for m in alice bob carol; do echo "$m@example.com:{PLAIN}$password"; done >"$tmp/passwd"
  kubectl -n "$NS" create secret generic small-passwd --from-file=passwd="$tmp/passwd" >/dev/null
fi
password=$(kubectl -n "$NS" get secret small-passwd -o jsonpath='{.data.passwd}' | base64 -d | head -1 | sed 's/.*{PLAIN}//')
# The example as it is, with the passwords of Secret small-passwd for its mailboxes.
sed 's/^  mailboxes:$/  mailboxes:\n    passwdFileSecret: {name: small-passwd, key: passwd}/' examples/mailpod-small.yaml |
  kubectl -n "$NS" apply -f - >/dev/null
say "waiting for MailPod small to be Ready"
kubectl -n "$NS" wait --for=condition=Ready mailpod/small --timeout=10m >/dev/null
kubectl -n "$NS" get mailpods,storageluns,pods

ip() { kubectl -n "$NS" get service "$1" -o jsonpath='{.spec.clusterIP}'; }
cat <<EOF

MailPod small is Ready in namespace $NS. From this machine (the local cluster routes its Service addresses):

  # send a message to alice through the mx Service
  printf 'Subject: hello\r\n\r\nfirst message\r\n' | curl -sS smtp://$(ip small-mx):25 \\
    --mail-from someone@example.org --mail-rcpt alice@example.com -T -
  # read it back over IMAP (STARTTLS; the certificate is self-signed)
  curl -sS --ssl-reqd -k -u 'alice@example.com:$password' 'imap://$(ip small-imap):143/INBOX;MAILINDEX=1'
  # send as alice through submission (STARTTLS and AUTH)
  printf 'Subject: from alice\r\n\r\nhi bob\r\n' | curl -sS --ssl-reqd -k smtp://$(ip small-submission):587 \\
    -u 'alice@example.com:$password' --mail-from alice@example.com --mail-rcpt bob@example.com -T -

Passwords are in Secret $NS/small-passwd. Remove everything with: sudo bash e2e/cluster-down.sh
EOF
