#!/usr/bin/env bash
# The whole test suite: formatting and lints, then unit, property,
# simulation and end-to-end tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh" --tests
cd "$MESHTRAIN_ROOT"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace "$@"
