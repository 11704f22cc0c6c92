#!/usr/bin/env bash
# Builds the operator binary and, with it, the images of e2e/build-images.sh (arguments are passed on, e.g.
# `--only mail,operator`). The images carry the dev-profile binary, stripped of debug information: the
# release profile's LTO build takes several times as long on these machines, and the code is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --no-default-features --bin mailpod-operator
mkdir -p target/e2e
strip -o target/e2e/mailpod-operator target/debug/mailpod-operator
bash e2e/build-images.sh --binary target/e2e/mailpod-operator "$@" >/dev/null
