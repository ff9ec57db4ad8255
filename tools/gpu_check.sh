#!/usr/bin/env bash
# The GPU check of docs/results.md: same commands as on CPU, on CUDA.
#   DIT_DATA_DIR=<folder with mnist.npz> bash tools/gpu_check.sh <out-dir> [cpu-log-of-30-steps.jsonl]
set -uo pipefail
OUT=${1:-results/gpu_check}; CPU_LOG=${2:-}
mkdir -p "$OUT"; export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
common="--set train.tensorboard=false --device cuda"
# 1. Same noise stream as the CPU? 30 fp32 steps of the tiny config, compared with the CPU log.
$PY launchers/single.py --config configs/tiny.yaml --max-steps 30 --results-dir /tmp/g30 \
    --log-jsonl "$OUT/gpu_tiny30.jsonl" $common
if [ -n "$CPU_LOG" ]; then
  $PY - "$CPU_LOG" "$OUT/gpu_tiny30.jsonl" <<'PY'
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
print(f"CPU vs GPU, 30 fp32 steps: step0 {a[0]:.6f} vs {b[0]:.6f}; max rel diff {max(rel):.2e} (step {rel.index(max(rel))})")
PY
fi
# 2. make demo's run on the GPU
$PY launchers/demo.py --config configs/tiny.yaml --results-dir /tmp/demo_gpu $common
cp /tmp/demo_gpu/samples.png "$OUT/demo_gpu_samples.png"
# 3. the default GPU config
$PY launchers/demo.py --config configs/mnist.yaml --results-dir /tmp/mnist_gpu $common
cp /tmp/mnist_gpu/samples.png "$OUT/mnist_gpu_samples.png"; cp /tmp/mnist_gpu/loss.png "$OUT/mnist_gpu_loss.png"
