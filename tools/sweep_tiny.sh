#!/usr/bin/env bash
# The tiny-config sweep of docs/results.md: each recipe trains the image count the CPU trains in ~4.5 minutes,
# on a GPU (same math, faster), then is scored by the demo's evaluation. Runs 8 at a time on one GPU.
#   DIT_DATA_DIR=<folder with mnist.npz> bash tools/sweep_tiny.sh
export TQDM_DISABLE=1
run() { name=$1; shift; python3 launchers/demo.py --config configs/tiny.yaml --device cuda --set train.tensorboard=false \
        --set train.warmup_steps=200 --set sample.cfg_scale=3 --results-dir /tmp/sweep_$name "$@" > /tmp/sweep_$name.txt 2>&1
        echo "== $name $*"; grep -E "sample accuracy|FID" /tmp/sweep_$name.txt; }
python3 -c "from dit_core.evaluate import load_classifier; load_classifier('cuda')"
m() { echo --set model.patch_size=$1 --set model.hidden_size=$2 --set model.depth=$3 --set model.num_heads=$4; }
run a1 $(m 4 64 4 4) --global-batch-size 32 --max-steps 5300 --set train.lr=1e-3 &
run a2 $(m 7 96 4 4) --global-batch-size 128 --max-steps 2300 --set train.lr=2e-3 &
run a3 $(m 7 96 4 4) --global-batch-size 64 --max-steps 4200 --set train.lr=2e-3 &
run a4 $(m 7 96 4 4) --global-batch-size 64 --max-steps 4200 --set train.lr=2e-3 --set diffusion.schedule=cosine &
run a5 $(m 7 96 6 4) --global-batch-size 64 --max-steps 3300 --set train.lr=2e-3 &
run a6 $(m 7 128 4 4) --global-batch-size 64 --max-steps 3300 --set train.lr=1e-3 &
run a7 $(m 7 64 4 4) --global-batch-size 64 --max-steps 6600 --set train.lr=2e-3 --set diffusion.schedule=cosine &
run a8 $(m 7 64 4 4) --global-batch-size 64 --max-steps 6600 --set train.lr=3e-3 &
wait
run b1 $(m 7 64 4 4) --global-batch-size 64 --max-steps 6600 --set train.lr=5e-3 &
run b2 $(m 7 64 4 2) --global-batch-size 64 --max-steps 6600 --set train.lr=3e-3 &
run b3 $(m 7 64 4 4) --global-batch-size 64 --max-steps 6600 --set train.lr=3e-3 --set diffusion.loss=l1 &
run b4 $(m 7 64 4 4) --global-batch-size 64 --max-steps 6600 --set train.lr=3e-3 --set sample.sampler=ddpm &
run b5 $(m 7 64 4 4) --global-batch-size 64 --max-steps 6600 --set train.lr=3e-3 --set sample.cfg_scale=5 &
run b6 $(m 7 64 4 4) --global-batch-size 32 --max-steps 13200 --set train.lr=3e-3 &
wait
