#!/usr/bin/env bash
# Ulysses on GPUs (NCCL): parity of SP = NPROC against one GPU (fp32, TF32 off) at configs/ulysses.yaml,
# then throughput at long sequences (SP vs one GPU) and attention against DeepSpeed's DistributedAttention.
#   DIT_DATA_DIR=<folder with mnist.npz> NPROC=2 bash tools/gpu_ulysses.sh OUT [WHEELS_DIR]
set -uo pipefail
OUT=${1:-results/gpu_ulysses}; WHEELS=${2:-}; NPROC=${NPROC:-2}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if [ -n "$WHEELS" ]; then
  pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
nvidia-smi -L
TR="python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC"
P="--config configs/ulysses.yaml --precision fp32 --max-steps 30 --device cuda --set train.tensorboard=false"
python3 launchers/single.py $P --results-dir /tmp/u1 --log-jsonl "$OUT/parity_1gpu.jsonl" | tail -1
$TR launchers/ulysses.py $P --sp-degree "$NPROC" --results-dir /tmp/u2 --log-jsonl "$OUT/parity_sp.jsonl" 2>&1 | grep -E "^\[Ulysses|error" | tail -1
python3 -m dit_core.parity compare "$OUT/parity_1gpu.jsonl" "$OUT/parity_sp.jsonl" | tail -1
for shape in "28 2" "28 1" "56 1"; do       # 196, 784, 3136 tokens
  set -- $shape
  $TR tools/bench_ulysses.py --image-size "$1" --patch "$2" --out "$OUT/bench_${1}_p$2.json" 2>&1 | grep -E "speedup|attn_|tokens|error"
done
