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
python3 "$(dirname "$0")/eval_compare.py" "fp32 moments" "$out/run-float32/eval.json" "bf16 moments" "$out/run-bfloat16/eval.json"
