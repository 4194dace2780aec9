#!/usr/bin/env bash
# The hostile-peer soak: an honest MLP mesh alone, then the same mesh with
# the hostile peer (tests/src/hostile.rs) attacking node 0 for the whole
# run; prints every node's peak RSS, round time and accuracy side by side,
# and what node 0 served the hostile peer against its byte budget.
#   ./scripts/bench-hostile.sh [ROUNDS] [NODES]     (defaults: 1500, 8)
# On a 2-core machine 8 MLP nodes close 51-68 rounds a minute (fewer as the
# run goes on): 1500 rounds is about a 30-minute soak per run, an hour in
# all. Figures in out/hostile-soak/soak.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh" >/dev/null
cd "$MESHTRAIN_ROOT"
cargo build --release -p meshtrain-tests --bin hostile-soak
"$CARGO_TARGET_DIR/release/hostile-soak" --rounds "${1:-1500}" --nodes "${2:-8}" --out out/hostile-soak
