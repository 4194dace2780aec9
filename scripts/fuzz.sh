#!/usr/bin/env bash
# Fuzzes every decoder of bytes a peer or a disk hands a node (cargo-fuzz,
# libFuzzer with AddressSanitizer and debug assertions; targets in node/fuzz/fuzz_targets):
#   ./scripts/fuzz.sh [RUNS] [TARGET...]
# RUNS executions per target (default 10000000); every target by default.
# Prints each target's executions, time and result, and exits non-zero if
# any target found a crash (its input is kept under node/fuzz/artifacts).
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1, so no second toolchain is needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
runs="${1:-10000000}"
shift || true
cd "$MESHTRAIN_ROOT/node/fuzz"
export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$MESHTRAIN_CACHE/fuzz-target"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
# Debug assertions on: an overflow on attacker-chosen numbers is a crash.
cargo fuzz build --debug-assertions
logs="$(mktemp -d)"
failed=0
printf '%-20s %12s %8s %s\n' target executions seconds result
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  start=$(date +%s.%N)
  if cargo fuzz run --debug-assertions "$t" "corpus/$t" -- -runs="$runs" -print_final_stats=1 >"$logs/$t.log" 2>&1; then
    result=clean
  else
    result="FAILED (log: $logs/$t.log)"
    failed=1
  fi
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' || echo "?")
  printf '%-20s %12s %8.1f %s\n' "$t" "$execs" "$secs" "$result"
done
exit "$failed"
