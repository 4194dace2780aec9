#!/usr/bin/env bash
# meshtrain against plain PyTorch on the same model and samples (issue 18),
# one after the other in one invocation, because the machine is shared and
# noisy: only figures from the same run compare.
#
#   scripts/bench-vs-pytorch.sh [--models mlp,cnn] [--nodes 1,4] [--epochs 3]
#                               [--local-steps 10] [--codec C] [--out out/bench-vs-pytorch]
#
# For each model: plain PyTorch (scripts/pytorch_baseline.py, every core),
# then `testnet run --nodes N` for each N (the same samples in all: epochs
# over Fashion-MNIST's 60,000 training images), evaluated once at the end.
# Prints both walls, the ratio and both accuracies; the table also goes to
# OUT/results.md and the rows to OUT/results.json. Each testnet's own
# breakdown of a round is in OUT/MODEL-N/summary.json (`stages`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$MESHTRAIN_ROOT/scripts/setup.sh"
cd "$MESHTRAIN_ROOT"
# MESHTRAIN_BENCH_BIN runs another build (a before/after comparison);
# --codec runs meshtrain with another codec than the default, e.g.
# topk-int8:0.01 or fp16.
B="${MESHTRAIN_BENCH_BIN:-$MESHTRAIN_BIN}"
PY="$MESHTRAIN_ROOT/.venv/bin/python"

models=mlp,cnn nodes=1,4 epochs=3 steps=10 out=out/bench-vs-pytorch codec=
while [ $# -gt 0 ]; do
    case "$1" in
        --models) models=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --epochs) epochs=$2; shift 2 ;;
        --local-steps) steps=$2; shift 2 ;;
        --codec) codec=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "bench-vs-pytorch: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
rows="$out/rows.jsonl"
: > "$rows"

# One import for every run (as `testnet run` makes it: 1 MiB blocks).
if [ ! -d "$out/dataset/manifests" ]; then
    "$B" data import --format idx /usr/share/datasets/fashion-mnist --name fashion-mnist \
        --block-size 1048576 --out "$out/dataset" > /dev/null
fi

for model in ${models//,/ }; do
    echo "== $model, $epochs epochs: plain PyTorch" >&2
    # Both walls are whole processes timed from outside: the script's own
    # figure misses the interpreter's start and torch's exit (~1 s here).
    started=$(date +%s.%N)
    "$PY" scripts/pytorch_baseline.py --model "$model" --epochs "$epochs" > "$out/$model-pytorch.json"
    ended=$(date +%s.%N)
    "$PY" - "$out/$model-pytorch.json" "$started" "$ended" <<'PY'
import json, sys
path = sys.argv[1]
torch = json.load(open(path))
torch["script_wall_s"] = torch["wall_s"]
torch["wall_s"] = round(float(sys.argv[3]) - float(sys.argv[2]), 2)
json.dump(torch, open(path, "w"))
PY
    cat "$out/$model-pytorch.json" >&2; echo >&2
    for n in ${nodes//,/ }; do
        echo "== $model, $epochs epochs: meshtrain, $n node(s)${codec:+, codec $codec}" >&2
        dir="$out/$model-$n"
        rm -rf "$dir"
        started=$(date +%s.%N)
        "$B" testnet run --nodes "$n" --model "$model" --epochs "$epochs" --local-steps "$steps" \
            --eval-every 100000 --data "$out/dataset" ${codec:+--codec "$codec"} --out "$dir" > "$dir.log" 2>&1 \
            || { echo "testnet run failed; see $dir.log" >&2; tail -20 "$dir.log" >&2; exit 1; }
        ended=$(date +%s.%N)
        "$PY" - "$out/$model-pytorch.json" "$dir/summary.json" "$model" "$n" "$started" "$ended" >> "$rows" <<'PY'
import json, sys
torch = json.load(open(sys.argv[1]))
s = json.load(open(sys.argv[2]))
model, n = sys.argv[3], int(sys.argv[4])
wall = float(sys.argv[6]) - float(sys.argv[5])
stages = s.get("stages") or {}
print(json.dumps({
    "model": model, "nodes": n, "epochs": torch["epochs"],
    "pytorch_wall_s": torch["wall_s"], "pytorch_acc": torch["accuracy"],
    "meshtrain_wall_s": round(wall, 2), "meshtrain_acc": s["honest_mean_acc"],
    "ratio": round(wall / torch["wall_s"], 2),
    "points": round(100 * (s["honest_mean_acc"] - torch["accuracy"]), 2),
    "rounds": s["rounds"], "round_ms": stages.get("round_ms"),
    "overhead_share": stages.get("overhead_share"),
}))
PY
    done
done

"$PY" - "$rows" "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
json.dump(rows, open(f"{out}/results.json", "w"), indent=2)
lines = [
    "| model | nodes | PyTorch wall | meshtrain wall | ratio | PyTorch acc | meshtrain acc | points | rounds | ms/round | node overhead |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    share = r["overhead_share"]
    lines.append(
        f"| {r['model']} | {r['nodes']} | {r['pytorch_wall_s']:.1f} s | {r['meshtrain_wall_s']:.1f} s | "
        f"{r['ratio']:.2f}x | {100 * r['pytorch_acc']:.2f} % | {100 * r['meshtrain_acc']:.2f} % | "
        f"{r['points']:+.2f} | {r['rounds']} | "
        + (f"{r['round_ms']:.1f}" if r["round_ms"] is not None else "-")
        + " | "
        + (f"{100 * share:.1f} %" if share is not None else "-")
        + " |"
    )
text = "\n".join(lines)
open(f"{out}/results.md", "w").write(text + "\n")
print(text)
PY
