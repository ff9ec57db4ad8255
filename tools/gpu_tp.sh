#!/usr/bin/env bash
# Tensor parallelism on GPUs (NCCL): parity of TP = NPROC against one GPU (fp32, TF32 off) at configs/mnist.yaml,
# then bf16 time for 100 steps at configs/bench.yaml: one GPU, DDP on NPROC GPUs, TP on NPROC GPUs.
#   DIT_DATA_DIR=<folder with mnist.npz> NPROC=2 bash tools/gpu_tp.sh OUT
set -uo pipefail
OUT=${1:-results/gpu_tp}; NPROC=${NPROC:-2}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi -L
TR="python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC"
P="--config configs/mnist.yaml --precision fp32 --max-steps 30 --device cuda --set train.tensorboard=false"
python3 launchers/single.py $P --results-dir /tmp/t1 --log-jsonl "$OUT/parity_1gpu.jsonl" | tail -1
$TR launchers/tp.py $P --tp-degree "$NPROC" --results-dir /tmp/t2 --log-jsonl "$OUT/parity_tp.jsonl" 2>&1 | grep -E "^\[tensor|error" | tail -1
python3 -m dit_core.parity compare "$OUT/parity_1gpu.jsonl" "$OUT/parity_tp.jsonl" | tail -1
B="--config configs/bench.yaml --precision bf16 --max-steps 100 --device cuda --set train.tensorboard=false"
for i in 1 2; do     # twice: the first round also warms caches
  python3 launchers/single.py $B --results-dir /tmp/b1 | tail -1
  $TR launchers/ddp.py $B --impl torch --results-dir /tmp/b2 2>&1 | grep -E "^\[torch|error" | tail -1
  $TR launchers/tp.py $B --tp-degree "$NPROC" --results-dir /tmp/b3 2>&1 | grep -E "^\[tensor|error" | tail -1
done
