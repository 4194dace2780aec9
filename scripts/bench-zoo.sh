#!/usr/bin/env bash
# Model zoo figures (issue 9): each task on a 4-node mesh and on one node,
# for the same number of samples. Prints one line per run; summaries in
# out/zoo/*/summary.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh"
cd "$MESHTRAIN_ROOT"
B="$MESHTRAIN_BIN"
SHARED="${MESHTRAIN_SHARED_DATA:-$MESHTRAIN_ROOT/../shared/data}"
mkdir -p out/zoo
if [ ! -d out/datasets/fashion-mnist/manifests ]; then
    # As `testnet run` imports it by default (1 MiB blocks).
    "$B" data import --format idx /usr/share/datasets/fashion-mnist --name fashion-mnist --block-size 1048576 \
        --test-fraction 0 --out out/datasets/fashion-mnist
fi
if [ ! -d out/datasets/mnist/manifests ]; then
    "$B" data import --format idx "$SHARED/mnist-t10k" --name mnist --block-size 200960 --out out/datasets/mnist
fi
if [ ! -d out/datasets/shakespeare/manifests ]; then
    "$B" data import --format text --seq-len 65 "$SHARED/tinyshakespeare.txt" --name shakespeare \
        --block-size 66560 --out out/datasets/shakespeare
fi

run() { # NAME NODES ARGS...
    local name=$1 nodes=$2; shift 2
    rm -rf "out/zoo/$name"
    "$B" testnet run --nodes "$nodes" --out "out/zoo/$name" "$@" > "out/zoo/$name.log" 2>&1
    # Keep the summaries and reports, not the ledgers.
    rm -rf out/zoo/"$name"/node-*/ledger out/zoo/"$name"/node-*/blocks out/zoo/"$name"/node-*/checkpoint.safetensors
    python3 - "$name" <<'PY'
import json, sys
name = sys.argv[1]
s = json.load(open(f"out/zoo/{name}/summary.json"))
extra = []
t = s["honest_mean_task"]
if t.get("perplexity") is not None:
    extra.append(f"val loss {s['honest_mean_loss']:.4f} nats/char, perplexity {t['perplexity']:.2f}")
if t.get("roc_auc") is not None:
    extra.append(f"ROC-AUC {t['roc_auc']:.4f}")
if t.get("macro_f1") is not None:
    extra.append(f"macro F1 {t['macro_f1']:.4f}")
print(f"{name:<16} nodes {s['nodes_total']}  rounds {s['rounds']:>4}  acc {100*s['honest_mean_acc']:.2f}% (min {100*s['honest_min_acc']:.2f}%)  "
      + "; ".join(extra) + f"  wall {s['wall_s']:.0f} s")
PY
}

ae=(--model autoencoder --anomaly-class 0 --data out/datasets/mnist --epochs 5 --eval-every 5)
lm=(--model char-transformer --data out/datasets/shakespeare --epochs 2 --local-steps 5 --eval-every 4)
cnn=(--model cnn --data out/datasets/fashion-mnist --epochs 1 --eval-every 6)
run ae-mesh 4 "${ae[@]}"
run ae-one 1 "${ae[@]}"
run lm-mesh 4 "${lm[@]}"
run lm-one 1 "${lm[@]}"
run cnn-mesh 4 "${cnn[@]}"
run cnn-one 1 "${cnn[@]}"
