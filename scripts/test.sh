#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh" --tests
cd "$MESHTRAIN_ROOT"
cargo test --release --workspace "$@"
