#!/usr/bin/env bash
# Accelerate on GPUs: parity of launchers/accelerate.py against one GPU (fp32, TF32 off) at configs/mnist.yaml,
# then bf16 time for 300 steps beside launchers/ddp.py --impl torch on the same processes.
#   DIT_DATA_DIR=<folder with mnist.npz> NPROC=2 bash tools/gpu_accelerate.sh OUT
set -uo pipefail
OUT=${1:-results/gpu_accelerate}; NPROC=${NPROC:-2}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi -L; python3 -c "import accelerate; print('accelerate', accelerate.__version__)"
AL="python3 -m accelerate.commands.launch --num_processes $NPROC --num_machines 1 --dynamo_backend no"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC"
P="--config configs/mnist.yaml --precision fp32 --max-steps 30 --device cuda --set train.tensorboard=false"
python3 launchers/single.py $P --results-dir /tmp/a1 --log-jsonl "$OUT/parity_1gpu.jsonl" | tail -1
$AL launchers/accelerate.py $P --results-dir /tmp/a2 --log-jsonl "$OUT/parity_accelerate.jsonl" 2>&1 | grep -E "^\[accelerate|rror" | tail -1
python3 -m dit_core.parity compare "$OUT/parity_1gpu.jsonl" "$OUT/parity_accelerate.jsonl" | tail -1
B="--config configs/mnist.yaml --precision bf16 --max-steps 300 --device cuda --set train.tensorboard=false"
for i in 1 2; do   # twice: the first pair also warms caches
  $TR launchers/ddp.py $B --impl torch --results-dir /tmp/b_ddp 2>&1 | grep -E "^\[torch|rror" | tail -1
  $AL launchers/accelerate.py $B --results-dir /tmp/b_acc 2>&1 | grep -E "^\[accelerate|rror" | tail -1
done
