#!/usr/bin/env bash
# Puts moto's S3-compatible server (PyPI `moto[server]`) in a virtualenv at target/tools/moto (or
# $MOTO_INSTALL_DIR) unless it is already there, and prints the path of its `moto_server` on stdout
# (everything else goes to stderr). tests/backup_s3.rs runs it on 127.0.0.1 as the object store that
# restic backs up to. The version is pinned so the tests always talk to the same server.
set -euo pipefail

cd "$(dirname "$0")/.."
VERSION="${MOTO_VERSION:-5.2.5}"
dest="${MOTO_INSTALL_DIR:-$PWD/target/tools/moto}"
server="$dest/bin/moto_server"

log() { echo "install-moto: $*" >&2; }

if [ -x "$server" ] && "$dest/bin/python" -c "import moto, flask" >/dev/null 2>&1; then
  echo "$server"
  exit 0
fi

python=""
for p in python3 python; do
  if command -v "$p" >/dev/null 2>&1; then python=$p; break; fi
done
[ -n "$python" ] || { log "python3 is needed (for venv and pip)"; exit 1; }

# Build next to the destination and rename: concurrent test processes may race here.
mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$(dirname "$dest")/.moto.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "installing moto[server]==$VERSION from PyPI"
"$python" -m venv "$work/venv" >&2
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$VERSION" >&2
rm -rf "$dest"
mv "$work/venv" "$dest"
# A venv's scripts name its interpreter by absolute path: point them at the final place.
sed -i "1s|^#!.*python.*$|#!$dest/bin/python|" "$dest"/bin/moto_server
echo "$server"
