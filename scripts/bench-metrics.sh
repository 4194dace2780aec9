#!/usr/bin/env bash
# What observing a node costs it. (1) The same single-node run (MLP, H=50,
# no evaluation until the end) without --metrics, and with --metrics scraped
# once a second. (2) A 3-node testnet without and with --dashboard, the page
# fetched once a second. Each pair is alternated PAIRS times; prints the
# mean local-round (training) time.
#   ./scripts/bench-metrics.sh [ROUNDS] [PAIRS]     (defaults: 300, 2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh" >/dev/null
cd "$MESHTRAIN_ROOT"
rounds="${1:-300}"; pairs="${2:-2}"
work="out/bench-metrics"; rm -rf "$work"; mkdir -p "$work"
mean_train_ms() {
  python3 -c '
import json, sys
h = [r["train_ms"] for r in json.load(open(sys.argv[1]))["history"]]
print(f"{sum(h)/len(h):.2f}")' "$1/results.json"
}
run() { # $1: dir, $2: with metrics (0/1)
  local extra=()
  [ "$2" = 1 ] && extra=(--metrics 127.0.0.1:19464)
  # A run of its own, founded by this node (an open run needs founders).
  "$MESHTRAIN_BIN" identity show "$1" --key-only >"$1.key"
  "$MESHTRAIN_BIN" spec new --model mlp --rounds "$rounds" --local-steps 50 --nodes 1 --founders "$1.key" \
    --out "$1.toml" >/dev/null
  "$MESHTRAIN_BIN" node run --data-dir "$1" --listen /ip4/127.0.0.1/tcp/0 --run "$1.toml" \
    --data out/datasets/fashion-mnist --wait-peers 0 --drain-s 0 --eval-every "$rounds" --checkpoint-every 0 "${extra[@]}" >"$1.log" 2>&1 &
  local pid=$!
  if [ "$2" = 1 ]; then
    while kill -0 "$pid" 2>/dev/null; do curl -s -o /dev/null 127.0.0.1:19464/metrics || true; sleep 1; done
  fi
  wait "$pid"
}
for i in $(seq "$pairs"); do
  run "$work/plain-$i" 0; run "$work/scraped-$i" 1
  echo "pair $i: mean local round $(mean_train_ms "$work/plain-$i") ms without metrics, $(mean_train_ms "$work/scraped-$i") ms with /metrics scraped every second"
done

mean_nodes_train_ms() {
  python3 -c '
import json, sys, glob
h = [r["train_ms"] for f in glob.glob(sys.argv[1] + "/node-*/results.json") for r in json.load(open(f))["history"]]
print(f"{sum(h)/len(h):.2f}")' "$1"
}
net() { # $1: out dir, $2: with dashboard (0/1)
  local extra=()
  [ "$2" = 1 ] && extra=(--dashboard 127.0.0.1:18081)
  "$MESHTRAIN_BIN" testnet run --nodes 3 --rounds "$((rounds / 3))" --local-steps 50 --out "$1" "${extra[@]}" >"$1.log" 2>&1 &
  local pid=$!
  if [ "$2" = 1 ]; then
    while kill -0 "$pid" 2>/dev/null; do curl -s -o /dev/null 127.0.0.1:18081/ || true; sleep 1; done
  fi
  wait "$pid"
}
for i in $(seq "$pairs"); do
  net "$work/net-plain-$i" 0; net "$work/net-dash-$i" 1
  echo "testnet pair $i: mean local round $(mean_nodes_train_ms "$work/net-plain-$i") ms without dashboard, $(mean_nodes_train_ms "$work/net-dash-$i") ms with the dashboard fetched every second"
done
