#!/usr/bin/env bash
# Do bf16 Adam moments (`sae train --adam-state bfloat16`, stochastic rounding) cost SAE quality?
# One existing cache, two HierarchicalTopK SAEs that differ only in --adam-state (same seed, same
# data order), evaluated on the same held-out rows at every inference k.
#
# Usage:  bash bench/adam_state_quality.sh CACHE OUT_DIR [TOKENS] [EXTRA `sae train` OPTIONS...]
# (e.g. the cache of `./run demo`: demo-out/cache, on CPU: --device cpu --expansion 8 --k 32)
set -euo pipefail
cache=$1 out=$2 tokens=${3:-2000000}
shift 3 || shift $#
mkdir -p "$out"
for st in float32 bfloat16; do
  sae train --cache "$cache" --tokens "$tokens" --seed 0 --adam-state "$st" \
    --out "$out/run-$st" --overwrite --eval-every 0 --no-progress "$@"
  sae eval "$out/run-$st" --cache "$cache" --k 1,2,4,8,16,32 > /dev/null
done
python3 - "$out" <<'PY'
import json
import sys

out = sys.argv[1]
runs = {st: json.load(open(f"{out}/run-{st}/eval.json")) for st in ("float32", "bfloat16")}
print("| k | FVU, fp32 moments | FVU, bf16 moments |")
print("|---|---|---|")
bf16 = {r["k"]: r for r in runs["bfloat16"]["results"] if r["mode"] == "topk"}
for r in runs["float32"]["results"]:
    if r["mode"] == "topk" and r["k"] in bf16:
        print(f"| {r['k']} | {r['fvu']:.4f} | {bf16[r['k']]['fvu']:.4f} |")
print("dead latents:", {st: r["results"][-1]["dead"] for st, r in runs.items()})
PY
