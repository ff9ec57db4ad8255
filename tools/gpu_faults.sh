#!/usr/bin/env bash
# The run guards on one GPU (issue 25), in one call:  DIT_DATA_DIR=<folder with mnist.npz> bash tools/gpu_faults.sh OUT
#  1. the fast path (configs/mnist.yaml, bf16, CUDA graphs) trains and resumes with the guards on;
#  2. fp16 with a learning rate of 1000 on CUDA (a real GradScaler): one sentence, no non-finite checkpoint;
#  3. a resume that changes train.lr: the schedule is recomputed, and said;
#  4. the fast-path tests on CUDA.
set -uo pipefail
OUT=${1:-results/gpu_faults}; mkdir -p "$OUT"; export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
R=/tmp/gf; rm -rf $R
echo "=== 1. fast path, 600 steps with a checkpoint at 300, then a resume to 900"
python3 launchers/single.py --config configs/mnist.yaml --max-steps 600 --set train.ckpt_every=300 \
    --results-dir $R/fast --set train.tensorboard=false 2>&1 | tail -1
python3 launchers/single.py --config configs/mnist.yaml --max-steps 900 --results-dir $R/fast \
    --resume $R/fast/checkpoint-600 --set train.tensorboard=false 2>&1 | tail -2
python3 -c "import json; r=[json.loads(l) for l in open('$R/fast/log.jsonl')]; print('rows', len(r), 'steps 0..', r[-1]['step'], 'one per step:', [x['step'] for x in r]==list(range(900)))"
echo "=== 2. fp16 divergence on CUDA"
python3 launchers/single.py --config configs/tiny.yaml --device cuda --max-steps 200 --precision fp16 --fast off \
    --set train.lr=1e3 --set train.warmup_steps=0 --set train.ckpt_every=5 --set train.tensorboard=false \
    --results-dir $R/fp16; echo "exit $?"
python3 - <<'PY'
import torch, pathlib
bad = [str(p) for p in pathlib.Path("/tmp/gf/fp16").glob("checkpoint-*/*.pt") if p.name in ("model.pt", "ema.pt")
       and not all(torch.isfinite(v).all() for v in torch.load(p).values())]
print("checkpoints:", sorted(p.name for p in pathlib.Path("/tmp/gf/fp16").glob("checkpoint-*")), "non-finite:", bad)
PY
echo "=== 3. resume with another lr"
python3 launchers/single.py --config configs/tiny.yaml --device cuda --max-steps 40 --fast off --set train.ckpt_every=20 \
    --set train.tensorboard=false --results-dir $R/lr 2>&1 | tail -1
python3 launchers/single.py --config configs/tiny.yaml --device cuda --max-steps 40 --fast off --set train.lr=5e-4 \
    --set train.tensorboard=false --results-dir $R/lr --resume $R/lr/checkpoint-20 --overwrite 2>&1 | grep -E "resume|trained"
echo "=== 4. tests"
python3 -m pytest -q -p no:cacheprovider tests/test_fast.py tests/test_train.py tests/test_faults.py -k "not accelerate and not stopped and not killed_agent and not two_runs and not kill9" 2>&1 | tail -5
echo "=== done"
