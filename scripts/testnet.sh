#!/usr/bin/env bash
# The main job: a local testnet of 4 nodes training the MLP on Fashion-MNIST
# for 3 epochs, then a per-node table. Extra arguments go to `testnet run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh"
cd "$MESHTRAIN_ROOT"
exec "$MESHTRAIN_BIN" testnet run --nodes 4 --epochs 3 --model mlp --out out/testnet "$@"
