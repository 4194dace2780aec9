#!/usr/bin/env bash
# Installs what meshtrain needs, idempotently, then builds it (release).
#   scripts/setup.sh          build the meshtrain binary
#   scripts/setup.sh --tests  build the binary and every test target
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MESHTRAIN_ROOT"

# 1. Debian packages: libclang for RocksDB's bindings, the Fashion-MNIST data,
#    a font for the PNG plots.
#    With --tests, also Chromium (the report test renders report.html in it).
pkgs=(libclang-dev dataset-fashion-mnist fonts-dejavu-core)
[ "${1:-}" = "--tests" ] && pkgs+=(chromium)
missing=()
for pkg in "${pkgs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. A project-local virtualenv with PyTorch 2.13.0 (libtorch for tch 0.26).
torch_ok() {
  .venv/bin/python - <<'PY' 2>/dev/null
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)
PY
}
# Free space, checked first: pip's failure on a full disk ("Errno 28"
# halfway through the nvidia wheels) does not say how much was needed.
need_gib() {
  local need=$1 what=$2 dir=$3 avail
  avail=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$avail" -lt "$need" ]; then
    echo "setup: $what needs about $need GiB free on $(df -P "$dir" | awk 'NR==2 {print $6}'), $avail GiB left (old testnet runs keep every payload in their ledgers: remove the ones you no longer need)" >&2
    exit 1
  fi
}
if ! torch_ok; then
  need_gib 8 "installing torch==2.13.0" .
  echo "setup: installing torch==2.13.0 into .venv (about 90 s, 4.7 GB)" >&2
  python3 -m venv .venv
  # No wheel cache: it would keep a second copy (about 3 GB) of what is installed.
  .venv/bin/pip install -q --no-cache-dir --upgrade pip
  .venv/bin/pip install -q --no-cache-dir torch==2.13.0
  torch_ok || { echo "setup: torch 2.13.0 did not install" >&2; exit 1; }
fi
# safetensors for Python: what loads `meshtrain model export` files into a
# PyTorch module (the README's three lines, and the tests that run them).
if ! .venv/bin/python -c "import safetensors.torch" 2>/dev/null; then
  .venv/bin/pip install -q --no-cache-dir safetensors==0.7.0 packaging==26.4
fi
# The real path: a venv reached through a symlink (the README's test links
# one into a temporary checkout) must not leave the cache's link pointing
# into a directory that is about to disappear.
torch_dir="$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(os.path.realpath(torch.__file__)))' 2>/dev/null)"
mkdir -p "$MESHTRAIN_CACHE"
ln -sfn "$torch_dir" "$LIBTORCH"

# 3. Build (release: tests and binaries share one profile, so RocksDB and
#    libtorch's bindings are compiled once). MESHTRAIN_NO_BUILD=1 (set by the
#    README's test, which runs inside `cargo test` and so cannot build) uses
#    the binary already built.
if [ -n "${MESHTRAIN_NO_BUILD:-}" ] && [ -x "$MESHTRAIN_BIN" ]; then
  echo "setup: MESHTRAIN_NO_BUILD: using $MESHTRAIN_BIN as built" >&2
  exit 0
fi
if [ ! -d "$CARGO_TARGET_DIR/release" ]; then
  mkdir -p "$CARGO_TARGET_DIR"
  need_gib 6 "a cold build" "$CARGO_TARGET_DIR"
fi
if [ "${1:-}" = "--tests" ]; then
  cargo build --release --workspace --all-targets
else
  cargo build --release --bin meshtrain
fi
