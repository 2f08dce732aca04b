#!/usr/bin/env bash
# All four recipes end to end on a CUDA machine: the bundled default model, then a random-weight
# Llama-3.2-1B-shaped model. Tracking is off (the GPU box has no MLflow); stage times and peak GPU
# memory per stage come back in the JSON outcome. Usage: bench/gpu_e2e.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_e2e}
mkdir -p "$out"
recipes="recipes/fp16.yaml recipes/fp8.yaml recipes/int8_sq.yaml recipes/int4_awq.yaml"
common=(--set tracking.enabled=false --set engine.device=cuda --json)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
python3 -m quantgate.cli run $recipes "${common[@]}" > "$out/default_model.json" 2> "$out/default_model.log"
echo "default model: rc=$? in $(( $(date +%s) - t0 )) s"
python3 bench/build_random_model.py "$out/llama-1b" > /dev/null 2>&1
t0=$(date +%s)
python3 -m quantgate.cli run $recipes "${common[@]}" --set model.source="$out/llama-1b" --set model.dtype=bfloat16 \
  --set evaluation.limit=100 --set promotion.enabled=false > "$out/llama1b.json" 2> "$out/llama1b.log"
echo "llama-1b random: rc=$? in $(( $(date +%s) - t0 )) s"
rm -rf "$out/llama-1b"
