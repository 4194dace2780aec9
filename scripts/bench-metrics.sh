#!/usr/bin/env bash
# What serving /metrics costs a node: the same single-node run (MLP, H=50,
# no evaluation until the end) without --metrics, and with --metrics scraped
# once a second, alternated PAIRS times; prints the mean local-round time.
#   ./scripts/bench-metrics.sh [ROUNDS] [PAIRS]     (defaults: 300, 2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh" >/dev/null
cd "$MESHTRAIN_ROOT"
rounds="${1:-300}"; pairs="${2:-2}"
work="out/bench-metrics"; rm -rf "$work"; mkdir -p "$work"
"$MESHTRAIN_BIN" spec new --model mlp --rounds "$rounds" --local-steps 50 --nodes 1 --out "$work/run.toml" >/dev/null
mean_train_ms() {
  python3 -c 'import json,sys; h=json.load(open(sys.argv[1]))["history"]; print(f"{sum(r[\"train_ms\"] for r in h)/len(h):.2f}")' "$1/results.json"
}
run() { # $1: dir, $2: with metrics (0/1)
  local extra=()
  [ "$2" = 1 ] && extra=(--metrics 127.0.0.1:19464)
  "$MESHTRAIN_BIN" node run --data-dir "$1" --listen /ip4/127.0.0.1/tcp/0 --run "$work/run.toml" \
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
