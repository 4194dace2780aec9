#!/usr/bin/env bash
# Fuzzes the delta codec's decoder: ./scripts/fuzz.sh [SECONDS] (default 600).
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1 (the only toolchain this machine can have).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$MESHTRAIN_ROOT/model/fuzz"
RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$MESHTRAIN_CACHE/fuzz-target" \
  cargo fuzz run codec_decode -- -max_total_time="${1:-600}"
