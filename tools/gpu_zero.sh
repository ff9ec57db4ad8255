#!/usr/bin/env bash
# ZeRO on GPUs (NCCL): parity of stages 0-3 against one GPU (fp32, TF32 off), then bf16 peak memory
# and time per stage beside torch DDP. Needs deepspeed: on the device machine, carry its wheels.
#   DIT_DATA_DIR=<folder with mnist.npz> NPROC=2 bash tools/gpu_zero.sh OUT [WHEELS_DIR]
set -uo pipefail
OUT=${1:-results/gpu_zero}; WHEELS=${2:-}; NPROC=${NPROC:-2}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if [ -n "$WHEELS" ]; then
  pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
nvidia-smi -L; python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC"
P="--config configs/mnist.yaml --precision fp32 --max-steps 30 --device cuda --set train.tensorboard=false"
python3 launchers/single.py $P --results-dir /tmp/z1 --log-jsonl "$OUT/parity_1gpu.jsonl" | tail -1
for s in 0 1 2 3; do
  $TR launchers/zero.py $P --stage $s --results-dir /tmp/z_$s --log-jsonl "$OUT/parity_zero$s.jsonl" 2>&1 | grep -E "^\[ZeRO|error" | tail -1
  python3 -m dit_core.parity compare "$OUT/parity_1gpu.jsonl" "$OUT/parity_zero$s.jsonl" | tail -1
done
B="--config configs/bench.yaml --precision bf16 --max-steps 60 --device cuda --set train.tensorboard=false --set train.ema_decay=0.999"
$TR launchers/ddp.py $B --impl torch --results-dir /tmp/b_ddp 2>&1 | grep -E "^\[torch|error" | tail -1
for s in 0 1 2 3; do
  $TR launchers/zero.py $B --stage $s --persistence-threshold 0 --report "$OUT/bench_zero$s.json" \
      --results-dir /tmp/b_$s 2>&1 | grep -E "^\[ZeRO|error" | tail -1
done
