#!/usr/bin/env bash
# The hostile-peer soak: an honest MLP mesh alone, then the same mesh with
# the hostile peer (tests/src/hostile.rs) attacking node 0 for the whole
# run; prints every node's peak RSS, round time and accuracy side by side,
# and what node 0 served the hostile peer against its byte budget.
#   ./scripts/bench-hostile.sh [ROUNDS] [NODES]     (defaults: 2400, 8)
# On a quiet 2-core machine 8 MLP nodes close about 80 rounds a minute at
# first and 70 later (2000 rounds took 25 and 28 min): 2400 rounds is a
# 30-minute soak per run, over an hour in all. Nothing else may
# run meanwhile, or the two runs' round times are not comparable. Figures
# in out/hostile-soak/soak.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The whole workspace as the test suite builds it: building the one binary
# alone unifies features differently and recompiles every dependency.
"$MESHTRAIN_ROOT/scripts/setup.sh" --tests >/dev/null
cd "$MESHTRAIN_ROOT"
"$CARGO_TARGET_DIR/release/hostile-soak" --rounds "${1:-2400}" --nodes "${2:-8}" --out out/hostile-soak
