# Shared by the e2e scripts: starting components as recorded host processes, bounded waits, certificates
# from the cluster CA and kubeconfigs. Source it after setting STATE and NAME (the script's name for logs).
RUN=${RUN:-/run/mailpod-e2e}
PKI=$STATE/pki

say() { echo "${NAME:-e2e}: $*" >&2; }
die() { say "$*"; exit 1; }

alive() { [ -f "$STATE/pids/$1" ] && kill -0 "$(cat "$STATE/pids/$1")" 2>/dev/null; }
# Starts a component in its own session, logging to $STATE/logs/NAME.log; a running one is kept. The
# command line is recorded in $STATE/cmds/NAME, so e2e/component.sh can stop and start it again.
launch() {
  local name=$1; shift
  mkdir -p "$STATE/pids" "$STATE/logs" "$STATE/cmds"
  printf '%q ' "$@" >"$STATE/cmds/$name"
  if alive "$name"; then return; fi
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name"
}
# Stops a component by its recorded PID (its whole session), waiting up to 10 s before SIGKILL.
stop_component() {
  local pid
  [ -f "$STATE/pids/$1" ] || return 0
  pid=$(cat "$STATE/pids/$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/pids/$1"
}
# Waits (bounded) until a command succeeds; on timeout shows the component's log.
wait_for() {
  local what=$1 log=$2 tries=$3; shift 3
  for _ in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  say "timed out waiting for $what; last lines of $log:"
  tail -n 30 "$STATE/logs/$log.log" >&2 || true
  exit 1
}

gen_ca() {
  [ -f "$PKI/ca.crt" ] && return
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=mailpod-e2e-ca" \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
}
# cert NAME CN [O] [SANs]: a certificate signed by the cluster CA.
cert() {
  local name=$1 cn=$2 org=${3:-} sans=${4:-}
  [ -f "$PKI/$name.crt" ] && return
  local subj="/CN=$cn"; [ -n "$org" ] && subj="/O=$org$subj"
  openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$PKI/$name.key" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=digitalSignature,keyEncipherment"
    if [ -n "$sans" ]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$sans";
    else echo "extendedKeyUsage=clientAuth"; fi
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
# service_account_key NAME: the key pair an API server signs and checks ServiceAccount tokens with.
service_account_key() {
  [ -f "$PKI/$1.key" ] && return
  openssl genrsa -out "$PKI/$1.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/$1.key" -pubout -out "$PKI/$1.pub" 2>/dev/null
}
# kubeconfig FILE SERVER USER CERT: a kubeconfig for SERVER (https://host:port) with a client certificate.
kubeconfig() {
  local file=$1 server=$2 user=$3 crt=$4
  [ -f "$file" ] && return
  cat >"$file" <<EOK
apiVersion: v1
kind: Config
clusters:
- name: mailpod-e2e
  cluster:
    server: $server
    certificate-authority: $PKI/ca.crt
users:
- name: $user
  user:
    client-certificate: $PKI/$crt.crt
    client-key: $PKI/$crt.key
contexts:
- name: mailpod-e2e
  context: {cluster: mailpod-e2e, user: $user}
current-context: mailpod-e2e
EOK
}
