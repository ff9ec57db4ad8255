#!/usr/bin/env bash
# Data parallelism on 2 GPUs (NCCL): parity against one GPU, then throughput, then the all-reduce bandwidth.
#   DIT_DATA_DIR=<folder with mnist.npz> bash tools/gpu_ddp.sh OUT
set -uo pipefail
OUT=${1:-results/gpu_ddp}; mkdir -p "$OUT"; export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
TR="python3 -m torch.distributed.run --standalone"
nvidia-smi -L
P="--config configs/mnist.yaml --precision fp32 --max-steps 30 --device cuda --set train.tensorboard=false"
python3 launchers/single.py $P --results-dir /tmp/p1 --log-jsonl "$OUT/parity_1gpu.jsonl" | tail -1
for impl in hand torch naive; do
  $TR --nproc_per_node 2 launchers/ddp.py $P --impl $impl --results-dir /tmp/p_$impl --log-jsonl "$OUT/parity_2gpu_$impl.jsonl" | tail -1
  python3 -m dit_core.parity compare "$OUT/parity_1gpu.jsonl" "$OUT/parity_2gpu_$impl.jsonl" | tail -1
done
for cfg in configs/mnist.yaml configs/bench.yaml; do
  $TR --nproc_per_node 1 tools/bench_ddp.py --config $cfg --impl none --per-gpu-batch 256
  for impl in hand torch naive; do $TR --nproc_per_node 2 tools/bench_ddp.py --config $cfg --impl $impl --per-gpu-batch 256; done
done
$TR --nproc_per_node 2 tools/bench_ddp.py --allreduce-mb 256
