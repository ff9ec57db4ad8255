#!/usr/bin/env bash
# DiT-XL/2 on one GPU (issue 39), in one call:
#   bash tools/gpu_xl.sh OUT [stages]
# stages (default "ladder memory"):
#   ladder   python -m dit_core.bench --config configs/dit_xl2.yaml --profile: Meta's settings, then each change
#   memory   python -m dit_core.memory at DiT-XL/2: bf16 compiled with an EMA (batch sweep to the out-of-memory point,
#            recomputation of 7/14/28 blocks and of attention only, save_on_cpu, AdamW on the host), then fp32 eager
set -uo pipefail
OUT=${1:-results/gpu_xl}; STAGES=${2:-"ladder memory"}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    ladder) timeout ${LTIMEOUT:-560} python3 -m dit_core.bench --config configs/dit_xl2.yaml --profile \
              --steps ${LSTEPS:-20} --warmup ${LWARMUP:-4} ${LARGS:-} --json "$OUT/xl_bench.json" 2>&1 \
              | grep -v -E "USDT|Warning|warn" ;;
    memory) timeout ${MTIMEOUT:-420} python3 -m dit_core.memory --config configs/dit_xl2.yaml --precision bf16 --compile \
              --ema --batch 128 --batches ${MBATCHES:-64,128,192,256} --blocks ${MBLOCKS:-7,14,28} --offload-optimizer \
              --no-timeline --out "$OUT/xl_memory_bf16.json" 2>&1 | grep -v -E "USDT|Warning|warn"
            timeout 120 python3 -m dit_core.memory --config configs/dit_xl2.yaml --precision fp32 --ema --batch 32 \
              --batches 32,64,128 --blocks 28 --no-timeline --out "$OUT/xl_memory_fp32.json" 2>&1 \
              | grep -v -E "USDT|Warning|warn" ;;
  esac
done
echo "=== done $(date +%T)"
