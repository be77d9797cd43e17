#!/usr/bin/env bash
# Does the bf16 encoder (`sae train --encoder-dtype bfloat16`, the CUDA default) cost SAE quality?
# One real cache, two HierarchicalTopK SAEs that differ only in --encoder-dtype (same seed, same
# data order), evaluated on the same held-out rows at every inference k.
#
# Usage (GPU machine):  bash bench/encoder_dtype_quality.sh MODEL.gguf OUT_DIR [TOKENS (integer)]
set -euo pipefail
model=$1 out=$2 tokens=${3:-2000000}
mkdir -p "$out"
sae harvest --model "$model" --layer 11 --tokens "$tokens" --dataset python-docs --context 256 \
  --batch-size 64 --out "$out/cache" --overwrite --no-progress
for dt in bfloat16 float32; do
  sae train --cache "$out/cache" --k 64 --expansion 16 --tokens $((tokens * 4)) --batch 4096 --seed 0 \
    --encoder-dtype "$dt" --out "$out/run-$dt" --overwrite --eval-every 0 --no-progress
  sae eval "$out/run-$dt" --cache "$out/cache" --k 1,2,4,8,16,32,64 --tokens 1M
done
python3 "$(dirname "$0")/eval_compare.py" "bf16 encoder" "$out/run-bfloat16/eval.json" "fp32 encoder" "$out/run-float32/eval.json"
