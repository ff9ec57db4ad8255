#!/usr/bin/env bash
# Issue 23 on one GPU, in one call: memory of a training step by phase and with recomputation / save_on_cpu,
# fp32 vs TF32, and sin-cos vs 2-D RoPE trained to equal steps.
#   DIT_DATA_DIR=<folder with mnist.npz> bash tools/gpu_fundamentals.sh OUT
set -uo pipefail
OUT=${1:-results/gpu_fundamentals}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
echo "=== memory $(date +%T)"
timeout 170 python3 -m dit_core.memory --config configs/bench.yaml --batch ${MBATCH:-256} --out "$OUT/memory.json" \
  --snapshot "$OUT/snapshot.pickle" 2>&1 | grep -v -E "USDT|Warning|warn"
echo "=== tf32 $(date +%T)"
timeout 150 python3 tools/tf32.py --out "$OUT/tf32.json" --steps ${TSTEPS:-300} 2>&1 | grep -v -E "USDT|Warning|warn"
for pos in sincos rope2d; do
  echo "=== $pos $(date +%T)"
  timeout 150 python3 tools/time_to_quality.py --config configs/mnist.yaml --set model.pos_embed=$pos \
    --max-steps ${RSTEPS:-1500} --snap-every ${RSNAP:-8} --out /tmp/q_$pos 2>&1 | grep -v -E "USDT|Warning|warn" | tail -25
  cp /tmp/q_$pos/quality.json "$OUT/rope_${pos}.json"; cp /tmp/q_$pos/samples.png "$OUT/rope_${pos}_samples.png"
done
echo "=== done $(date +%T)"
